"""Where does inference lose? Train a VAE on the bundled digits, then split its inference gap
log p(x) - ELBO into the approximation gap (the posterior family) and the amortization gap (the encoder),
by optimising a posterior per test point (Cremer, Li & Duvenaud, 2018; docs/gaps.md).

    python examples/inference_gaps.py                    # about 3 minutes on 2 CPU cores
    python examples/inference_gaps.py --quick            # a smoke run (what the tests execute)

The same from the command line: ``pyro-vae train --out runs/d && pyro-vae gaps runs/d``. And test-time
refinement of a trained encoder in three lines::

    local = vae.refine(x, steps=200)                      # per-point SVI from q_phi(z|x), decoder frozen
    elbo = pyro_vae.evaluation.elbo(vae.model, local.guide, x, batch_size=None)
    log_px = pyro_vae.evaluation.log_likelihood(vae.model, local.guide, x, batch_size=len(x))

The trained VAE is also compared with itself untrained (the initial weights its seed gives, with fit's
output-bias initialization) on the same test points: "learned" is the mean per-point gain in the amortized ELBO,
with its paired standard error.
"""
import argparse
import tempfile
from pathlib import Path

import pyro
import torch

from pyro_vae import RunConfig, analysis, evaluation, fit, load_run, train_run
from pyro_vae.data import prepare_eval_data
from pyro_vae.runs import build_vae


def learned(run, x, amortized_elbo: torch.Tensor, num_particles: int) -> dict:
    """The untrained VAE's amortized ELBO of each point of ``x`` (``num_particles`` particles, as the report's
    ``amortized_elbo``), and the trained model's gain over it: {mean, stderr} of the per-point difference."""
    pyro.set_rng_seed(run.config.seed)  # training started from the weights this seed draws
    untrained = build_vae(run.config, run.vae.input_shape)
    fit(untrained, run.load_data().x_train, epochs=0, init_output_bias=run.config.init_output_bias, progress=False)
    untrained_elbo = evaluation.elbo(untrained.model, untrained.guide, x, num_particles=num_particles,
                                     batch_size=None)
    return {"untrained_elbo": float(untrained_elbo.mean()),
            "learned": analysis.mean_and_stderr(amortized_elbo - untrained_elbo)}


def main(argv=None):
    """The report of :func:`pyro_vae.analysis.inference_gaps`, plus ``untrained_elbo`` and ``learned`` (the
    trained model's per-point amortized ELBO gain over the untrained model, {mean, stderr})."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--guide", default="diagonal", help="the family the VAE is trained with")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--test-points", type=int, default=200)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--num-samples", type=int, default=5000)
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.test_points, args.steps, args.num_samples = 1, 20, 20, 50
    root = Path(args.out or tempfile.mkdtemp(prefix="inference-gaps-"))
    config = RunConfig(z_dim=8, hidden=(256,), guide=args.guide, epochs=args.epochs, lr=1e-3, batch_size=64, seed=0)
    run = load_run(train_run(config, root / args.guide, progress=False))
    x = prepare_eval_data(run.vae, run.load_data().x_test, run.config.binarize)[: args.test_points]
    torch.manual_seed(0)
    report = analysis.inference_gaps(run.vae, x, families=("diagonal", "cholesky", "flow"), steps=args.steps,
                                     num_samples=args.num_samples, elbo_particles=20 if args.quick else 100)
    analysis.write_gaps(report, run.dir)
    print(analysis.gaps_markdown(report))
    print(f"figures and gaps.json in {run.dir}")
    comparison = learned(run, x, torch.tensor(report["per_point"]["amortized_elbo"]), report["elbo_particles"])
    print(f"amortized ELBO {report['amortized_elbo']['mean']:.2f}, untrained {comparison['untrained_elbo']:.2f}: "
          f"learned {comparison['learned']['mean']:+.2f} ± {comparison['learned']['stderr']:.2f} nats per point")
    return {**report, **comparison}


if __name__ == "__main__":
    main()
