"""Two stochastic layers, both inference directions: Burda et al.'s bottom-up hierarchy and Sønderby et al.'s ladder
(top-down) VAE, written as plain Pyro programs and trained on the bundled 8x8 digits with the IWAE bound
(docs/structured.md).

    python examples/hierarchical.py             # a few minutes on 2 CPU cores
    python examples/hierarchical.py --quick     # a smoke run (what the tests execute)

Each row is compared with the same model untrained on the same test digits ("untrained" = where training
started: the seed's weights with fit's output-bias initialization, ``fit(..., epochs=0)``): "learned" is the
mean per-digit gain in ELBO and in importance-sampled log p(x), trained minus untrained, with its paired standard
error.
"""
import argparse
import copy

import pyro

import pyro_vae
from pyro_vae.analysis import learning_report
from pyro_vae.data import prepare_eval_data


def run(inference: str, data, quick: bool) -> dict:
    """Train one HierarchicalVAE; its test ELBO and NLL, trained and untrained, and the paired gains."""
    sizes, deterministic = ((8, 4), ((32, 32), (16, 16))) if quick else ((16, 8), ((64, 64), (32, 32)))
    pyro.set_rng_seed(0)
    model = pyro_vae.HierarchicalVAE(data.input_shape, sizes, inference=inference, deterministic=deterministic)
    pyro_vae.fit(model, data.x_train, epochs=0, progress=False)  # the output-bias initialization only
    untrained = copy.deepcopy(model)
    pyro_vae.fit(model, data.x_train, objective="iwae", num_particles=5, epochs=6 if quick else 100,
                 batch_size=32 if quick else 64, lr=3e-3 if quick else 1e-3, progress=False,
                 compile="graph" if quick else False)
    x = prepare_eval_data(model, data.x_test)[: 120 if quick else None]
    return learning_report(model, untrained, x, num_samples=100 if quick else 2000)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: small layers, a few epochs, small evaluation")
    args = p.parse_args(argv)
    data = pyro_vae.load_dataset("digits")
    rows = {inference: run(inference, data, args.quick) for inference in ("bottom-up", "top-down")}
    print("| inference | test ELBO | test NLL | untrained NLL | gain in log p(x) |\n|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['test_elbo']:.2f} | {r['test_nll']:.2f} | {r['untrained_nll']:.2f} | "
              f"{r['learned_log_px']['mean']:.2f} ± {r['learned_log_px']['stderr']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
