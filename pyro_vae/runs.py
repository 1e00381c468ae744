"""The run directory: ``config.json``, ``metrics.jsonl``, ``checkpoint.pt``, ``best.pt``; reloads with one call.

:func:`train_run` is what ``pyro-vae train`` does: config -> data + VAE + objective -> :func:`~pyro_vae.fit`
with a :class:`RunWriter` callback -> run directory. :func:`load_run` reloads it and :func:`evaluate_run`
writes ``eval.json``.

Checkpoints hold only tensors and plain containers and are read with ``torch.load(weights_only=True)``, so a
crafted file cannot execute code; the configuration is JSON. A run of a model of the user's own
(``--model FILE.py:CLASS``) also holds that file's source as ``model.py`` (its sha256 in ``config.json``):
loading it executes that code, so :func:`load_run` and :func:`resume_run` need ``trust_code=True``
(:mod:`pyro_vae.user_model`). Writes are atomic (temporary file, fsync, rename):
an interrupted write leaves the previous file intact.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pickletools
import re
import shutil
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

import pyro

from . import analysis, evaluation, user_model
from .conditional import ConditionalVAE
from .config import DEFAULT_HIDDEN, RunConfig
from .data import (DataError, atomic_write, atomic_write_bytes, balanced_labels, load_dataset, needs_binarization,
                   prepare_eval_data)
from .distributed import setup, teardown
from .hierarchical import HierarchicalVAE
from .semisupervised import SemiSupervisedVAE
from .training import Callback, DivergenceError, fit, module_dtype, resolve_device, resolve_objective
from .vae import VAE

__all__ = ["Run", "RunWriter", "train_run", "load_run", "evaluate_run", "atomic_write_bytes", "save_checkpoint",
           "load_checkpoint", "read_metrics", "build_vae", "write_eval", "TrainingInterrupted", "CONFIG", "METRICS",
           "CHECKPOINT", "BEST", "EVAL", "build_model", "build_hierarchy",
           "latents_from_traces"]

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
EVAL = "eval.json"
LABELS = "labels.json"  # a semi-supervised run's labelled training points


# ---------------------------------------------------------------------------------------------- files
def save_checkpoint(path, state: dict) -> None:
    """Atomically save a dict of tensors / plain values with ``torch.save``."""
    atomic_write(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``: no pickled code can run.

    A file that would import something when unpickled (a code payload) is refused as unsafe, naming what it
    imports; a damaged, truncated or foreign file is a different error. Both are ValueErrors of one line.
    """
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the refusal below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        culprit = _foreign_global(str(e)) or _pickle_global(Path(path))
        if culprit:
            raise ValueError(f"refusing to load {path}: it would import {culprit} when unpickled, which a pyro-vae "
                             "checkpoint never does (not a safe pyro-vae checkpoint; nothing in it was run)") from None
        raise ValueError(f"cannot load {path}: the file is damaged, truncated or not a pyro-vae checkpoint "
                         f"({_load_failure(e)})") from None


def _foreign_global(message: str) -> str | None:
    """The non-torch global named by torch's weights-only refusal ("... GLOBAL posix.system ...")."""
    m = re.search(r"GLOBAL ([\w.]+)", message)
    return m.group(1) if m and not m.group(1).startswith("torch.") else None


def _pickle_global(path: Path) -> str | None:
    """The first non-torch global a plain pickle file would import (read with pickletools: nothing runs)."""
    try:
        if zipfile.is_zipfile(path):
            return None  # torch's own format: its refusal above names the global
        strings = []
        for op, arg, _ in pickletools.genops(path.read_bytes()):
            name = None
            if op.name in ("GLOBAL", "INST"):
                name = str(arg).replace(" ", ".")
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                name = f"{strings[-2]}.{strings[-1]}"
            if name and not name.startswith(("torch.", "collections.OrderedDict")):
                return name
            if isinstance(arg, str):
                strings.append(arg)
    except Exception:
        return None
    return None


