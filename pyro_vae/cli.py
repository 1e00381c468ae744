"""The ``pyro-vae`` command: train, evaluate, sample, plot, gradient-variance, gaps.

Bad input (an unknown option, a wrong value, missing data files) prints one line naming the problem and
exits with status 2, leaving no half-written run directory.

``train --model FILE.py:CLASS`` trains a model of the user's own (docs/own-model.md); the run keeps a copy of the
file, and every command that loads such a run executes that copy, so it takes ``--trust-code`` (docs/runs.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

from .analysis import (DEFAULT_FAMILIES, OWN_MODEL_FAMILIES, gaps_markdown, inference_gaps, model_inference_gaps,
                       write_gaps)
from .config import CONDITIONAL_PRIORS, INFERENCE, PRIORS, RunConfig
from .data import DATASETS, DataError, prepare_eval_data
from .distributed import DistributedConfigError, world
from .guides import POSTERIORS, SCALE_PARAMS
from .likelihoods import LIKELIHOODS
from .networks import ACTIVATIONS
from .objectives import ESTIMATORS, OBJECTIVES
from .plots import draw_run_figures, save_samples
from .runs import EVAL, evaluate_run, load_run, resume_run, train_run, write_eval
from .studies import gradient_variance as study
from .user_model import UntrustedCodeError
from .training import LR_SCHEDULES, OUTPUT_BIAS_INITS, DivergenceError, module_dtype, resolve_device

__all__ = ["main", "build_parser"]

_D = RunConfig()


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``pyro-vae train: error: ... (see --help)``, exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already states its default, the default is
    None ("not given") or the option is a flag."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or any(action.default is v for v in (None, argparse.SUPPRESS, False))
                or not action.option_strings or action.nargs == 0):
            return text
        return text + " (default: %(default)s)"


def _number(convert, accept, what: str):
    """An argparse type: ``convert(s)`` that must satisfy ``accept``; else "expected <what>, got 's'"."""
    def parse(s):
        try:
            v = convert(s)
        except ValueError:
            v = None
        if v is None or not accept(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v
    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
_positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive number")
_unit_float = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
_non_negative_float = _number(float, lambda v: 0 <= v < float("inf"), "a number >= 0")


def _sizes(what: str, example: str):
    """An argparse type for comma-separated positive sizes (``what``: "layer" or "latent")."""
    def parse(s):
        try:
            sizes = tuple(int(h) for h in s.replace(",", " ").split())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what} sizes like {example}, got {s!r}") from None
        if not sizes or min(sizes) < 1:
            raise argparse.ArgumentTypeError(f"expected positive {what} sizes like {example}, got {s!r}")
        return sizes
    return parse


_hidden = _sizes("layer", "400,200")
#: --hierarchy: the latent sizes d_1,...,d_L of a HierarchicalVAE (z_1 next to x), e.g. 100,50
_latent_sizes = _sizes("latent", "100,50")


# ---------------------------------------------------------------------------------------------- train
def _train_options() -> list:
    """(flag, RunConfig field or None, add_argument keywords) of every train option, choices read from the
    registries when the parser is built. Defaults are None ("not given"), so --resume can tell which options
    were passed; the help shows RunConfig's default."""
    return _data_options() + _model_options() + _objective_options() + _optimization_options()


def _data_options() -> list:
    return [
        ("--dataset", "dataset", dict(choices=list(DATASETS), help="dataset (digits is bundled: no files)")),
        ("--data-dir", "data_dir", dict(help="folder holding the dataset files (default $PYRO_VAE_DATA or "
                                             "~/.cache/pyro-vae/data)")),
        ("--download", "download", dict(action="store_true", default=None,
                                        help="allow torchvision to download missing files (needs internet)")),
        ("--val-fraction", "val_fraction", dict(type=float, help="fraction of the training set held out for "
                                                                 "validation")),
        ("--binarize", "binarize", dict(choices=["auto", "dynamic", "none"],
                                        help="Bernoulli likelihood: auto binarizes grayscale data afresh each epoch, "
                                             "dynamic always does, none requires binary data")),
    ]


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"z_dim\": 4}}', got {text!r} ({e.msg})") \
            from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"z_dim\": 4}}', got {text!r}")
    return value


