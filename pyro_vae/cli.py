"""The ``pyro-vae`` command: train, evaluate, sample, plot.

Bad input (an unknown option, a wrong value, missing data files) prints one line naming the problem and
exits with status 2, leaving no half-written run directory.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import RunConfig

__all__ = ["main", "build_parser"]

_D = RunConfig()


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``pyro-vae train: error: ... (see --help)``, exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _positive_float(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
    return v


def _hidden(s):
    try:
        sizes = tuple(int(h) for h in s.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer sizes like 400,200, got {s!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive layer sizes like 400,200, got {s!r}")
    return sizes


def _add_train(sub):
    from .data import DATASETS
    from .likelihoods import LIKELIHOODS

    p = sub.add_parser("train", help="train a VAE and write a run directory",
                       description="Train a VAE by SVI and write config.json, metrics.jsonl, checkpoint.pt and "
                                   "figures into a run directory.")
    p.add_argument("--dataset", default=_D.dataset, choices=list(DATASETS))
    p.add_argument("--data-dir", default=None, help="folder holding the dataset files ($PYRO_VAE_DATA)")
    p.add_argument("--download", action="store_true", help="allow torchvision to download missing files")
    p.add_argument("--val-fraction", type=float, default=_D.val_fraction)
    p.add_argument("--binarize", default=_D.binarize, choices=["auto", "dynamic", "none"])
    p.add_argument("--z-dim", type=_positive_int, default=_D.z_dim)
    p.add_argument("--hidden", type=_hidden, default=_D.hidden, help="hidden sizes, e.g. 400 or 200,200")
    p.add_argument("--activation", default=_D.activation)
    p.add_argument("--network", default=_D.network, choices=["mlp", "conv"])
    p.add_argument("--likelihood", default=_D.likelihood, choices=list(LIKELIHOODS))
    p.add_argument("--sigma", default=None, help="gaussian likelihood: decoder | learned | a fixed number")
    p.add_argument("--guide", default=_D.guide, help="posterior family: diagonal, cholesky, lowrank, iaf, laplace, studentt")
    p.add_argument("--rank", type=_positive_int, default=None, help="rank of the lowrank guide")
    p.add_argument("--flow-steps", type=_positive_int, default=None, help="number of IAF steps")
    p.add_argument("--conditional", action="store_true", help="a conditional VAE on the class label")
    p.add_argument("--prior", default=_D.prior, choices=["standard", "learned"],
                   help="conditional prior p(z|c): N(0, I) or a network of c")
    p.add_argument("--objective", default=_D.objective, help="elbo | analytic | iwae")
    p.add_argument("--num-particles", type=_positive_int, default=_D.num_particles)
    p.add_argument("--estimator", default=_D.estimator, choices=["iwae", "dreg", "stl"])
    p.add_argument("--beta", type=_positive_float, default=_D.beta, help="KL weight (beta-VAE)")
    p.add_argument("--kl-warmup", type=int, default=_D.kl_warmup, help="epochs to anneal beta from 0")
    p.add_argument("--epochs", type=_positive_int, default=_D.epochs)
    p.add_argument("--batch-size", type=_positive_int, default=_D.batch_size)
    p.add_argument("--lr", type=_positive_float, default=_D.lr)
    p.add_argument("--seed", type=int, default=_D.seed)
    p.add_argument("--device", default=_D.device, choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--checkpoint-every", default=str(_D.checkpoint_every),
                   help="checkpoint interval: N epochs, or Nsteps (e.g. 500steps) for optimizer steps")
    p.add_argument("--on-nan", default=_D.on_nan, choices=["stop", "skip"],
                   help="a non-finite loss stops training (default) or its step is skipped")
    p.add_argument("--out", default=None, help="run directory (default runs/<timestamp>)")
    p.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue a run from its last checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args):
    from .training import train_run

    guide_kwargs = {}
    if args.rank is not None:
        guide_kwargs["rank"] = args.rank
    if args.flow_steps is not None:
        guide_kwargs["flow_steps"] = args.flow_steps
    every, steps = _checkpoint_interval(args.checkpoint_every)
    config = RunConfig(
        dataset=args.dataset, data_dir=args.data_dir, download=args.download, val_fraction=args.val_fraction,
        binarize=args.binarize, z_dim=args.z_dim, hidden=args.hidden, activation=args.activation,
        network=args.network, likelihood=args.likelihood, sigma=args.sigma, guide=args.guide,
        guide_kwargs=guide_kwargs, conditional=args.conditional, prior=args.prior, objective=args.objective, num_particles=args.num_particles,
        estimator=args.estimator, beta=args.beta, kl_warmup=args.kl_warmup, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
        checkpoint_every=every, checkpoint_steps=steps, on_nan=args.on_nan,
    )
    if args.resume and args.out:
        raise UsageError("give either --resume RUN_DIR or --out DIR, not both")
    run_dir = train_run(config, args.resume or args.out, resume=bool(args.resume), progress=not args.no_progress)
    print(f"run written to {run_dir}")


def _checkpoint_interval(text: str) -> tuple[int, int]:
    """'3' -> every 3 epochs; '500steps' -> every 500 optimizer steps (and at each epoch end)."""
    t = text.strip().lower()
    steps = t.endswith("steps") or t.endswith("step")
    num = t.removesuffix("steps").removesuffix("step") if steps else t.removesuffix("epochs").removesuffix("epoch")
    if not num.isdigit() or int(num) < 1:
        raise UsageError(f"--checkpoint-every must be a positive number of epochs or e.g. 500steps, got {text!r}")
    return (1, int(num)) if steps else (int(num), 0)


def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="test-set ELBO (and NLL) of a run -> RUN_DIR/eval.json")
    p.add_argument("run_dir")
    p.add_argument("--num-samples", type=int, default=0,
                   help="importance samples per test point for test_nll (e.g. 5000); 0 skips it")
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"])
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args):
    from .runs import evaluate_run, load_run
    from .training import resolve_device

    if args.num_samples < 0:
        raise UsageError(f"--num-samples must be >= 0, got {args.num_samples}")
    run = load_run(args.run_dir)
    result = evaluate_run(run, num_samples=args.num_samples, batch_size=args.batch_size,
                          device=resolve_device(args.device), progress=True)
    print(json.dumps(result, indent=2))


def _add_sample(sub):
    p = sub.add_parser("sample", help="decode draws from the prior into an image grid")
    p.add_argument("run_dir")
    p.add_argument("-n", type=_positive_int, default=64, help="number of samples")
    p.add_argument("--out", default=None, help="image path (default RUN_DIR/samples-N.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draw", action="store_true", help="draw x ~ p(x|z) instead of showing E[x|z]")
    p.add_argument("--label", type=int, default=None, help="conditional runs: generate only this class")
    p.set_defaults(func=_cmd_sample)


def _cmd_sample(args):
    import torch

    from .plots import save_samples
    from .runs import load_run

    run = load_run(args.run_dir)
    torch.manual_seed(args.seed)
    kwargs = {}
    if run.vae.conditional:
        if args.label is None:
            raise UsageError("this run is conditional: give --label K to choose the class to generate")
        if not 0 <= args.label < run.vae.num_classes:
            raise UsageError(f"--label must be in [0, {run.vae.num_classes}), got {args.label}")
        kwargs["label"] = args.label
    elif args.label is not None:
        raise UsageError("--label needs a conditional run (train with --conditional)")
    suffix = f"-label{args.label}" if args.label is not None else ""
    out = Path(args.out) if args.out else Path(args.run_dir) / f"samples-{args.n}{suffix}.png"
    save_samples(run.vae, out, args.n, mean=not args.draw, **kwargs)
    print(f"samples written to {out}")


def _add_plot(sub):
    p = sub.add_parser("plot", help="redraw a run's figures")
    p.add_argument("run_dir")
    p.add_argument("--latent", default="pca", choices=["pca", "tsne"], help="projection for z_dim > 2")
    p.set_defaults(func=_cmd_plot)


def _cmd_plot(args):
    from .plots import draw_run_figures
    from .runs import load_run

    for path in draw_run_figures(load_run(args.run_dir), latent_method=args.latent):
        print(path)


def _add_gradient_variance(sub):
    p = sub.add_parser("gradient-variance",
                       help="score-function vs reparameterization gradient variance (toy study or a run)")
    p.add_argument("run_dir", nargs="?", help="a run whose encoder gradients to study")
    p.add_argument("--toy", action="store_true", help="the toy problem min_phi E_{x~N(phi,1)}[x^2]")
    p.add_argument("--phi", type=float, default=1.0)
    p.add_argument("--repetitions", type=_positive_int, default=None,
                   help="gradient draws per estimator (default 1000 toy, 100 VAE)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="VAE study: the fixed minibatch size")
    p.add_argument("--estimators", default=None, help="comma-separated, e.g. reparam,score,dreg-5")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR, or gradient-variance/ for --toy)")
    p.set_defaults(func=_cmd_gradient_variance)


def _cmd_gradient_variance(args):
    from . import estimators as est

    if args.toy == bool(args.run_dir):
        raise UsageError("give either --toy or a RUN_DIR")
    if args.toy:
        rows = est.toy_gradient_study(phi=args.phi, repetitions=args.repetitions or 1000)
        paths = est.write_toy_study(Path(args.out or "gradient-variance"), rows)
    else:
        import torch

        from .runs import load_run
        from .training import prepare_eval_data

        run = load_run(args.run_dir)
        if run.vae.conditional:
            raise UsageError("the gradient-variance study takes unconditional runs")
        data = run.load_data()
        x = prepare_eval_data(run.vae, data.x_test, run.config.binarize)[: args.batch_size]
        names = args.estimators.split(",") if args.estimators else list(est.DEFAULT_VAE_ESTIMATORS)
        torch.manual_seed(0)
        rows = est.vae_gradient_study(run.vae.model, run.vae.guide, list(run.vae.encoder.parameters()), x,
                                      estimators=names, repetitions=args.repetitions or 100)
        paths = est.write_vae_study(Path(args.out or args.run_dir), rows)
    print(Path(paths["md"]).read_text())
    for p in paths.values():
        print(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyro-vae", description="Variational autoencoders the Pyro way.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_evaluate, _add_sample, _add_plot, _add_gradient_variance):
        add(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .data import DataError
    from .distributed import DistributedConfigError
    from .training import DivergenceError

    try:
        args.func(args)
    except (UsageError, DataError, ValueError, FileNotFoundError, DistributedConfigError) as e:
        print(f"pyro-vae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except DivergenceError as e:
        print(f"pyro-vae {args.command}: diverged: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