def _load_failure(e: Exception) -> str:
    """torch's reason in a few words, without its advice to load with ``weights_only=False``."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if isinstance(e, EOFError) or not lines:
        return "unexpected end of file" if isinstance(e, EOFError) else type(e).__name__
    return lines[0].split(". ")[0].rstrip(".")


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    metrics = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            metrics.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number} is not valid JSON ({e.msg})") from None
        if not isinstance(metrics[-1], dict) or not isinstance(metrics[-1].get("epoch"), int):
            raise ValueError(f"{path} line {number} is not a metrics record (a JSON object with an epoch)")
    return metrics


def _truncate_metrics(run_dir: Path, epoch: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be recomputed)."""
    lines = [json.dumps(m) for m in read_metrics(run_dir) if m["epoch"] <= epoch]
    atomic_write_bytes(run_dir / METRICS, "".join(ln + "\n" for ln in lines).encode())


# ---------------------------------------------------------------------------------------------- the model
def build_vae(config: RunConfig, input_shape):
    """Build the (untrained) VAE a config describes."""
    guide_kwargs = dict(config.guide_kwargs)
    if config.scale_param != "softplus":
        guide_kwargs["scale_param"] = config.scale_param
    if config.semi_supervised:
        return SemiSupervisedVAE(input_shape=input_shape, num_classes=config.num_classes, z_dim=config.z_dim,
                                 likelihood=config.likelihood, guide=config.guide, hidden=config.hidden,
                                 activation=config.activation, sigma=config.sigma, guide_kwargs=guide_kwargs,
                                 aux_weight=config.aux_weight)
    if config.conditional:
        if not config.num_classes:
            raise ValueError(f"--conditional needs a labelled dataset; {config.dataset!r} has no classes")
        if config.network != "mlp":
            raise ValueError("--conditional uses MLP networks (--network mlp)")
        return ConditionalVAE(input_shape=input_shape, num_classes=config.num_classes, z_dim=config.z_dim,
                              prior=config.prior, likelihood=config.likelihood, guide=config.guide,
                              hidden=config.hidden, activation=config.activation, sigma=config.sigma,
                              guide_kwargs=guide_kwargs)
    if config.prior == "learned":
        raise ValueError("--prior learned applies to conditional VAEs (--conditional)")
    if config.hierarchy is not None:
        return build_hierarchy(config, input_shape)
    return VAE(input_shape=input_shape, z_dim=config.z_dim, likelihood=config.likelihood, guide=config.guide,
               hidden=DEFAULT_HIDDEN if config.hidden is None else config.hidden, activation=config.activation,
               network=config.network, sigma=config.sigma, guide_kwargs=guide_kwargs, prior=config.prior,
               prior_components=config.prior_components)


def build_hierarchy(config: RunConfig, input_shape) -> HierarchicalVAE:
    """The HierarchicalVAE of ``config.hierarchy`` (latent sizes, z_1 next to x): ``config.hidden`` as the
    deterministic layers of every stochastic layer, or, when None, HierarchicalVAE's (2 d_l, 2 d_l) (with tanh
    and latent sizes (100, 50) Burda et al.'s two-layer architecture); the prior is p(z_L)'s."""
    deterministic = None if config.hidden is None else (tuple(config.hidden),) * len(config.hierarchy)
    return HierarchicalVAE(input_shape, hidden_layers=config.hierarchy, inference=config.inference,
                           activation=config.activation, likelihood=config.likelihood, prior=config.prior,
                           prior_components=config.prior_components, deterministic=deterministic,
                           sigma=config.sigma)


def build_model(config: RunConfig, input_shape, model_class: type | None = None) -> torch.nn.Module:
    """The (untrained) module a config describes: the built-in VAE (:func:`build_vae`), or for a run of the
    user's own model ``model_class(**kwargs)`` (:func:`pyro_vae.user_model.build`)."""
    if config.user_model is None:
        return build_vae(config, input_shape)
    if config.conditional:
        raise ValueError("--conditional applies to the built-in VAE; a model of your own (--model) conditions on "
                         "what its own model(x) reads")
    return user_model.build(model_class, config.user_model.get("kwargs", {}), input_shape)


def _objective(config: RunConfig):
    return resolve_objective(config.objective, **config.objective_options())


