"""Learned priors for the VAE: N(0, I) against a mixture of Gaussians, the VampPrior (Tomczak & Welling, 2018)
and a flow prior, the same encoder and decoder trained on the bundled 8x8 digits (docs/structured.md).

    python examples/learned_prior.py             # a few minutes on 2 CPU cores
    python examples/learned_prior.py --quick     # a smoke run (what the tests execute)

A learned prior has no closed-form KL(q(z|x) || p(z)); the analytic objective uses log q(z|x) - log p(z) for it.
Each row is compared with the same VAE untrained on the same test digits ("untrained" = where training started,
after fit's output-bias initialization): "learned" is the mean per-digit gain in ELBO and in importance-sampled
log p(x), trained minus untrained, with its paired standard error.
"""
import argparse
import copy

import pyro

import pyro_vae
from pyro_vae.analysis import learning_report
from pyro_vae.data import prepare_eval_data

PRIORS = [("standard", {}), ("mog", {"prior_components": 10}), ("vamp", {"prior_components": 50}),
          ("flow", {"prior_kwargs": {"flow_steps": 2}})]


def run(prior: str, options: dict, data, quick: bool) -> dict:
    """Train one VAE with this prior; its test ELBO and NLL, trained and untrained, and the paired gains."""
    pyro.set_rng_seed(0)
    vae = pyro_vae.VAE(data.input_shape, z_dim=4 if quick else 8, hidden=(64,) if quick else (200, 200),
                       prior=prior, **options)
    pyro_vae.fit(vae, data.x_train, epochs=0, progress=False)  # the output-bias initialization only
    untrained = copy.deepcopy(vae)
    pyro_vae.fit(vae, data.x_train, epochs=5 if quick else 100, batch_size=32 if quick else 64,
                 lr=3e-3 if quick else 1e-3, progress=False, compile="graph" if quick else False)
    x = prepare_eval_data(vae, data.x_test)[: 120 if quick else None]
    return learning_report(vae, untrained, x, num_samples=100 if quick else 2000)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: a small VAE, a few epochs, small evaluation")
    args = p.parse_args(argv)
    data = pyro_vae.load_dataset("digits")
    rows = {prior: run(prior, options, data, args.quick) for prior, options in PRIORS}
    print("| prior | test ELBO | test NLL | untrained NLL | gain in log p(x) |\n|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['test_elbo']:.2f} | {r['test_nll']:.2f} | {r['untrained_nll']:.2f} | "
              f"{r['learned_log_px']['mean']:.2f} ± {r['learned_log_px']['stderr']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