#: train options that build the built-in VAE: a model of the user's own (--model) takes --model-kwargs instead
_VAE_OPTIONS = ("z_dim", "hidden", "activation", "network", "likelihood", "sigma", "guide", "rank", "flow_steps",
                "scale_param", "conditional", "prior", "prior_components", "hierarchy", "inference", "semi_supervised",
                "labels", "label_seed", "aux_weight", "unlabelled_per_labelled")


def _model_options() -> list:
    return [
        ("--model", None, dict(metavar="FILE.py:CLASS", help="train a model of your own: an nn.Module with Pyro "
                                                              "programs model(x=None, batch_size=None) and guide(x) "
                                                              "(docs/own-model.md); the run keeps a copy of FILE (default: "
                                                              "the built-in VAE)")),
        ("--model-kwargs", None, dict(type=_json_object, metavar="JSON", help="--model: keyword arguments of CLASS, "
                                                                               "a JSON object (default {})")),
        ("--z-dim", "z_dim", dict(type=_positive_int, help="latent dimension")),
        ("--hidden", "hidden", dict(type=_hidden, help="hidden layer sizes, e.g. 400 or 200,200; with --hierarchy "
                                                       "the deterministic layers of every stochastic layer (default "
                                                       "there 2d_l,2d_l for layer l)")),
        ("--hierarchy", "hierarchy", dict(type=_latent_sizes, metavar="D1,D2,...",
                                          help="a HierarchicalVAE with these latent sizes, z_1 next to x (instead "
                                               "of --z-dim); --hierarchy 100,50 --activation tanh is Burda et al.'s "
                                               "two-layer architecture x-200-200-z1-100-100-z2 (docs/cli.md) "
                                               "(default: one latent layer)")),
        ("--inference", "inference", dict(choices=list(INFERENCE), help="--hierarchy: the guide samples "
                                          "bottom-up (q(z_1|x) q(z_2|z_1)..., Burda et al.) or top-down (the ladder "
                                          "VAE, Sønderby et al.)")),
        ("--activation", "activation", dict(choices=list(ACTIVATIONS), help="hidden-layer activation")),
        ("--network", "network", dict(choices=["mlp", "conv"], help="encoder/decoder networks: MLPs or convolutional "
                                                                    "(images with sides divisible by 4)")),
        ("--likelihood", "likelihood", dict(choices=list(LIKELIHOODS), help="observation model p(x|z)")),
        ("--sigma", "sigma", dict(help="gaussian likelihood: decoder | learned | a fixed positive number "
                                       "(default decoder)")),
        ("--guide", "guide", dict(choices=list(POSTERIORS), help="posterior family q(z|x)")),
        ("--rank", None, dict(type=_positive_int, help="lowrank guide: rank of the covariance factor (default 2)")),
        ("--flow-steps", None, dict(type=_positive_int, help="iaf guide: number of flow steps (default 2)")),
        ("--scale-param", "scale_param", dict(choices=list(SCALE_PARAMS), help="encoder scales: softplus(raw) + 1e-5 "
                                              "or exp(raw)")),
        ("--init-output-bias", "init_output_bias", dict(choices=list(OUTPUT_BIAS_INITS), help="decoder output "
                                                        "bias: PyTorch's default init, zero, or the likelihood's "
                                                        "parameters for the mean training image (logit of the mean "
                                                        "pixel)")),
        ("--conditional", "conditional", dict(action="store_true", default=None,
                                              help="a conditional VAE on the class label")),
        ("--prior", "prior", dict(choices=list(dict.fromkeys(PRIORS + CONDITIONAL_PRIORS)),
                                  help="p(z) of the VAE or of --hierarchy's top layer: standard N(0, I), mog (K "
                                       "learned Gaussians), vamp (the VampPrior, K pseudo-inputs), flow (a learned "
                                       "flow of N(0, I)); with --conditional p(z|c): standard or learned (a network "
                                       "of c)")),
        ("--prior-components", "prior_components", dict(type=_positive_int, metavar="K",
                                                        help="--prior mog: K components (default 10); --prior "
                                                             "vamp: K pseudo-inputs (default 500)")),
    ] + _semi_supervised_options()