# ---------------------------------------------------------------------------------------------- writing a run
class RunWriter(Callback):
    """Writes a run while :func:`~pyro_vae.fit` trains: a line of ``metrics.jsonl`` per epoch, ``checkpoint.pt``
    every ``every_epochs`` epochs (and every ``every_steps`` optimizer steps, and at the end), and ``best.pt``
    whenever the validation score improves (:func:`validation_score`: the validation error of a model that
    classifies, e.g. M2, else the validation ELBO). Only a finite state is ever written."""

    def __init__(self, run_dir, epochs: int, every_epochs: int = 1, every_steps: int = 0):
        self.dir, self.epochs = Path(run_dir), int(epochs)
        self.every_epochs, self.every_steps = int(every_epochs), int(every_steps)
        self.best = max((validation_score(m) for m in read_metrics(self.dir)), default=-math.inf)

    def on_step_end(self, state):
        if self.every_steps and state.global_step % self.every_steps == 0 and state.is_finite():
            save_checkpoint(self.dir / CHECKPOINT, state.checkpoint(epoch_done=False))

    def on_epoch_end(self, state, metrics):
        with open(self.dir / METRICS, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        checkpoint = state.checkpoint(epoch_done=True)
        if metrics["epoch"] % self.every_epochs == 0 or metrics["epoch"] >= self.epochs or state.stop:
            save_checkpoint(self.dir / CHECKPOINT, checkpoint)
        if validation_score(metrics) > self.best:
            self.best = validation_score(metrics)
            save_checkpoint(self.dir / BEST, checkpoint)


def validation_score(metrics: dict) -> float:
    """What ``best.pt`` keeps the maximum of: minus ``val_error`` for a model that classifies (its classifier is
    what a semi-supervised run is for), else ``val_elbo``; -inf for an epoch without validation."""
    if "val_error" in metrics:
        return -metrics["val_error"]
    return metrics.get("val_elbo", -math.inf)


def _validate_config(config: RunConfig, model_class: type | None = None):
    """Everything that can fail before training, checked before the run directory exists. ``model_class``: the
    class of a run of the user's own model (``config.user_model``)."""
    config.check()
    data = load_dataset(config.dataset, config.data_dir, config.val_fraction, config.seed, config.download)
    if config.conditional:
        config.num_classes = data.num_classes
    if config.semi_supervised:
        _choose_labels(config, data)
    pyro.set_rng_seed(config.seed)  # the initial weights depend on the seed only: runs are reproducible
    vae = build_model(config, data.input_shape, model_class)
    if config.user_model is not None:
        config.user_model["input_shape"] = list(data.input_shape)
    objective = _objective(config)
    if config.kl_warmup and not hasattr(objective, "beta"):
        raise ValueError("--kl-warmup needs an objective with a KL weight (e.g. --objective analytic)")
    device = resolve_device(config.device)
    likelihood = getattr(vae, "likelihood", None)  # a model of the user's own: binarization is --binarize alone
    if not needs_binarization(likelihood, data.x_train, config.binarize) and likelihood is not None:
        likelihood.check_data(data.x_train)
    return data, vae, objective, device


def _choose_labels(config: RunConfig, data) -> torch.Tensor:
    """A semi-supervised run's labelled training points: ``config.labels`` indices into the training split,
    balanced per class, drawn with ``config.label_seed`` (:func:`pyro_vae.data.balanced_labels`). Fills in
    ``num_classes`` and the default aux_weight (``SemiSupervisedVAE.DEFAULT_AUX_WEIGHT``) when none was given."""
    if data.y_train is None or not data.num_classes:
        raise ValueError(f"--semi-supervised needs a labelled dataset; {config.dataset!r} has no classes")
    config.num_classes = data.num_classes
    chosen = balanced_labels(data.y_train, config.labels, data.num_classes, config.label_seed)
    if config.aux_weight is None:
        config.aux_weight = SemiSupervisedVAE.DEFAULT_AUX_WEIGHT
    return chosen


def _labels_record(config: RunConfig, data) -> bytes:
    chosen = _choose_labels(config, data)
    counts = torch.bincount(data.y_train[chosen], minlength=config.num_classes).tolist()
    record = {"labels": config.labels, "label_seed": config.label_seed, "num_train": len(data.y_train),
              "per_class": counts, "indices": chosen.tolist(),
              "note": "indices into the training split (the dataset's training set less the validation split of "
                      "val_fraction and seed in config.json); the other training points are unlabelled"}
    return (json.dumps(record) + "\n").encode()


def _user_model_class(config: RunConfig) -> tuple[type | None, bytes | None]:
    """A new run of the user's own model: complete ``config.user_model`` from its ``spec`` (class, sha256) and
    load the class from the original file; (class, source bytes), or (None, None) for the built-in VAE."""
    if config.user_model is None:
        return None, None
    record, source = user_model.user_model_record(config.user_model.get("spec"), config.user_model.get("kwargs"))
    config.user_model = record
    path, name = user_model.parse_spec(record["spec"])
    return user_model.load_class(path, name, record["sha256"]), source


def _new_run_dir(out) -> Path:
    out = Path(out) if out is not None else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: choose another --out")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output directory {out} already exists and is not empty (use --resume {out} to "
                         f"continue it, or choose another --out)")
    return out


