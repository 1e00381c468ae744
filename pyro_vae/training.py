"""Training by SVI: :func:`fit` in small parts.

Each step reads like the algorithm: draw a minibatch, draw noise (inside the objective), compute the
objective's loss and its gradient, update. The objective is any ``pyro.infer.ELBO`` used as a loss,
``objective.differentiable_loss(vae.model, vae.guide, *batch)`` (Pyro's "ELBO as a module" pattern), inside
an :class:`ObjectiveModule` that ``DistributedDataParallel`` can wrap, optimized by one torch Adam over the
VAE's parameters. Objectives of :mod:`pyro_vae.objectives` (and Pyro's Trace_ELBO / TraceMeanField_ELBO,
mapped to them) run on the VAE's trace-free particle twin; any other ELBO runs through Pyro's traces.

The parts: :func:`prepare_training_data` (checks, device, binarization mode), :class:`TrainState` (model,
objective, optimizer, random streams and position; what a checkpoint holds), :func:`train_epoch` and
:func:`guarded_step`, and :class:`Callback` objects for progress, KL warm-up and (in :mod:`pyro_vae.runs`)
checkpointing. Losses are accumulated on the device; the host reads them once per epoch.

Any ``pyro.infer.ELBO`` with a ``differentiable_loss`` trains any model, ``pyro.infer.TraceEnum_ELBO``
included: its ``max_plate_nesting``, when not given, is guessed without moving the random streams (resume stays
exact), and values without gradients (validation) use its ``loss``. Semi-supervised training (M2,
:class:`~pyro_vae.semisupervised.SemiSupervisedVAE`): ``fit(m2, x_unlabelled, (x_val, y_val),
labelled=(x_l, y_l), unlabelled_per_labelled=k)``; each epoch is one pass over the unlabelled points with one
labelled minibatch before every k unlabelled ones (:meth:`TrainingData.batches`), and validation reports
``val_error`` (the error of the model's ``classify``) and the ELBO of x with y summed out.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import pyro

from .data import DataError, binarize, check_data, check_labels, needs_binarization, prepare_eval_data
from .compiling import Captured, gradient_program
from .distributed import World, all_reduce_sum, average_gradients, setup, shard
from .objectives import MonteCarloELBO, as_particle_objective, make_objective
from .particles import guess_plate_nesting

#: semi-supervised training's default k: one labelled minibatch before every k unlabelled ones (why 10:
#: docs/semi-supervised.md)
UNLABELLED_PER_LABELLED = 10

__all__ = ["fit", "check_model", "module_dtype", "TrainState", "TrainingData", "prepare_training_data", "train_epoch", "guarded_step",
           "Callback", "ProgressBar", "KLWarmup", "LRSchedule", "EarlyStopping", "learning_rate", "ObjectiveModule",
           "make_adam", "resolve_device", "resolve_objective", "mean_loss", "DivergenceError"]


class DivergenceError(FloatingPointError):
    """Training produced a non-finite loss or gradient."""


# ---------------------------------------------------------------------------------------------- choices
def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an unavailable explicit device is an error."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available (use --device auto or cpu)")
    if name == "mps" and not mps:
        raise ValueError("device 'mps' requested but MPS is not available (use --device auto or cpu)")
    return torch.device(name)


def resolve_objective(objective="elbo", **options) -> pyro.infer.ELBO:
    """An objective by name (options ``num_particles``, ``estimator``, ``beta``, ``alpha``; None = not given)
    or a ``pyro.infer.ELBO`` instance, which carries its own options: giving both is an error."""
    if isinstance(objective, pyro.infer.ELBO):
        given = sorted(k for k, v in options.items() if v is not None)
        if given:
            raise ValueError(f"{', '.join(given)} given together with the objective instance "
                             f"{type(objective).__name__}: set them on the instance (or pass the objective by name)")
        return objective
    return make_objective(objective, **options)


def make_adam(params, lr: float, device: torch.device, eps: float = 1e-8) -> torch.optim.Adam:
    """One Adam over all parameters: the fused kernel on CPU and CUDA (one pass over every tensor), foreach
    elsewhere."""
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.Adam(params, lr=lr, eps=eps, fused=True)
        except (RuntimeError, TypeError):  # an older torch without fused Adam on this device
            pass
    return torch.optim.Adam(params, lr=lr, eps=eps, foreach=True)


#: ``fit(compile=...)``: eager, captured and compiled by Inductor, or captured and run as recorded (no compiler:
#: for checking what capture records, and for tests)
COMPILE_MODES = (False, True, "graph")


#: objective options a captured training step records as constants (a changed value records a new graph)
RECORDED_OPTIONS = ("num_particles", "estimator", "alpha")


class ObjectiveModule(nn.Module):
    """``forward(*batch)``: the objective's loss on a minibatch, as a module that ``DistributedDataParallel``
    can wrap. Pyro's Trace_ELBO / TraceMeanField_ELBO are replaced by their particle equivalents
    (:func:`~pyro_vae.objectives.as_particle_objective`), whose ``surrogate_loss`` (the trace-free twin or the
    traces, plus one formula, no host sync) is the forward; any other ELBO's ``differentiable_loss`` is.

    ``compile=True`` captures the whole training step, the loss and its gradients, of any model into one graph
    per batch shape and compiles it (:class:`~pyro_vae.compiling.Captured`; CUDA graphs on a GPU):
    :meth:`loss_and_grads` then runs it; ``compile="graph"`` runs the recorded graph without a compiler. Where
    capture fails it runs eagerly, after one line naming the cause.
    """

    def __init__(self, vae: nn.Module, objective: pyro.infer.ELBO, compile: bool = False):
        super().__init__()
        self.vae = vae
        self.objective = as_particle_objective(objective) or objective
        bind = getattr(self.objective, "bind", None)  # a particle objective: its producer chosen once
        if bind is not None:
            self._loss = self._value = bind(vae.model, vae.guide)
        else:  # a Pyro ELBO: its differentiable_loss, and its loss for values without gradients
            self._loss, self._value = (
                _settled_plate_nesting(self.objective, vae.model, vae.guide,
                                       functools.partial(method, vae.model, vae.guide))
                for method in (self.objective.differentiable_loss, self.objective.loss))
        self.params = [p for p in vae.parameters() if p.requires_grad]
        self.step = None
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(map(repr, COMPILE_MODES))}, got {compile!r}")
        # the KL weight of our ELBOs enters a captured step as an input, read live (a KL warm-up changes it every
        # epoch); every other option is recorded as a constant and keys the graph
        self.live_beta = isinstance(self.objective, MonteCarloELBO)
        self._beta = None  # (value, its 0-d tensor), see _beta_input
        if compile:
            tensors = self.params + [b for b in vae.buffers() if b.is_floating_point()]  # (integer buffers, such
            # as a flow's permutation, are structure: recorded as constants)
            loss, value = self._loss, self._value
            if self.live_beta:
                loss, value = self._reading_beta(loss), self._reading_beta(value)
            self.step = Captured(gradient_program(loss, self.params), lambda: tensors, prepare=value,
                                 compile=compile != "graph", cuda_graphs=any(p.is_cuda for p in self.params),
                                 name="the training step", constants=self._recorded_options)

    @property
    def compiled(self) -> bool:
        """Whether the training step runs on a captured graph."""
        return self.step is not None and self.step.captured

    @property
    def capture_seconds(self) -> float:
        return 0.0 if self.step is None else self.step.capture_seconds

    @property
    def compile_seconds(self) -> float:
        return 0.0 if self.step is None else self.step.compile_seconds

    def forward(self, *batch):
        return self._loss(*batch)

    def value(self, *batch):
        """The loss on a minibatch without gradients (a Pyro ELBO's ``loss``: its ``differentiable_loss``
        refuses a loss that does not require grad, e.g. under ``torch.no_grad``)."""
        return self._value(*batch)

    def loss_and_grads(self, *batch):
        """(loss, gradients of loss / B for ``self.params``) from the captured step (``compile=True``)."""
        if self.live_beta:
            batch = batch + (self._beta_input(),)
        loss, *grads = self.step(*batch)
        return loss, grads

    def _beta_input(self):
        """beta = 1 (the ELBO itself) as the number, so that its graph has no weighting in it; any other beta as
        a 0-d tensor on the parameters' device, made once per value (no host-to-device copy per step)."""
        beta = float(self.objective.beta)
        if beta == 1:
            return beta
        if self._beta is None or self._beta[0] != beta:
            self._beta = (beta, torch.tensor(beta, dtype=self.params[0].dtype, device=self.params[0].device))
        return self._beta[1]

    def _recorded_options(self) -> tuple:
        """The objective's options that a captured graph holds as constants (:data:`RECORDED_OPTIONS`, and
        ``beta`` of an objective whose formula is not ours): a changed value records a new graph."""
        names = RECORDED_OPTIONS + (() if self.live_beta else ("beta",))
        return tuple((name, getattr(self.objective, name, None)) for name in names)

    def _reading_beta(self, fn):
        """``program(*batch, beta)``: ``fn(*batch)`` with the objective's KL weight set to ``beta`` for the
        call. :meth:`_beta_input` gives beta = 1 as the number (one graph, the unweighted ELBO) and any other beta
        as a 0-d tensor, which a captured graph takes as an input: one graph for every beta of a warm-up."""
        def program(*args):
            *batch, beta = args
            saved, self.objective.beta = self.objective.beta, beta
            try:
                return fn(*batch)
            finally:
                self.objective.beta = saved

        return program