def _semi_supervised_options() -> list:
    return [
        ("--semi-supervised", "semi_supervised", dict(action="store_true", default=None,
                                                      help="the semi-supervised M2 (Kingma et al., 2014): "
                                                           "--labels N training points keep their labels, the rest "
                                                           "are unlabelled, y is summed out by --objective enum "
                                                           "(docs/semi-supervised.md)")),
        ("--labels", "labels", dict(type=_positive_int, metavar="N",
                                    help="--semi-supervised: N labelled training points, N // C per class, drawn "
                                         "with --label-seed and listed in RUN_DIR/labels.json (required there)")),
        ("--label-seed", "label_seed", dict(type=_non_negative_int, metavar="S",
                                            help="--semi-supervised: seed of the draw of the labelled points (another "
                                                 "S, another set of --labels N points)")),
        ("--aux-weight", "aux_weight", dict(type=_non_negative_float, metavar="A",
                                            help="--semi-supervised: weight of log q(y|x) per labelled point "
                                                 "(default 46, Pyro's ss-vae value; Kingma et al.'s alpha = 0.1 N "
                                                 "is 0.1 N / N_l per labelled point)")),
        ("--unlabelled-per-labelled", "unlabelled_per_labelled",
         dict(type=_positive_int, metavar="K", help="--semi-supervised: one labelled minibatch before every K "
                                                     "unlabelled ones; an epoch is one pass over the unlabelled "
                                                     "points (default 10)")),
    ]


def _objective_options() -> list:
    return [
        ("--objective", "objective", dict(choices=list(OBJECTIVES), help="; ".join(
            f"{name}: {spec.summary}" for name, spec in OBJECTIVES.items()))),
        ("--num-particles", "num_particles", dict(type=_positive_int, help="z samples per data point (K; default 1)")),
        ("--estimator", "estimator", dict(choices=list(ESTIMATORS), help="iwae/renyi gradient estimator "
                                                                         "(default iwae)")),
        ("--alpha", "alpha", dict(type=_unit_float, help="renyi: alpha in [0, 1) (default 0.5)")),
        ("--beta", "beta", dict(type=_positive_float, help="analytic: KL weight (beta-VAE; default 1)")),
        ("--kl-warmup", "kl_warmup", dict(type=_non_negative_int, help="epochs to anneal beta from 0")),
    ]


def _optimization_options() -> list:
    return [
        ("--epochs", "epochs", dict(type=_positive_int, help="epochs to train (with --resume: the new total)")),
        ("--batch-size", "batch_size", dict(type=_positive_int, help="minibatch size")),
        ("--lr", "lr", dict(type=_positive_float, help="Adam learning rate")),
        ("--lr-schedule", "lr_schedule", dict(choices=list(LR_SCHEDULES), help="per-epoch learning rate: constant, "
                                              "exponential or cosine decay to --lr-final, or burda (pass i of 3^i "
                                              "epochs at lr 10^(-i/7), 3280 epochs)")),
        ("--lr-final", "lr_final", dict(type=_positive_float, help="the last epoch's learning rate for exponential "
                                        "(default lr/100) and cosine (default 0)")),
        ("--adam-eps", "adam_eps", dict(type=_positive_float, help="Adam's epsilon (Burda et al. use 1e-4)")),
        ("--patience", "patience", dict(type=_positive_int, help="stop after N epochs without a better validation "
                                        "ELBO (default: never)")),
        ("--seed", "seed", dict(type=int, help="seed of weights, data order and noise")),
        ("--device", "device", dict(choices=["auto", "cpu", "cuda", "mps"], help="where to train")),
        ("--compile", "compile", dict(action="store_true", default=None,
                                      help="capture the training step of any model into one graph per batch shape "
                                           "and compile it (CUDA graphs on a GPU); eager, after one line naming "
                                           "the cause, where capture fails")),
        ("--checkpoint-every", None, dict(help="checkpoint interval: N epochs, or Nsteps (e.g. 500steps) for "
                                               "optimizer steps (default 1 epoch)")),
        ("--on-nan", "on_nan", dict(choices=["stop", "skip"], help="a non-finite loss stops training, or its step is "
                                                                   "skipped (at most half an epoch)")),
    ]


#: options that may accompany --resume (everything else is fixed by the run's config.json)
_RESUMABLE = {"epochs", "device", "compile"}