def _make_run_dir(run_dir: Path) -> bool:
    """Create (or check) a writable run directory; returns whether it was created here."""
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise ValueError(f"cannot write to output directory {run_dir}: {e.strerror or e}") from None
    return created


def train_run(config: RunConfig, out=None, *, progress: bool = True) -> Path:
    """Train as ``pyro-vae train`` does and return the new run directory (``out``, or ``runs/<timestamp>``).

    Bad input (data, options, an occupied output folder) raises before anything is written. Under torchrun
    every process trains; only rank 0 writes. Figures are drawn by :func:`pyro_vae.plots.draw_run_figures`.
    """
    run_dir = _new_run_dir(out) if int(os.environ.get("RANK", "0")) == 0 else Path(out or "runs/unused")
    model_class, source = _user_model_class(config)
    data, vae, objective, device = _validate_config(config, model_class)
    main = setup(device).rank == 0
    created = False
    if main:
        created = _make_run_dir(run_dir)
        try:
            if source is not None:
                user_model.copy_into_run(run_dir, source)
            atomic_write_bytes(run_dir / CONFIG, config.to_json().encode())
            if config.semi_supervised:
                atomic_write_bytes(run_dir / LABELS, _labels_record(config, data))
            (run_dir / METRICS).write_text("")
        except BaseException:
            if created:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
    return _train(config, run_dir, data, vae, objective, device, None, progress, created)