def _settled_plate_nesting(objective, model, guide, loss):
    """``loss`` that first fixes a Pyro ELBO's ``max_plate_nesting`` if it was not given: Pyro guesses it by a
    dry run of model and guide on the first call, which draws from the random stream (a run resumed mid-way
    would then draw other noise than the uninterrupted one); here the same guess is made by
    :func:`~pyro_vae.particles.guess_plate_nesting`, which restores the random streams."""
    if getattr(objective, "max_plate_nesting", None) != math.inf:
        return loss

    def settled(*batch):
        if objective.max_plate_nesting == math.inf:
            nesting = guess_plate_nesting(model, guide, batch, {})
            vectorized = getattr(objective, "vectorize_particles", False) and objective.num_particles > 1
            objective.max_plate_nesting = nesting + int(vectorized)  # (Pyro's rule: the particle plate's dim)
        return loss(*batch)

    return settled


@torch.no_grad()
def mean_loss(objective, vae, args: tuple, batch_size: int = 512) -> float:
    """The objective's loss per data point over the tensors ``args = (x[, c])``, one host sync."""
    module, n = ObjectiveModule(vae, objective), args[0].shape[0]
    total = sum(module.value(*(a[i:i + batch_size] for a in args)) for i in range(0, n, batch_size))
    return float(total) / n