def _add_train(sub):
    p = sub.add_parser("train", help="train a VAE and write a run directory",
                       description="Train a VAE by SVI and write config.json, metrics.jsonl, checkpoint.pt and "
                                   "figures into a run directory.",
                       formatter_class=_HelpFormatter)
    for flag, field, kwargs in _train_options():
        kwargs = dict(kwargs)
        if field is not None and kwargs.get("action") != "store_true" and getattr(_D, field) is not None:
            kwargs["help"] += f" (default: {_format_default(getattr(_D, field))})"
        kwargs.setdefault("default", None)
        p.add_argument(flag, **kwargs)
    p.add_argument("--out", default=None, help="run directory (default runs/<timestamp>)")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue a run from its last checkpoint (only --epochs, --device and --compile may change; "
                        "default: start a new run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_trust_code(p)
    p.set_defaults(func=_cmd_train)


def _add_trust_code(p) -> None:
    p.add_argument("--trust-code", action="store_true",
                   help="load a run of a model of your own (train --model): this executes the run's copy of its "
                        "model code (RUN_DIR/model.py), so pass it only for runs you trust")


def _format_default(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _given(args) -> dict:
    """RunConfig fields (and --rank/--flow-steps/--checkpoint-every) that were passed on the command line."""
    given = {}
    for flag, field, _ in _train_options():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            given[field or flag[2:].replace("-", "_")] = value
    return given


def _config(given: dict) -> RunConfig:
    fields = {k: v for k, v in given.items() if k not in ("rank", "flow_steps", "checkpoint_every", "model",
                                                          "model_kwargs")}
    if "model_kwargs" in given and "model" not in given:
        raise UsageError("--model-kwargs applies to --model FILE.py:CLASS")
    if "model" in given:
        vae_options = [k for k in _VAE_OPTIONS if k in given]
        if vae_options:
            flags = ", ".join("--" + k.replace("_", "-") for k in vae_options)
            raise UsageError(f"{flags} {'builds' if len(vae_options) == 1 else 'build'} the built-in VAE, not "
                             "--model: pass your model's own options in --model-kwargs")
        fields["user_model"] = {"spec": given["model"], "kwargs": given.get("model_kwargs", {})}
    if given.get("semi_supervised") and "objective" not in given:
        fields["objective"] = "enum"  # (M2 sums its label out: TraceEnum_ELBO)
    if "hierarchy" in given and "z_dim" in given:
        raise UsageError("--z-dim is the single-layer VAE's latent size; --hierarchy D1,D2,... gives the latent "
                         "sizes of every layer")
    guide_kwargs = {k: given[k] for k in ("rank", "flow_steps") if k in given}
    if guide_kwargs:
        fields["guide_kwargs"] = guide_kwargs
    if "checkpoint_every" in given:
        fields["checkpoint_every"], fields["checkpoint_steps"] = _checkpoint_interval(given["checkpoint_every"])
    return RunConfig(**fields)


def _cmd_train(args):
    given = _given(args)
    if args.resume:
        if args.out:
            raise UsageError("give either --resume RUN_DIR or --out DIR, not both")
        fixed = sorted(set(given) - _RESUMABLE)
        if fixed:
            flags = ", ".join("--" + k.replace("_", "-") for k in fixed)
            raise UsageError(f"{flags} cannot change a run being resumed (its config.json fixes them; only "
                             "--epochs, --device and --compile can): start a new run with --out instead")
        run_dir = resume_run(args.resume, epochs=given.get("epochs"), device=given.get("device"),
                             compile=given.get("compile"), progress=not args.no_progress, trust_code=args.trust_code)
    else:
        run_dir = train_run(_config(given), args.out, progress=not args.no_progress)
    if world().rank == 0:
        try:
            draw_run_figures(load_run(run_dir, trust_code=True))  # its code was just run (or --trust-code given)
        except KeyboardInterrupt:  # training is over and saved: only the figures are missing
            raise KeyboardInterrupt(f"interrupted while drawing the figures; {run_dir} has finished training: "
                                    f"draw them with pyro-vae plot {run_dir}") from None
        print(f"run written to {run_dir}")


def _checkpoint_interval(text: str) -> tuple[int, int]:
    """'3' -> every 3 epochs; '500steps' -> every 500 optimizer steps (and at each epoch end)."""
    t = text.strip().lower()
    steps = t.endswith("steps") or t.endswith("step")
    num = t.removesuffix("steps").removesuffix("step") if steps else t.removesuffix("epochs").removesuffix("epoch")
    if not num.isdigit() or int(num) < 1:
        raise UsageError(f"--checkpoint-every must be a positive number of epochs or e.g. 500steps, got {text!r}")
    return (1, int(num)) if steps else (int(num), 0)


# ---------------------------------------------------------------------------------------------- evaluate
def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="test-set ELBO (and NLL) of a run -> RUN_DIR/eval.json",
                       formatter_class=_HelpFormatter)
    p.add_argument("run_dir", help="a run directory written by pyro-vae train")
    p.add_argument("--num-samples", type=_non_negative_int, default=5000,
                   help="importance samples per test point for test_nll (Burda et al.: 5000); 0 skips it")
    p.add_argument("--test-points", type=_positive_int, default=None,
                   help="evaluate only the first N test points, for a quick look (default: the whole test set)")
    p.add_argument("--checkpoint", choices=["last", "best"], default="last",
                   help="the last checkpoint, or best.pt (the best validation ELBO; a semi-supervised run: the lowest validation error)")
    p.add_argument("--compile", action="store_true", help="compute the log weights on a captured, compiled graph")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="test points per pass")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"], help="where to evaluate")
    p.add_argument("--refine-steps", type=_non_negative_int, default=0,
                   help="test-time refinement: also report the ELBO and NLL of the encoder's posterior refined by N "
                        "SVI steps per point (refined_elbo, refined_nll; docs/gaps.md); 0 skips it")
    _add_trust_code(p)
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args):
    run = load_run(args.run_dir, best=args.checkpoint == "best", trust_code=args.trust_code)
    result = evaluate_run(run, num_samples=args.num_samples, batch_size=args.batch_size, max_points=args.test_points,
                          device=resolve_device(args.device), progress=True, write=False, compile=args.compile,
                          refine_steps=args.refine_steps)
    print(json.dumps(result, indent=2))
    try:
        write_eval(run, result)
    except OSError as e:  # a read-only run folder: the result is printed, not lost
        raise UsageError(f"could not write {Path(args.run_dir) / EVAL} ({e.strerror or e}); the result is "
                         "printed above only") from None