def resume_run(run_dir, *, epochs: int | None = None, device: str | None = None, compile: bool | None = None,
               progress: bool = True, trust_code: bool = False) -> Path:
    """Continue a run from its last checkpoint (bit-identical to an uninterrupted run on the same device).

    ``epochs`` extends (or shortens) the run and is saved in ``config.json``; a run without a checkpoint
    starts again from its first epoch. A run of the user's own model continues from its copy of the code
    (``model.py``), which needs ``trust_code=True``.
    """
    run_dir = Path(run_dir)
    config = _read_config(run_dir)
    model_class = None
    if config.user_model is not None:
        model_class = user_model.load_from_run(run_dir, config.user_model, trust_code)
    if epochs is not None:
        config.epochs = int(epochs)
    if device is not None:
        config.device = device
    if compile is not None:
        config.compile = bool(compile)
    data, vae, objective, device_ = _validate_config(config, model_class)
    state = load_checkpoint(run_dir / CHECKPOINT) if (run_dir / CHECKPOINT).exists() else None
    main = setup(device_).rank == 0
    if main:
        _make_run_dir(run_dir)
        atomic_write_bytes(run_dir / CONFIG, config.to_json().encode())
        _truncate_metrics(run_dir, int(state["epoch"]) if state is not None else 0)
    return _train(config, run_dir, data, vae, objective, device_, state, progress, False)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train_run` / :func:`resume_run`; the message says how to resume the run."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        try:
            step = int(load_checkpoint(self.run_dir / CHECKPOINT)["global_step"])
            msg = f"interrupted; {self.run_dir} keeps its checkpoint of step {step}: continue with"
        except (OSError, ValueError, KeyError, TypeError):
            msg = f"interrupted before the first checkpoint of {self.run_dir}: start it again with"
        super().__init__(f"{msg} pyro-vae train --resume {self.run_dir}")


def _train(config, run_dir, data, vae, objective, device, resume_state, progress, created) -> Path:
    main = setup(device).rank == 0
    train, val = ((data.x_train, data.y_train), (data.x_val, data.y_val)) if config.conditional else \
        (data.x_train, data.x_val)
    semi = {}
    if config.semi_supervised:  # the chosen points labelled, the rest unlabelled; val_error on the validation labels
        chosen = _choose_labels(config, data)
        unlabelled = torch.ones(len(data.y_train), dtype=torch.bool)
        unlabelled[chosen] = False
        train, val = data.x_train[unlabelled], (data.x_val, data.y_val)
        semi = dict(labelled=(data.x_train[chosen], data.y_train[chosen]),
                    unlabelled_per_labelled=config.unlabelled_per_labelled)
    writer = [RunWriter(run_dir, config.epochs, config.checkpoint_every, config.checkpoint_steps)] if main else []
    try:
        fit(vae, train, val, objective=objective, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
            lr_schedule=config.lr_schedule, lr_final=config.lr_final, adam_eps=config.adam_eps,
            kl_warmup=config.kl_warmup, patience=config.patience, init_output_bias=config.init_output_bias,
            binarize_mode=config.binarize, seed=config.seed, device=device, compile=config.compile,
            progress=progress, callbacks=writer,
            on_nan=config.on_nan, resume_state=resume_state, **semi)
    except KeyboardInterrupt:
        if main:
            raise TrainingInterrupted(run_dir) from None
        raise
    except DivergenceError as e:
        last = run_dir / CHECKPOINT
        if created and not last.exists():  # nothing to resume from: leave nothing behind
            if main:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise DivergenceError(f"{e}; training stopped before the first checkpoint, so {run_dir} was removed "
                                  "(a smaller --lr may help)") from None
        where = f"last good checkpoint: {last}" if last.exists() else "no checkpoint was written"
        raise DivergenceError(f"{e}; training stopped, {where} (resume with --resume {run_dir})") from None
    except (ValueError, DataError):
        if created and main:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    teardown()
    return run_dir


# ---------------------------------------------------------------------------------------------- reading a run
def _read_config(run_dir: Path) -> RunConfig:
    path = run_dir / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a pyro-vae run directory (no {CONFIG})")
    try:
        d = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file (not UTF-8)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    try:
        if isinstance(d, dict):
            _check_config_types(d)
            _upgrade_config(d)
        config = RunConfig.from_dict(d)
        config.check()
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
    return config


def _upgrade_config(d: dict) -> None:
    """Reads a config.json written under an earlier default: ``unlabelled_per_labelled`` defaulted to 1 before it
    became 10, and every run recorded it, so a run that is not semi-supervised with the old default 1 gets the
    current default (the field has no effect there)."""
    if not d.get("semi_supervised") and d.get("unlabelled_per_labelled") == 1:
        d["unlabelled_per_labelled"] = RunConfig.unlabelled_per_labelled


#: JSON checks of the field annotations of RunConfig (strings: ``from __future__ import annotations``)
_JSON_TYPES = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "dict": lambda v: isinstance(v, dict),
    "None": lambda v: v is None,
    "tuple[int, ...]": lambda v: isinstance(v, list) and all(_JSON_TYPES["int"](h) for h in v),
}


_TYPE_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
               "dict": "a JSON object", "None": "null", "tuple[int, ...]": "a list of integers"}


def _check_config_types(d: dict) -> None:
    """Each known field of a parsed config.json has its annotated type (e.g. ``"z_dim": "ten"`` is an error
    naming the field, not ``invalid literal for int()`` from deep inside)."""
    for f in dataclasses.fields(RunConfig):
        if f.name not in d or not isinstance(f.type, str):
            continue
        kinds = [k.strip() for k in f.type.split("|")]
        if all(k in _JSON_TYPES for k in kinds) and not any(_JSON_TYPES[k](d[f.name]) for k in kinds):
            expected = " or ".join(_TYPE_NAMES[k] for k in kinds)
            raise ValueError(f"field {f.name!r} must be {expected}, got {json.dumps(d[f.name])}")


@dataclass
class Run:
    """A loaded run: its folder, configuration, trained VAE and per-epoch metrics."""

    dir: Path
    config: RunConfig
    vae: torch.nn.Module
    metrics: list
    epoch: int
    checkpoint: str = CHECKPOINT

    def load_data(self):
        """The run's dataset, split exactly as in training."""
        c = self.config
        return load_dataset(c.dataset, c.data_dir, c.val_fraction, c.seed)


def load_run(run_dir, map_location="cpu", best: bool = False, trust_code: bool = False) -> Run:
    """Reload a run directory written by ``pyro-vae train`` (or :func:`train_run`).

    ``best=True`` loads the checkpoint with the best validation score (``best.pt``, :func:`validation_score`) instead of the last one. A
    run of the user's own model (``--model FILE.py:CLASS``) is rebuilt from the run's copy of that file
    (``model.py``, checked against its sha256), which executes it: that needs ``trust_code=True``, and without
    it :class:`~pyro_vae.user_model.UntrustedCodeError` (a ValueError) names the file (compare Hugging Face's
    ``trust_remote_code``). Runs of the built-in models need nothing.
    """
    run_dir = Path(run_dir)
    config = _read_config(run_dir)
    model_class = None
    if config.user_model is not None:
        model_class = user_model.load_from_run(run_dir, config.user_model, trust_code)
    name = BEST if best else CHECKPOINT
    if not (run_dir / name).exists():
        raise FileNotFoundError(f"{run_dir} has no {name} (train it first, or it was written before any epoch "
                                "ended)")
    state = load_checkpoint(run_dir / name, map_location)
    if not isinstance(state, dict) or not {"model", "input_shape", "epoch"} <= set(state):
        raise ValueError(f"cannot load {run_dir / name}: not a pyro-vae checkpoint (no model state)")
    input_shape = tuple(state["input_shape"]) or tuple((config.user_model or {}).get("input_shape") or ())
    vae = build_model(config, input_shape, model_class)
    try:
        vae.load_state_dict(state["model"])
    except RuntimeError as e:  # config.json edited after training (another z_dim, guide, ...)
        raise ValueError(f"{run_dir / name} does not fit the VAE that {run_dir / CONFIG} describes (was the "
                         f"config edited?): {str(e).splitlines()[-1].strip()}") from None
    vae.eval()
    return Run(run_dir, config, vae, read_metrics(run_dir), int(state["epoch"]), name)


def evaluate_run(run: Run, *, num_samples: int = 5000, batch_size: int = 256, elbo_particles: int = 10,
                 max_points: int | None = None, device="cpu", progress: bool = False, write: bool = True,
                 compile: bool = False, refine_steps: int = 0) -> dict:
    """Test-set metrics of a run as papers report them, written to ``RUN_DIR/eval.json``.

    ``test_elbo``: the ELBO per test point in nats (``elbo_particles`` reparameterized samples averaged per
    point), ``active_units`` (Burda et al., 2016) and the KL per latent dimension. With ``num_samples=K > 0``
    (5000 by default, Burda et al.'s protocol) also ``test_nll`` = -log p(x) estimated by importance sampling
    with K samples per point (positive nats per data point) and ``test_nll_stderr``, its standard error over
    the test points; ``seconds`` is the evaluation's wall time. The whole test set is used unless
    ``max_points`` takes only the first points (the test order is fixed). ``compile`` computes the
    log-likelihood's log weights on a captured, compiled graph. ``refine_steps=N > 0`` adds test-time refinement
    (:func:`pyro_vae.analysis.refined_evaluation`): ``refined_elbo`` and ``refined_nll`` with the posterior
    refined by N SVI steps per point as the proposal, and the importance sampler's mean Monte Carlo standard
    error and effective sample size with either proposal (``refined_is_stderr``, ``amortized_is_stderr``, ...).

    A run of the user's own model, a hierarchy (``--hierarchy``) or a learned prior (``--prior mog|vamp|flow``)
    gets the same from its traces (:func:`latents_from_traces`): ``active_units`` (summed over its local latent
    sites), ``latent_sites`` (per site, e.g. ``z1`` .. ``zL``: ``dims``, ``active_units``, ``kl_per_dimension``
    of q's marginals against the model's p at the guide's draws;
    :func:`pyro_vae.evaluation.latent_site_statistics`) and ``kl_per_dimension`` of a single site (null
    where p has no Gaussian or factorized marginals: a learned prior); ``refine_steps`` applies to the
    single-layer built-in VAEs only.

    A semi-supervised run (M2) adds ``test_error`` and ``test_error_stderr`` (:func:`_test_bound`).
    """
    device = resolve_device(device) if isinstance(device, str) else device
    data = run.load_data()
    vae = run.vae.to(device).eval()
    own, traced = run.config.user_model is not None, latents_from_traces(run.config)
    if refine_steps and (own or run.config.hierarchy is not None or run.config.semi_supervised):
        what = "a model of your own" if own else "a hierarchy" if run.config.hierarchy else "a semi-supervised run"
        raise ValueError(f"--refine-steps refines the single-layer VAE's encoder, not {what}'s; pyro-vae gaps "
                         "optimises per-point posteriors over all latents of a hierarchy or a model of your own")
    x = prepare_eval_data(vae, data.x_test.to(device), run.config.binarize)[:max_points].to(module_dtype(vae))
    args = (x, data.y_test.to(device)[: x.shape[0]]) if run.config.conditional else (x,)
    result = {"epoch": run.epoch, "checkpoint": run.checkpoint, "num_test": int(x.shape[0])}
    start = time.perf_counter()
    with torch.no_grad():
        result.update(_test_bound(run.config, vae, args, data.y_test.to(device)[: x.shape[0]], elbo_particles,
                                  batch_size))
        if traced:
            result.update(_latent_sites(vae, x, batch_size))
        else:
            result["active_units"] = int(evaluation.active_units(vae, args, batch_size=batch_size))
            kl = evaluation.kl_per_dimension(vae, args, batch_size=batch_size)
            result["kl_per_dimension"] = [float(v) if math.isfinite(v) else None for v in kl.tolist()]
    if num_samples:
        ll = evaluation.log_likelihood(vae.model, vae.guide, args, num_samples=num_samples, batch_size=None,
                                       progress=progress, compile=compile)
        result["test_nll"] = float(-ll.mean())
        result["test_nll_stderr"] = float(ll.std() / len(ll) ** 0.5)
        result["num_samples"] = int(num_samples)
    if refine_steps:
        result.update(analysis.refined_evaluation(vae, *args, steps=refine_steps, num_samples=num_samples,
                                                  elbo_particles=elbo_particles, batch_size=batch_size))
    result["seconds"] = time.perf_counter() - start
    if write:
        write_eval(run, result)
    return result


def _test_bound(config: RunConfig, vae, args: tuple, y, elbo_particles: int, batch_size: int) -> dict:
    """``test_elbo``, the ELBO per test point (``elbo_particles`` draws of z averaged per point). A semi-supervised
    run (M2): U(x) per test point with y summed out (TraceEnum_ELBO, ``elbo_particles`` draws of z per class), and
    ``test_error``, the error of argmax_y q(y|x) on the test labels ``y``, with its binomial standard error
    ``test_error_stderr``; its ``test_nll`` samples y and z from q(y|x) q(z|x,y), and its latent statistics are
    those of q(z|x, argmax_y q(y|x))."""
    if not config.semi_supervised:
        return {"test_elbo": float(evaluation.elbo(vae.model, vae.guide, args, num_particles=elbo_particles,
                                                   batch_size=batch_size).mean())}
    x = args[0]
    wrong = torch.cat([vae.classify(xb) != yb for xb, yb in zip(x.split(batch_size), y.split(batch_size))])
    error = float(wrong.double().mean())
    return {"test_elbo": evaluation.enumerated_elbo(vae.model, vae.guide, x, num_particles=elbo_particles,
                                                    batch_size=batch_size),
            "test_error": error, "test_error_stderr": math.sqrt(error * (1 - error) / len(wrong))}


def latents_from_traces(config: RunConfig) -> bool:
    """Whether a run's latent statistics come from its traces, per site (:func:`_latent_sites`): a model of the
    user's own, a hierarchy (sites z1 .. zL) or a learned prior (no KL to N(0, I) is the model's); the
    single-layer VAE with p(z) = N(0, I) and the conditional VAE keep their closed forms."""
    return config.user_model is not None or config.hierarchy is not None or (
        not config.conditional and config.prior != "standard")


def _latent_sites(vae, x, batch_size: int) -> dict:
    """Latent usage per local latent site of any model (a model of the user's own, a hierarchy, a learned prior;
    :func:`pyro_vae.evaluation.latent_site_statistics`): ``latent_sites`` {site: dims, active_units,
    kl_per_dimension}, ``active_units`` summed over the sites, and ``kl_per_dimension`` of a single site (None
    where the model's p has no Gaussian or factorized marginals, e.g. a learned prior)."""
    sites = evaluation.latent_site_statistics(vae.model, vae.guide, x, batch_size=batch_size)
    for stats in sites.values():
        stats.pop("activity")
    out = {"active_units": sum(s["active_units"] for s in sites.values()), "latent_sites": sites}
    if len(sites) == 1:
        out["kl_per_dimension"] = next(iter(sites.values()))["kl_per_dimension"]
    return out


def write_eval(run: Run, result: dict) -> Path:
    """Write ``result`` to ``RUN_DIR/eval.json``; an unwritable folder is an OSError naming it."""
    path = Path(run.dir) / EVAL
    atomic_write_bytes(path, (json.dumps(result, indent=2) + "\n").encode())
    return path
