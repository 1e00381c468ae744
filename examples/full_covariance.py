"""Swap the posterior family without touching the model: diagonal vs full-covariance (Cholesky) vs low-rank vs
IAF, trained with the same budget on the bundled digits, compared by test ELBO and importance-sampled NLL.

    python examples/full_covariance.py                  # about 2 minutes on 2 CPU cores
    python examples/full_covariance.py --quick          # a smoke run (what the tests execute)

The gap -ELBO - NLL is the average KL(q(z|x) || p(z|x)) left by the family: a richer family closes part of it.
Each run is also compared with its own untrained model on the same test points: "learned" is the mean per-point
gain in log p(x), trained minus untrained, with its paired standard error. "Untrained" is where training started:
the initial weights the seed gives, with fit's output-bias initialization (``fit(..., epochs=0)``).
"""
import argparse
import tempfile
from pathlib import Path

import pyro
import torch

from pyro_vae import RunConfig, evaluate_run, fit, load_run, train_run
from pyro_vae.analysis import mean_and_stderr
from pyro_vae.data import prepare_eval_data
from pyro_vae.evaluation import log_likelihood
from pyro_vae.runs import build_vae

GUIDES = [("diagonal", {}), ("cholesky", {}), ("lowrank", {"rank": 2}), ("iaf", {"flow_steps": 2})]


def learned(run, num_samples: int) -> dict:
    """The run's VAE against the same VAE untrained: log p(x) of each test point by importance sampling (the same
    random stream for both), and its gain ({mean, stderr} of trained minus untrained, paired over the points)."""
    data = run.load_data()
    pyro.set_rng_seed(run.config.seed)  # training started from the weights this seed draws
    untrained = build_vae(run.config, run.vae.input_shape)
    fit(untrained, data.x_train, epochs=0, init_output_bias=run.config.init_output_bias, progress=False)
    x = prepare_eval_data(run.vae, data.x_test, run.config.binarize)
    ll = []
    for vae in (run.vae, untrained):
        torch.manual_seed(1)
        ll.append(log_likelihood(vae.model, vae.guide, x, num_samples=num_samples, progress=False))
    return {"untrained_nll": float(-ll[1].mean()), "learned": mean_and_stderr(ll[0] - ll[1])}


def main(argv=None):
    """One row per guide: evaluate_run's test metrics (test_elbo, test_nll, test_nll_stderr, active_units, ...)
    and the comparison with the untrained model (:func:`learned`)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--z-dim", type=int, default=8)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--objective", default="analytic", help="elbo | analytic | iwae")
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.num_samples = 2, 20
    root = Path(args.out or tempfile.mkdtemp(prefix="full-covariance-"))
    rows = []
    for guide, kwargs in GUIDES:
        config = RunConfig(z_dim=args.z_dim, hidden=(256,), guide=guide, guide_kwargs=kwargs, epochs=args.epochs,
                           objective=args.objective, lr=1e-3, batch_size=64, seed=0)
        run = load_run(train_run(config, root / guide, progress=False))
        r = evaluate_run(run, num_samples=args.num_samples)
        rows.append({"guide": guide, **r, **learned(run, args.num_samples)})
    print("| guide | test ELBO | test NLL | gap -ELBO - NLL | active units | untrained NLL | learned |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['guide']} | {r['test_elbo']:.2f} | {r['test_nll']:.2f} ± {r['test_nll_stderr']:.2f} | "
              f"{-r['test_elbo'] - r['test_nll']:.2f} | {r['active_units']} | {r['untrained_nll']:.2f} | "
              f"{r['learned']['mean']:+.2f} ± {r['learned']['stderr']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