# ---------------------------------------------------------------------------------------------- sample / plot
def _add_sample(sub):
    p = sub.add_parser("sample", help="decode draws from the prior into an image grid",
                       formatter_class=_HelpFormatter)
    p.add_argument("run_dir", help="a run directory written by pyro-vae train")
    p.add_argument("-n", type=_positive_int, default=64, help="number of samples")
    p.add_argument("--out", default=None, help="image path (default RUN_DIR/samples-N[-labelK][-draw].png)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prior draws")
    p.add_argument("--draw", action="store_true", help="draw x ~ p(x|z) instead of showing E[x|z]")
    p.add_argument("--label", type=int, default=None,
                   help="conditional and semi-supervised runs: generate only this class (required for them)")
    _add_trust_code(p)
    p.set_defaults(func=_cmd_sample)


def _cmd_sample(args):
    run = load_run(args.run_dir, trust_code=args.trust_code)
    torch.manual_seed(args.seed)
    if run.config.user_model is not None or run.config.hierarchy is not None:
        return _sample_own_model(run, args)
    if args.label is None and run.vae.grid_conditions() is not None:
        raise UsageError("this run generates one class at a time (conditional or semi-supervised): give --label K "
                         "to choose the class")
    suffix = (f"-label{args.label}" if args.label is not None else "") + ("-draw" if args.draw else "")
    out = Path(args.out) if args.out else Path(args.run_dir) / f"samples-{args.n}{suffix}.png"
    try:
        save_samples(run.vae, out, args.n, mean=not args.draw, label=args.label)
    except OSError as e:
        raise UsageError(f"could not write {out} ({e.strerror or e}): choose another --out") from None
    print(f"samples written to {out}")


def _sample_own_model(run, args):
    """``pyro-vae sample`` of a run of the user's own model or a hierarchy: pyro.infer.Predictive on
    model(None, batch_size=n)."""
    if args.label is not None:
        raise UsageError("--label applies to conditional runs of the built-in VAE")
    out = Path(args.out) if args.out else Path(args.run_dir) / f"samples-{args.n}{'-draw' if args.draw else ''}.png"
    like = prepare_eval_data(run.vae, run.load_data().x_test[:2], run.config.binarize).to(module_dtype(run.vae))
    try:
        save_samples(run.vae, out, args.n, mean=not args.draw, like=like)
    except OSError as e:
        raise UsageError(f"could not write {out} ({e.strerror or e}): choose another --out") from None
    print(f"samples written to {out}")