# ---------------------------------------------------------------------------------------------- data
@dataclass
class TrainingData:
    """Training and validation data as the step sees them: tensors on the device, or a DataLoader."""

    x: torch.Tensor | None = None
    c: torch.Tensor | None = None
    loader: object = None
    device: torch.device = torch.device("cpu")
    dynamic: bool = False  # draw a fresh binarization every epoch
    val: tuple | None = None  # validation arguments (x,) or (x, c)
    labelled: tuple | None = None  # semi-supervised training: the labelled points (x_l, y_l); x is unlabelled
    unlabelled_per_labelled: int = UNLABELLED_PER_LABELLED  # k: one labelled minibatch, then k unlabelled ones

    def batches(self, generator: torch.Generator, batch_size: int, world: World):
        """This epoch's minibatches as argument tuples: a permutation (and binarization) from ``generator``,
        each process taking its shard of every global minibatch of ``batch_size * world.size``.

        Semi-supervised (``labelled`` given): the epoch is one pass over the unlabelled points in minibatches
        ``(x,)``, and before every k = ``unlabelled_per_labelled`` of them comes one labelled minibatch
        ``(x_l, y_l)`` of min(batch_size, N_l) points: ceil(m / k) labelled steps for m unlabelled ones (steps
        L U..U L U..U ...). The labelled points are drawn without replacement from fresh permutations, as many as
        the epoch needs, so with few labels each labelled point is seen many times per epoch. Everything is drawn
        from ``generator`` at the epoch's start (a resumed epoch repeats it exactly)."""
        if self.loader is not None:  # items x or (x, y, ...): y is the condition (a plain VAE ignores it)
            return (tuple(t.to(self.device) for t in _loader_item(b)) for b in self.loader)
        xs = binarize(self.x, generator) if self.dynamic else self.x
        perm = torch.randperm(xs.shape[0], generator=generator, device=xs.device)
        arrays = (xs,) if self.c is None else (xs, self.c)
        steps = (tuple(a[shard(idx, world)] for a in arrays) for idx in perm.split(batch_size * world.size))
        return steps if self.labelled is None else self._interleaved(steps, generator, batch_size, world)

    def _interleaved(self, unlabelled, generator: torch.Generator, batch_size: int, world: World):
        """One labelled minibatch before every ``unlabelled_per_labelled`` unlabelled ones (see :meth:`batches`);
        every random draw of the epoch is made here, before the first batch is yielded."""
        x_l, y_l = self.labelled
        x_l = binarize(x_l, generator) if self.dynamic else x_l
        size, k = min(batch_size, x_l.shape[0]) * world.size, self.unlabelled_per_labelled
        needed = -(-_num_batches(self.x.shape[0], batch_size * world.size) // k) * size
        stream = torch.cat([torch.randperm(x_l.shape[0], generator=generator, device=x_l.device)
                            for _ in range(-(-needed // x_l.shape[0]))])[:needed]
        labelled = ((x_l[idx], y_l[idx]) for idx in (shard(i, world) for i in stream.split(size)))
        for j, batch in enumerate(unlabelled):
            if j % k == 0:
                yield next(labelled)
            yield batch


def _num_batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def _loader_item(item) -> tuple:
    return tuple(item)[:2] if isinstance(item, (tuple, list)) else (item,)


def _check_condition(vae, c, n: int, name: str) -> torch.Tensor | None:
    """Conditions checked against the data and the VAE (None for a VAE that takes none: it ignores them).
    A module of the user's own (no ``condition`` method) gets its second argument as given."""
    c = torch.as_tensor(c)
    if c.dim() == 0 or c.shape[0] != n:
        raise DataError(f"the {name} conditions have {c.shape[0] if c.dim() else 0} rows for {n} data points")
    if not hasattr(vae, "condition"):
        return c
    try:
        if vae.condition(c[:1]) is None:
            return None
    except ValueError as e:
        raise DataError(f"{name} conditions: {e}") from None
    if getattr(vae, "num_classes", None) is not None:
        return check_labels(c, n, vae.num_classes, name=f"{name} labels")
    return check_data(c, name=f"{name} conditions")


def _split_pair(data, name: str):
    """``x`` or ``(x, c)``: a pair of arrays is data with its conditions."""
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise DataError(f"{name} must be a tensor x or a pair (x, c) of data and conditions")
        return data[0], data[1]
    return data, None


def module_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype a module computes in: its ``dtype`` attribute, else its first floating parameter's."""
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.get_default_dtype())


def check_model(module) -> None:
    """A module ``fit`` can train: an ``nn.Module`` with Pyro programs ``model(x)`` and ``guide(x)``."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"fit trains a torch.nn.Module with Pyro programs model(x) and guide(x), got "
                        f"{type(module).__name__}")
    missing = [name for name in ("model", "guide") if not callable(getattr(module, name, None))]
    if missing:
        raise TypeError(f"{type(module).__name__} has no {' and no '.join(missing)} method: fit trains a module "
                        "with Pyro programs model(x) and guide(x) (a data plate over the batch)")
    if not any(p.requires_grad for p in module.parameters()):
        raise TypeError(f"{type(module).__name__} has no trainable parameters (fit optimizes module.parameters())")


def _tensor_data(vae, data, name: str, device):
    x, c = _split_pair(data, name)
    x = check_data(x, getattr(vae, "input_shape", None), name=name).to(device=device, dtype=module_dtype(vae))
    if c is not None:
        c = _check_condition(vae, c, x.shape[0], name)
    return x, (None if c is None else c.to(device))


def prepare_training_data(vae, train, val=None, binarize_mode: str = "auto", device="cpu", labelled=None,
                          unlabelled_per_labelled: int = UNLABELLED_PER_LABELLED) -> TrainingData:
    """Check the data once (shape, finiteness, the likelihood's support, conditions) and move it to ``device``.

    ``train``/``val`` are tensors or numpy arrays, pairs ``(x, c)`` for a conditional VAE, or a DataLoader of
    ``x`` or ``(x, y)`` items. A binary likelihood's grayscale training data are binarized afresh every epoch
    (dynamic binarization) and the validation data once with a fixed seed. Semi-supervised training:
    ``train`` is the unlabelled x and ``labelled`` the pair ``(x_l, y_l)`` (see :meth:`TrainingData.batches`)."""
    if labelled is not None:
        return _semi_supervised_data(vae, train, val, binarize_mode, device, labelled, unlabelled_per_labelled)
    if isinstance(train, torch.utils.data.DataLoader):
        first = next(iter(train), None)
        if first is None:
            raise DataError("the DataLoader is empty (0 batches)")
        check_data(_loader_item(first)[0], getattr(vae, "input_shape", None), name="the DataLoader's first batch")
        data = TrainingData(loader=train, device=torch.device(device))
    else:
        x, c = _tensor_data(vae, train, "training data", device)
        likelihood = getattr(vae, "likelihood", None)
        data = TrainingData(x=x, c=c, device=x.device, dynamic=needs_binarization(likelihood, x, binarize_mode))
        if not data.dynamic and likelihood is not None:
            likelihood.check_data(x)
    if val is not None and not isinstance(val, torch.utils.data.DataLoader):
        vx, vc = _tensor_data(vae, val, "validation data", device)
        data.val = (prepare_eval_data(vae, vx, binarize_mode),) + (() if vc is None else (vc,))
    return data


def _semi_supervised_data(vae, train, val, binarize_mode, device, labelled, unlabelled_per_labelled):
    if isinstance(train, torch.utils.data.DataLoader) or isinstance(train, (tuple, list)):
        raise DataError("semi-supervised training (labelled=) takes the unlabelled points as one tensor x")
    if not isinstance(labelled, (tuple, list)) or len(labelled) != 2:
        raise DataError("labelled must be a pair (x, y) of labelled points and their labels")
    k = unlabelled_per_labelled
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"unlabelled_per_labelled must be a positive integer, got {k!r}")
    data = prepare_training_data(vae, train, val, binarize_mode, device)
    x_l, y_l = _tensor_data(vae, labelled, "labelled data", device)
    if y_l is None:
        raise DataError(f"the labelled data need labels y the model reads ({type(vae).__name__} takes none)")
    if not data.dynamic and getattr(vae, "likelihood", None) is not None:
        vae.likelihood.check_data(x_l)
    data.labelled, data.unlabelled_per_labelled = (x_l, y_l), k
    return data


# ---------------------------------------------------------------------------------------------- state
@dataclass
class TrainState:
    """Everything training needs and a checkpoint holds: the model, objective and optimizer, the random
    streams (torch's global generator, which Pyro samples from, and the data generator for permutations and
    binarization), and the position (epoch, step in the epoch, the epoch's partial loss)."""

    vae: nn.Module
    objective: pyro.infer.ELBO
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    generator: torch.Generator
    device: torch.device
    world: World = field(default_factory=World)
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    partial_loss: float = 0.0
    partial_count: int = 0
    epoch_rng: torch.Tensor | None = None  # the data generator's state at the start of this epoch
    stop: bool = False  # set by a callback to end training after this epoch
    extras: dict = field(default_factory=dict)  # callbacks' memory (plain values), kept in checkpoints

    @property
    def objective_module(self) -> ObjectiveModule:
        """The :class:`ObjectiveModule` (unwrapped from DistributedDataParallel)."""
        return getattr(self.loss_fn, "module", self.loss_fn)

    def is_finite(self) -> bool:
        """One host sync: the epoch's partial loss and every parameter are finite (safe to checkpoint)."""
        return _all_finite(torch.as_tensor(self.partial_loss), self.vae)

    def checkpoint(self, epoch_done: bool = True) -> dict:
        """A dict of tensors and plain values: at an epoch's end, or mid-epoch after ``step_in_epoch`` steps.

        The model and optimizer tensors are the live ones (as ``state_dict()`` gives them): save the dict (as
        :class:`~pyro_vae.runs.RunWriter` does) or ``copy.deepcopy`` it before training goes on."""
        rng = {"torch": torch.get_rng_state(), "generator": self.generator.get_state()}
        if not epoch_done:
            rng["epoch_generator"] = self.epoch_rng
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"epoch": self.epoch + (1 if epoch_done else 0),
                "step_in_epoch": 0 if epoch_done else self.step_in_epoch,
                "global_step": self.global_step, "partial_loss": 0.0 if epoch_done else float(self.partial_loss),
                "partial_count": 0 if epoch_done else self.partial_count, "model": self.vae.state_dict(),
                "optimizer": self.optimizer.state_dict(), "rng": rng,
                "input_shape": list(getattr(self.vae, "input_shape", ()) or ()),
                "extras": copy.deepcopy(self.extras)}

    def restore(self, checkpoint: dict) -> None:
        """Continue from a checkpoint: the same parameters, optimizer moments, position and random streams."""
        self.vae.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.epoch, self.step_in_epoch = int(checkpoint["epoch"]), int(checkpoint.get("step_in_epoch", 0))
        self.global_step = int(checkpoint.get("global_step", 0))
        self.partial_loss = float(checkpoint.get("partial_loss", 0.0))
        self.partial_count = int(checkpoint.get("partial_count", 0))
        self.extras = copy.deepcopy(checkpoint.get("extras", {}))
        rng = checkpoint["rng"]
        self.generator.set_state(rng["epoch_generator"] if self.step_in_epoch else rng["generator"])
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)


def _make_state(vae, objective, lr: float, seed: int, device: torch.device, world: World, adam_eps: float,
                compile: bool = False):
    vae.to(device)
    pyro.set_rng_seed(seed + world.rank)  # each process draws its own noise
    generator = torch.Generator(device=device).manual_seed(seed)  # the same data order on every process
    optimizer = make_adam(list(vae.parameters()), lr, device, eps=adam_eps)
    module = ObjectiveModule(vae, objective, compile=compile)
    loss_fn = module
    if world.distributed and not compile:  # (a captured step averages its gradients itself)
        loss_fn = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    return TrainState(vae, module.objective, optimizer, loss_fn, generator, device, world)


# ---------------------------------------------------------------------------------------------- callbacks
class Callback:
    """Hooks into :func:`fit`; every method is optional. ``state`` is the :class:`TrainState`."""

    def on_epoch_start(self, state: TrainState) -> None: ...

    def on_step_end(self, state: TrainState) -> None: ...

    def on_epoch_end(self, state: TrainState, metrics: dict) -> None: ...

    def on_train_end(self, state: TrainState, history: list) -> None: ...


class ProgressBar(Callback):
    """A tqdm bar over epochs showing the loss and the validation ELBO."""

    def __init__(self, epochs: int):
        self.epochs, self.bar = epochs, None

    def on_epoch_start(self, state):
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.epochs, initial=state.epoch, desc="epochs", unit="epoch", dynamic_ncols=True)

    def on_epoch_end(self, state, metrics):
        shown = {"loss": f"{metrics['train_loss']:.2f}"}
        if "val_elbo" in metrics:
            shown["val_elbo"] = f"{metrics['val_elbo']:.2f}"
        self.bar.set_postfix(**shown)
        self.bar.update(1)

    def on_train_end(self, state, history):
        if self.bar is not None:
            self.bar.close()


class KLWarmup(Callback):
    """Anneal the KL weight linearly from 0: beta_e = beta * min(1, (e + 1) / epochs) in epoch e (0-based)
    (Bowman et al., 2016), beta being the objective's own weight when training starts."""

    def __init__(self, epochs: int, beta: float):
        self.epochs, self.beta = int(epochs), float(beta)

    def on_epoch_start(self, state):
        state.objective.beta = self.beta * min(1.0, (state.epoch + 1) / self.epochs)


#: learning-rate schedules, lr_e for epoch e (0-based) of E
LR_SCHEDULES = ("constant", "exponential", "cosine", "burda")
#: Burda et al. (2016), sec. 5: pass i = 0..7 lasts 3^i epochs at lr 10^(-i/7) times the initial lr
BURDA_PASSES = 8


def learning_rate(schedule: str, epoch: int, epochs: int, lr: float, lr_final: float | None = None) -> float:
    """The learning rate of ``epoch`` (0-based) of ``epochs`` under ``schedule``:

    * ``constant``: lr;
    * ``exponential``: lr (lr_final / lr)^(e / (E - 1)), from lr to lr_final (default lr / 100);
    * ``cosine``: lr_final + (lr - lr_final) (1 + cos(pi e / E)) / 2 (Loshchilov & Hutter, 2017; default 0);
    * ``burda``: lr 10^(-i/7) in pass i, where pass i = 0..7 lasts 3^i epochs (3280 epochs in all; Burda,
      Grosse & Salakhutdinov, 2016); a shorter run stops early in the schedule, a longer one stays in pass 7.
    """
    if schedule == "constant":
        return lr
    if schedule == "exponential":
        final = lr / 100 if lr_final is None else lr_final
        return lr * (final / lr) ** (epoch / max(1, epochs - 1))
    if schedule == "cosine":
        final = 0.0 if lr_final is None else lr_final
        return final + (lr - final) * (1 + math.cos(math.pi * epoch / epochs)) / 2
    if schedule == "burda":
        ends = [sum(3 ** j for j in range(i + 1)) for i in range(BURDA_PASSES)]
        return lr * 10 ** (-min(sum(epoch >= end for end in ends), BURDA_PASSES - 1) / 7)
    raise ValueError(f"unknown lr_schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")


class LRSchedule(Callback):
    """Sets the optimizer's learning rate at the start of every epoch to :func:`learning_rate` (a function of
    the epoch alone, so a resumed run follows the same schedule)."""

    def __init__(self, schedule: str, epochs: int, lr: float, lr_final: float | None = None):
        learning_rate(schedule, 0, epochs, lr, lr_final)  # an unknown schedule fails here, before training
        self.schedule, self.epochs, self.lr, self.lr_final = schedule, epochs, lr, lr_final

    def on_epoch_start(self, state):
        for group in state.optimizer.param_groups:
            group["lr"] = learning_rate(self.schedule, state.epoch, self.epochs, self.lr, self.lr_final)


class EarlyStopping(Callback):
    """Stop when the validation ELBO has not improved for ``patience`` epochs. Its memory (best value, epochs
    since) lives in ``state.extras`` and so in checkpoints: a resumed run stops where the original would."""

    def __init__(self, patience: int):
        if int(patience) < 1:
            raise ValueError(f"patience must be a positive number of epochs, got {patience!r}")
        self.patience = int(patience)

    def on_epoch_end(self, state, metrics):
        if "val_elbo" not in metrics:
            return
        memory = state.extras.setdefault("early_stopping", {"best": -math.inf, "since": 0})
        if metrics["val_elbo"] > memory["best"]:
            memory["best"], memory["since"] = metrics["val_elbo"], 0
        else:
            memory["since"] += 1
        if memory["since"] >= self.patience:
            metrics["stopped_early"] = True
            state.stop = True


# ---------------------------------------------------------------------------------------------- steps
def guarded_step(state: TrainState, batch: tuple, guard: str) -> torch.Tensor | None:
    """One SVI step: the objective's loss on a minibatch, the gradient of the loss per data point, an Adam update.

    ``guard``: ``"none"``; ``"check"`` raises :class:`DivergenceError` on a non-finite loss (one host sync,
    cheap on the CPU); ``"skip"`` returns None without updating when the loss or a gradient is non-finite.
    Returns the detached loss.
    """
    module = state.objective_module
    if module.step is not None:  # the captured step: loss and gradients in one graph
        loss, grads = module.loss_and_grads(*batch)
        for p, g in zip(module.params, average_gradients(grads, state.world)):
            p.grad = g
    else:
        loss = state.loss_fn(*batch)
        state.optimizer.zero_grad(set_to_none=True)
        (loss / batch[0].shape[0]).backward()
    if guard == "skip" and not (bool(torch.isfinite(loss)) and _grads_finite(state.vae)):
        return None
    if guard == "check" and not math.isfinite(loss.item()):  # on the CPU: a read, no kernel
        raise DivergenceError(f"non-finite loss at step {state.global_step + 1} (epoch {state.epoch + 1})")
    state.optimizer.step()
    return loss.detach()


def _grads_finite(vae) -> bool:
    grads = [p.grad for p in vae.parameters() if p.grad is not None]
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True


def _all_finite(total: torch.Tensor, vae) -> bool:
    """One host sync: the accumulated loss and every parameter are finite."""
    return bool(torch.stack([torch.isfinite(total)] + [torch.isfinite(p).all() for p in vae.parameters()]).all())


def train_epoch(state: TrainState, data: TrainingData, batch_size: int, guard: str, callbacks=()) -> dict:
    """One pass over the training data from ``state``'s position; returns the epoch's metrics (not validation).

    A mid-epoch position (after a resume) skips the batches already done: the data generator was restored
    to this epoch's start, so the permutation and binarization are the interrupted epoch's."""
    state.epoch_rng = state.generator.get_state()
    total = torch.full((), state.partial_loss, device=state.device)
    skipped, done = 0, state.step_in_epoch
    for i, batch in enumerate(data.batches(state.generator, batch_size, state.world)):
        if i < done:
            continue
        loss = guarded_step(state, batch, guard)
        state.step_in_epoch = i + 1
        if loss is None:
            skipped += 1
            continue
        state.global_step += 1
        total += loss
        state.partial_count += batch[0].shape[0]
        state.partial_loss = total  # a tensor until a checkpoint reads it
        for cb in callbacks:
            cb.on_step_end(state)
    steps = state.step_in_epoch - done
    if not _all_finite(total, state.vae):
        raise DivergenceError(f"non-finite loss or parameters in epoch {state.epoch + 1} (by step {state.global_step})")
    if guard == "skip" and steps and skipped * 2 > steps:
        raise DivergenceError(f"{skipped} of {steps} steps of epoch {state.epoch + 1} had a non-finite loss or "
                              "gradient (--on-nan skip tolerates at most half)")
    totals = all_reduce_sum(torch.stack([total, torch.tensor(float(state.partial_count), device=state.device)]),
                            state.world)
    metrics = {"epoch": state.epoch + 1, "train_loss": (totals[0] / totals[1]).item(), "step": state.global_step}
    if skipped:
        metrics["skipped_steps"] = skipped
    return metrics


def _validate(state: TrainState, data: TrainingData, metrics: dict) -> None:
    """The ELBO per validation point (one reparameterized sample; under an enumerating objective, discrete
    latents summed out), on rank 0. A model that classifies (a ``classify(x)`` method, e.g. M2) with labelled
    validation data ``(x, y)`` gets ``val_error``, the error of ``classify`` on them, and the ELBO of x alone."""
    if data.val is None or state.world.rank != 0:
        return
    args = data.val
    classify = getattr(state.vae, "classify", None)
    if callable(classify) and len(args) == 2:
        args, labels = args[:1], args[1]
        with torch.no_grad():
            metrics["val_error"] = float((classify(args[0]) != labels).double().mean())
    with pyro.validation_enabled(False):
        metrics["val_elbo"] = -mean_loss(_validation_objective(state.objective), state.vae, args)
    if not math.isfinite(metrics["val_elbo"]):
        raise DivergenceError(f"the validation ELBO of epoch {metrics['epoch']} is {metrics['val_elbo']}")


def _validation_objective(objective) -> pyro.infer.ELBO:
    """The ELBO with one particle: Pyro's TraceEnum_ELBO (the training objective's plate nesting) when training
    enumerates, else :class:`~pyro_vae.objectives.MonteCarloELBO`."""
    if isinstance(objective, pyro.infer.TraceEnum_ELBO):
        return pyro.infer.TraceEnum_ELBO(max_plate_nesting=objective.max_plate_nesting,
                                         strict_enumeration_warning=False)
    return MonteCarloELBO()


def _check_enumeration(vae, objective) -> None:
    """A model with discrete latents to sum out (``needs_enumeration``, e.g. M2) trains with TraceEnum_ELBO."""
    if getattr(vae, "needs_enumeration", False) and not isinstance(objective, pyro.infer.TraceEnum_ELBO):
        raise ValueError(f"{type(vae).__name__} sums its discrete latents out exactly: train it with "
                         f"pyro.infer.TraceEnum_ELBO (objective='enum'), not {type(objective).__name__}")


# ---------------------------------------------------------------------------------------------- fit
def fit(vae, train, val=None, *, objective="analytic", epochs: int = 10, batch_size: int = 128, lr: float = 1e-3,
        lr_schedule: str = "constant", lr_final: float | None = None, adam_eps: float = 1e-8, kl_warmup: int = 0,
        patience: int | None = None, init_output_bias: str = "data-mean", binarize_mode: str = "auto",
        on_nan: str = "stop", seed: int = 0, device="cpu", compile: bool = False, progress: bool = True,
        callbacks=(), resume_state: dict | None = None, labelled=None, unlabelled_per_labelled: int = UNLABELLED_PER_LABELLED,
        **objective_options) -> list[dict]:
    """Train ``vae`` by SVI on ``train`` (tensor, numpy array, ``(x, c)`` pair or DataLoader); per-epoch metrics.

    ``vae`` is any ``torch.nn.Module`` with Pyro programs ``model(x)`` and ``guide(x)`` (``(x, c)`` with
    conditions) that put a data plate over the batch: :class:`~pyro_vae.vae.VAE` and its relatives, or a model
    of the user's own. Checks that need an input shape or a likelihood (``vae.input_shape``,
    ``vae.likelihood``) apply where the module has them; binarization is the data option ``binarize_mode``
    (``"dynamic"`` binarizes a user model's data every epoch; ``"auto"`` follows a VAE's likelihood).

    Each epoch records ``train_loss`` (the objective's loss per data point; for the ELBO objectives -ELBO in
    nats), ``val_elbo`` (the ELBO per validation point, one reparameterized sample), ``lr``, ``beta`` when the
    objective has one, and wall time. ``objective`` is a name of :data:`~pyro_vae.objectives.OBJECTIVES` with
    ``objective_options`` (``num_particles``, ``estimator``, ``beta``, ``alpha``), or a ``pyro.infer.ELBO``.

    Optimization: Adam (``lr``, ``adam_eps``) with a per-epoch ``lr_schedule`` (:func:`learning_rate`:
    constant, exponential or cosine towards ``lr_final``, or Burda et al.'s), ``kl_warmup=E`` annealing the
    objective's KL weight from 0 over E epochs (on a copy: the objective passed in is left as it is), and
    ``patience=N`` stopping when the validation ELBO has not improved for N epochs. ``init_output_bias``:
    ``"data-mean"`` (default; skipped for a module without an ``init_output_bias`` method) starts the decoder's output bias at the likelihood's parameters for the mean
    training image (:meth:`pyro_vae.vae.VAE.init_output_bias`; worth about 0.7 nats of test NLL on MNIST,
    docs/benchmarks.md), ``"zero"`` at 0, ``"default"`` leaves PyTorch's initialization. The default
    objective is ``"analytic"`` (the ELBO with closed-form KL: the same bound as Pyro's Trace_ELBO with less
    gradient noise; ``"elbo"`` is Trace_ELBO itself).

    ``compile=True`` captures the training step (loss and gradients) of any model into one graph per batch
    shape and compiles it with Inductor (:class:`~pyro_vae.compiling.Captured`; the same noise and values as
    eager, CUDA graphs on a GPU; the epochs that captured report ``capture_seconds`` and ``compile_seconds``);
    ``compile="graph"`` runs the recorded graph without compiling it. Where capture fails (a host read,
    data-dependent control flow) training runs eagerly after one line on stderr naming the cause. On the
    CPU, denormal floats are flushed to zero while training (:func:`flushed_denormals`: late epochs stay as fast
    as the first). ``callbacks``: :class:`Callback` objects (e.g. :class:`pyro_vae.runs.RunWriter` checkpoints);
    ``resume_state`` (a checkpoint) continues a run exactly where it stopped, random streams included, so
    the result equals an uninterrupted run. ``on_nan="stop"`` raises :class:`DivergenceError` at the first
    non-finite loss; ``"skip"`` drops such steps (counted in ``skipped_steps``; more than half of an epoch is
    an error). Semi-supervised (M2): ``train`` is unlabelled, ``labelled=(x_l, y_l)``, ``unlabelled_per_labelled``
    (module docstring). Under ``torchrun`` the gradients are averaged across processes by DDP; each process takes
    ``batch_size`` points of every global minibatch of ``batch_size * world_size``."""
    device = resolve_device(device) if isinstance(device, str) else device
    check_model(vae)
    objective = resolve_objective(objective, **objective_options)
    _check_options(epochs, batch_size, lr, on_nan, kl_warmup, objective, vae, lr_schedule, lr_final)
    world = setup(device)
    data = prepare_training_data(vae, train, val, binarize_mode, device, labelled, unlabelled_per_labelled)
    if resume_state is None:
        _init_output_bias(vae, data, init_output_bias)
    if kl_warmup:
        objective = copy.copy(objective)
    state = _make_state(vae, objective, lr, seed, device, world, adam_eps, compile)
    if resume_state is not None:
        state.restore(resume_state)
    callbacks = _builtin_callbacks(epochs, lr, lr_schedule, lr_final, kl_warmup, patience, objective) + list(callbacks)
    if progress and world.rank == 0:
        callbacks.append(ProgressBar(epochs))
    guard = on_nan if on_nan == "skip" else ("check" if device.type == "cpu" else "none")
    return _train(state, data, epochs, batch_size, guard, callbacks)


def _train(state: TrainState, data: TrainingData, epochs: int, batch_size: int, guard: str, callbacks) -> list:
    """Epochs from ``state``'s position to ``epochs`` (or a callback's stop); the per-epoch metrics."""
    history = []
    with flushed_denormals(state.device):
        while state.epoch < epochs and not state.stop:
            history.append(_run_epoch(state, data, batch_size, guard, callbacks))
            state.epoch += 1
            state.step_in_epoch, state.partial_loss, state.partial_count = 0, 0.0, 0
    for cb in callbacks:
        cb.on_train_end(state, history)
    return history


@contextlib.contextmanager
def flushed_denormals(device: torch.device):
    """On the CPU, denormal floats (below 1.2e-38 in float32) flushed to zero while training
    (``torch.set_flush_denormal``): as training goes on, some weights' Adam moments and gradients become
    denormal, and x86 arithmetic on them is many times slower; on MNIST a late epoch ran at half the speed of the
    first. Flushing them changes nothing a float32 VAE can resolve. Turned off again afterwards (torch's default)."""
    on = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if on:
            torch.set_flush_denormal(False)


def _builtin_callbacks(epochs, lr, lr_schedule, lr_final, kl_warmup, patience, objective) -> list:
    """KL warm-up and the learning-rate schedule (at epoch start), early stopping (first at epoch end)."""
    callbacks = [LRSchedule(lr_schedule, epochs, lr, lr_final)]
    if kl_warmup:
        callbacks.append(KLWarmup(kl_warmup, objective.beta))
    if patience is not None:
        callbacks.append(EarlyStopping(patience))
    return callbacks


OUTPUT_BIAS_INITS = ("default", "zero", "data-mean")


def _init_output_bias(vae, data: TrainingData, how: str) -> None:
    if how not in OUTPUT_BIAS_INITS:
        raise ValueError(f"unknown init_output_bias {how!r}; choose one of {', '.join(OUTPUT_BIAS_INITS)}")
    if how == "default":
        return
    if not hasattr(vae, "init_output_bias"):  # a module of the user's own: its initialization is its own
        if how == "zero":
            raise ValueError(f"init_output_bias='zero' needs a model with an init_output_bias(mean) method; "
                             f"{type(vae).__name__} has none")
        return
    vae.init_output_bias(_mean_image(data) if how == "data-mean" else None)


def _mean_image(data: TrainingData) -> torch.Tensor:
    """The mean training image (one pass over a DataLoader)."""
    if data.x is not None:
        return data.x.mean(0)
    total, n = None, 0
    for item in data.loader:
        x = _loader_item(item)[0].to(data.device)
        total = x.sum(0) if total is None else total + x.sum(0)
        n += x.shape[0]
    return total / n


def _run_epoch(state: TrainState, data: TrainingData, batch_size: int, guard: str, callbacks) -> dict:
    """One epoch with its callbacks and validation."""
    for cb in callbacks:
        cb.on_epoch_start(state)
    module = state.objective_module
    t0, captured, compiled = time.perf_counter(), module.capture_seconds, module.compile_seconds
    state.vae.train()
    with pyro.validation_enabled(False):
        metrics = train_epoch(state, data, batch_size, guard, callbacks)
    state.vae.eval()
    _validate(state, data, metrics)
    metrics["seconds"] = time.perf_counter() - t0
    metrics["lr"] = state.optimizer.param_groups[0]["lr"]
    if module.capture_seconds > captured:
        metrics["capture_seconds"] = module.capture_seconds - captured
    if module.compile_seconds > compiled:
        metrics["compile_seconds"] = module.compile_seconds - compiled
    if hasattr(state.objective, "beta"):
        metrics["beta"] = float(state.objective.beta)
    for cb in callbacks:
        cb.on_epoch_end(state, metrics)
    return metrics


def _check_lr_schedule(lr_schedule, lr_final, lr) -> None:
    if lr_final is not None and lr_schedule not in ("exponential", "cosine"):
        raise ValueError(f"lr_final (--lr-final) applies to the exponential and cosine schedules, not "
                         f"{lr_schedule!r}")
    if lr_final is not None and not (0 < lr_final <= lr or (lr_schedule == "cosine" and lr_final == 0)):
        raise ValueError(f"lr_final must be in (0, lr = {lr}] (cosine: [0, lr]), got {lr_final}")


def _check_options(epochs, batch_size, lr, on_nan, kl_warmup, objective, vae, lr_schedule, lr_final) -> None:
    if batch_size < 1 or epochs < 0 or not lr > 0:
        raise ValueError(f"need batch_size >= 1, epochs >= 0 and lr > 0 (got {batch_size}, {epochs}, {lr})")
    if on_nan not in ("stop", "skip"):
        raise ValueError(f"on_nan must be 'stop' or 'skip', got {on_nan!r}")
    if kl_warmup and not hasattr(objective, "beta"):
        raise ValueError("kl_warmup needs an objective with a KL weight beta (e.g. objective='analytic')")
    _check_lr_schedule(lr_schedule, lr_final, lr)
    _check_enumeration(vae, objective)