def _add_plot(sub):
    p = sub.add_parser("plot", help="redraw a run's figures", formatter_class=_HelpFormatter)
    p.add_argument("run_dir", help="a run directory written by pyro-vae train")
    p.add_argument("--latent", default="pca", choices=["pca", "tsne"], help="projection for z_dim > 2")
    _add_trust_code(p)
    p.set_defaults(func=_cmd_plot)


def _cmd_plot(args):
    run = load_run(args.run_dir, trust_code=args.trust_code)
    try:
        paths = draw_run_figures(run, latent_method=args.latent)
    except OSError as e:
        raise UsageError(f"could not write the figures into {args.run_dir} ({e.strerror or e})") from None
    for path in paths:
        print(path)


# ---------------------------------------------------------------------------------------------- studies
def _add_gradient_variance(sub):
    p = sub.add_parser("gradient-variance",
                       help="score-function vs reparameterization gradient variance (toy study or a run)",
                       formatter_class=_HelpFormatter)
    p.add_argument("run_dir", nargs="?", help="a run whose encoder gradients to study (or --toy)")
    p.add_argument("--toy", action="store_true", help="the toy problem min_phi E_{x~N(phi,1)}[x^2]")
    p.add_argument("--phi", type=float, default=None, help="toy: the parameter phi (default 1.0)")
    p.add_argument("--repetitions", type=_positive_int, default=None,
                   help="gradient draws per estimator (default 1000 toy, 100 VAE)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="VAE study: the fixed minibatch size (default 64)")
    p.add_argument("--estimators", default=None, help="comma-separated, e.g. reparam,score,dreg-5 "
                                                       "(default: all of them)")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR, or runs/gradient-variance for --toy)")
    p.set_defaults(func=_cmd_gradient_variance)


def _cmd_gradient_variance(args):
    if args.toy == bool(args.run_dir):
        raise UsageError("give either --toy or a RUN_DIR")
    ignored = [flag for flag, value in (("--batch-size", args.batch_size), ("--estimators", args.estimators))
               if value is not None] if args.toy else (["--phi"] if args.phi is not None else [])
    if ignored:  # options of the other study would do nothing
        raise UsageError(f"{', '.join(ignored)} {'applies' if len(ignored) == 1 else 'apply'} to the "
                         f"{'VAE study (RUN_DIR)' if args.toy else 'toy study (--toy)'} only")
    if args.toy:
        rows = study.toy_gradient_study(phi=1.0 if args.phi is None else args.phi,
                                        repetitions=args.repetitions or 1000)
        paths = study.write_toy_study(Path(args.out or Path("runs") / "gradient-variance"), rows)
    else:
        try:
            run = load_run(args.run_dir)
        except UntrustedCodeError:
            raise UsageError("the gradient-variance study takes runs of the built-in VAE, not of a model of your "
                             "own (--model)") from None
        if run.config.conditional or run.config.semi_supervised:
            raise UsageError("the gradient-variance study takes unconditional runs, not conditional or semi-supervised "
                             "ones (with a label y)")
        x = prepare_eval_data(run.vae, run.load_data().x_test, run.config.binarize)[: args.batch_size or 64]
        names = args.estimators.split(",") if args.estimators else list(study.DEFAULT_VAE_ESTIMATORS)
        torch.manual_seed(0)
        rows = study.vae_gradient_study(run.vae.model, run.vae.guide, list(run.vae.encoder.parameters()), x,
                                        estimators=names, repetitions=args.repetitions or 100)
        paths = study.write_vae_study(Path(args.out or args.run_dir), rows)
    print(Path(paths["md"]).read_text())
    for p in paths.values():
        print(p)


# ---------------------------------------------------------------------------------------------- gaps
def _add_gaps(sub):
    p = sub.add_parser("gaps", help="amortization and approximation gaps of a run (Cremer et al., 2018)",
                       description="Split the inference gap log p(x) - ELBO of test points into the approximation "
                                   "gap (the family) and the amortization gap (the encoder): per-point posteriors "
                                   "optimised by SVI; writes gaps.json, gaps.md and figures (docs/gaps.md).",
                       formatter_class=_HelpFormatter)
    p.add_argument("run_dir", help="a run directory written by pyro-vae train")
    p.add_argument("--families", default=None,
                   help="comma-separated posterior families to optimise per point (flow = an IAF; any of "
                        f"{', '.join(sorted(POSTERIORS))}); default {','.join(DEFAULT_FAMILIES)}, and for a model "
                        f"of your own or a hierarchy {','.join(OWN_MODEL_FAMILIES)} over all local latents of a "
                        "point together")
    p.add_argument("--steps", type=_positive_int, default=500, help="SVI steps of each local optimisation")
    p.add_argument("--test-points", type=_positive_int, default=200, help="the first N test points")
    p.add_argument("--num-samples", type=_positive_int, default=5000, help="importance samples for log p(x)")
    p.add_argument("--num-particles", type=_positive_int, default=4, help="particles per SVI step")
    p.add_argument("--elbo-particles", type=_positive_int, default=100, help="particles per ELBO estimate")
    p.add_argument("--lr", type=_positive_float, default=0.01, help="Adam learning rate (decays to lr/10)")
    p.add_argument("--checkpoint", choices=["last", "best"], default="last",
                   help="the last checkpoint, or best.pt (the best validation ELBO; a semi-supervised run: the lowest validation error)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Monte Carlo draws")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"], help="where to compute")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR)")
    _add_trust_code(p)
    p.set_defaults(func=_cmd_gaps)


def _gap_families(text: str) -> list[str]:
    names = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in names if f not in POSTERIORS and f != "flow"]
    if not names or unknown:
        raise UsageError(f"--families: unknown family {', '.join(unknown) or repr(text)}; choose among flow, "
                         f"{', '.join(sorted(POSTERIORS))}")
    if len({"flow" if f == "iaf" else f for f in names}) != len(names):
        raise UsageError(f"--families lists a family twice: {text}")
    return names


def _cmd_gaps(args):
    run = load_run(args.run_dir, best=args.checkpoint == "best", trust_code=args.trust_code)
    if run.config.semi_supervised:
        raise UsageError("pyro-vae gaps optimises per-point posteriors q(z|x); a semi-supervised run's posterior "
                         "q(y, z|x) also holds the label y, which it does not take")
    traced = run.config.user_model is not None or run.config.hierarchy is not None  # many latent sites
    families = _gap_families(args.families or ",".join(OWN_MODEL_FAMILIES if traced else DEFAULT_FAMILIES))
    device = resolve_device(args.device)
    vae, data = run.vae.to(device).eval(), run.load_data()
    x = prepare_eval_data(vae, data.x_test.to(device), run.config.binarize)[: args.test_points]
    x = x.to(module_dtype(vae))
    c = data.y_test.to(device)[: x.shape[0]] if run.config.conditional else None
    torch.manual_seed(args.seed)
    options = dict(steps=args.steps, num_samples=args.num_samples, num_particles=args.num_particles,
                   elbo_particles=args.elbo_particles, lr=args.lr, progress=True)
    report = (model_inference_gaps(vae.model, vae.guide, x, families, **options) if traced else
              inference_gaps(vae, x, c, families, **options))
    report.update(run=str(args.run_dir), checkpoint=run.checkpoint, epoch=run.epoch)
    out = Path(args.out or args.run_dir)
    try:
        paths = write_gaps(report, out)
    except OSError as e:
        raise UsageError(f"could not write the gap report into {out} ({e.strerror or e}): choose another --out") \
            from None
    print(gaps_markdown(report))
    for path in paths:
        print(path)


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyro-vae", description="Variational autoencoders the Pyro way.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_evaluate, _add_sample, _add_plot, _add_gradient_variance, _add_gaps):
        add(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # the trainer reports a non-finite loss itself (--on-nan), once
            warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
            args.func(args)
    except (UsageError, DataError, ValueError, DistributedConfigError) as e:
        print(f"pyro-vae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a missing run, an unwritable or full disk: the file and the reason
        where = f"{e.filename}: " if e.filename and e.strerror else ""
        print(f"pyro-vae {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except DivergenceError as e:
        print(f"pyro-vae {args.command}: diverged: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # TrainingInterrupted says how to resume
        print(f"pyro-vae {args.command}: {str(e) or 'interrupted'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
