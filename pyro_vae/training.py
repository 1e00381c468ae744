"""The SVI loop, and ``train_run``: config -> data + VAE + objective -> training -> run directory.

Each step reads like the algorithm: draw a minibatch, draw noise (inside the objective), compute the
objective's loss and its gradient, update. The objective is any ``pyro.infer.ELBO`` used as a loss
(``objective.differentiable_loss(model, guide, x)``: Pyro's "ELBO as a module" pattern), optimized with one
torch Adam over the VAE's parameters. That is SVI with a single foreach optimizer instead of one PyroOptim
per parameter tensor, and it is what lets data-parallel training all-reduce gradients.
Losses are accumulated on the device; the host reads them once per epoch (no per-step sync).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

import pyro

from .config import RunConfig
from .data import DataError, binarize, check_data, is_binary, load_dataset, TEST_BINARIZATION_SEED
from .runs import BEST, CHECKPOINT, CONFIG, METRICS, read_metrics, atomic_write_bytes, build_vae, load_checkpoint, save_checkpoint

__all__ = ["fit", "train_run", "train_step", "make_adam", "resolve_device", "resolve_objective", "prepare_eval_data", "DivergenceError"]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an unavailable explicit device is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available (use --device auto or cpu)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' requested but MPS is not available (use --device auto or cpu)")
    return torch.device(name)


def resolve_objective(objective="elbo", *, num_particles: int = 1, estimator: str = "iwae", beta: float = 1.0):
    """An objective name (``elbo``, ``analytic``, ``iwae``, ...) or a ``pyro.infer.ELBO`` instance."""
    if isinstance(objective, pyro.infer.ELBO):
        return objective
    from .objectives import make_objective

    return make_objective(objective, num_particles=num_particles, estimator=estimator, beta=beta)


def _needs_binarization(vae, x: torch.Tensor, mode: str) -> bool:
    if mode not in ("auto", "dynamic", "none"):
        raise ValueError(f"unknown binarize mode {mode!r}; choose auto, dynamic or none")
    if mode == "none" or not vae.likelihood.binary:
        return False
    if mode == "dynamic":
        return True
    return not is_binary(x)


def prepare_eval_data(vae, x: torch.Tensor, binarize_mode: str = "auto") -> torch.Tensor:
    """Validation / test data as the likelihood sees it: Bernoulli runs binarize it once, with a fixed seed,
    so every run and every evaluation uses the same binary test set."""
    if _needs_binarization(vae, x, binarize_mode):
        x = binarize(x, torch.Generator(device=x.device).manual_seed(TEST_BINARIZATION_SEED))
    vae.likelihood.check_data(x)
    return x


def _batches(data, batch_size, conditional=False):
    """Tuples of model arguments: ``(x,)``, or ``(x, c)`` for a conditional VAE, from a tensor, an (x, c) pair of
    tensors, or a DataLoader of x or (x, y) items."""
    if isinstance(data, torch.Tensor):
        data = (data,)
    if isinstance(data, tuple) and all(isinstance(t, torch.Tensor) for t in data):
        for i in range(0, data[0].shape[0], batch_size):
            yield tuple(t[i:i + batch_size] for t in data)
    else:
        for item in data:
            item = tuple(item) if isinstance(item, (tuple, list)) else (item,)
            yield item[:2] if conditional else item[:1]


@torch.no_grad()
def mean_loss(objective, vae, data, batch_size: int = 512) -> float:
    """The objective's loss per data point over ``data`` (e.g. -ELBO), accumulated without per-batch syncs."""
    total, n = None, 0
    for batch in _batches(data, batch_size, getattr(vae, "conditional", False)):
        loss = objective.differentiable_loss(vae.model, vae.guide, *batch)
        total = loss if total is None else total + loss
        n += batch[0].shape[0]
    return float(total) / n


def _split_condition(data, name):
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise DataError(f"{name} for a conditional VAE must be a pair (x, c) of data and conditions")
    return data[0], data[1]


def _check_condition(vae, c, n, name):
    c = torch.as_tensor(c)
    if c.shape[0] != n:
        raise DataError(f"the {name} conditions have {c.shape[0]} rows for {n} data points")
    try:
        vae.condition(c[:1])
    except ValueError as e:
        raise DataError(f"{name} conditions: {e}") from None
    if vae.num_classes is not None:
        from .data import check_labels

        check_labels(c, n, vae.num_classes, name=f"{name} labels")
    else:
        check_data(c, vae.condition_shape, name=f"{name} conditions")
    return c


def _loader_is_valid(loader, vae):
    try:
        first = next(iter(loader))
    except StopIteration:
        raise DataError("the DataLoader is empty (0 batches)") from None
    x = first[0] if isinstance(first, (tuple, list)) else first
    check_data(x, vae.input_shape, name="the DataLoader's first batch")


class DivergenceError(FloatingPointError):
    """Training produced a non-finite loss or gradient."""


class _ObjectiveLoss(torch.nn.Module):
    """The objective as a module: forward(x[, c]) = the objective's loss, so DistributedDataParallel can wrap it.

    For a VAE's own model and guide it uses the trace-free path of :mod:`pyro_vae.direct` (the same loss and
    gradients as Pyro's traced computation, without the tracing overhead) unless ``direct=False``.
    """

    def __init__(self, vae, objective, direct: bool = True):
        super().__init__()
        self.vae = vae
        self.objective = objective
        from .direct import direct_loss_fn

        self.direct = direct_loss_fn(objective, vae) if direct else None

    def forward(self, *args):
        if self.direct is not None:
            return self.direct(*args)
        return self.objective.differentiable_loss(self.vae.model, self.vae.guide, *args)


def make_adam(params, lr: float, device: torch.device) -> torch.optim.Adam:
    """One Adam over all parameters: the fused kernel on CPU and CUDA (one pass over every tensor, about 0.3 ms
    per step cheaper than foreach on the 784-400-20 VAE here), foreach elsewhere."""
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.Adam(params, lr=lr, fused=True)
        except (RuntimeError, TypeError):  # an older torch without fused Adam on this device
            pass
    return torch.optim.Adam(params, lr=lr, foreach=True)


def train_step(loss_fn, optimizer, params, batch, guard: str = "none"):
    """One SVI step: the objective's loss on a minibatch, its gradient, an Adam update.

    The gradient is that of the loss per data point. ``guard``: ``"none"``; ``"check"`` raises
    :class:`DivergenceError` on a non-finite loss (one host sync; free on the CPU); ``"skip"`` returns None
    without updating when the loss or a gradient is non-finite. Returns the detached loss.
    """
    loss = loss_fn(*batch)
    optimizer.zero_grad(set_to_none=True)
    (loss / batch[0].shape[0]).backward()
    if guard == "skip" and not (bool(torch.isfinite(loss)) and _grads_finite(params)):
        return None
    if guard == "check" and not bool(torch.isfinite(loss)):
        raise DivergenceError("non-finite loss")
    optimizer.step()
    return loss.detach()


def _grads_finite(params) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True


def fit(vae, train, val=None, *, objective="elbo", num_particles: int = 1, estimator: str = "iwae",
        epochs: int = 10, batch_size: int = 128, lr: float = 1e-3, beta: float = 1.0, kl_warmup: int = 0,
        binarize_mode: str = "auto", seed: int = 0, device="cpu", progress: bool = True, on_epoch=None,
        on_step_checkpoint=None, checkpoint_steps: int = 0, on_nan: str = "stop",
        resume_state: dict | None = None) -> list[dict]:
    """Train ``vae`` by SVI on ``train`` (tensor, numpy array or DataLoader); returns per-epoch metrics.

    Per epoch it records ``train_loss`` (the objective's loss per data point; for the ELBO objectives this is
    -ELBO in nats), ``val_elbo`` (the ELBO per validation point, one reparameterized sample) and wall time.
    Bernoulli likelihoods on grayscale data get a fresh binarization every epoch (dynamic binarization) and a
    validation set binarized once with a fixed seed.

    ``on_epoch(metrics, state)`` receives the checkpoint state after each epoch, ``on_step_checkpoint(state)``
    every ``checkpoint_steps`` optimizer steps; ``resume_state`` (either kind) continues a run exactly where
    it stopped, including the RNG streams, so the result equals an uninterrupted run.
    ``on_nan="stop"`` raises :class:`DivergenceError` at the first non-finite loss (before any update is saved);
    ``"skip"`` drops steps with a non-finite loss or gradient and counts them in ``skipped_steps``.

    Under ``torchrun`` the gradients are averaged across processes by DistributedDataParallel; each process
    takes ``batch_size`` points of every global minibatch of ``batch_size * world_size``.
    """
    from .distributed import all_reduce_sum, setup, shard

    device = resolve_device(device) if isinstance(device, str) else device
    w = setup(device)
    objective = resolve_objective(objective, num_particles=num_particles, estimator=estimator, beta=beta)
    if kl_warmup and not hasattr(objective, "beta"):
        raise ValueError("kl_warmup needs an objective with a KL weight beta (e.g. objective='analytic')")
    if batch_size < 1 or epochs < 0 or not lr > 0:
        raise ValueError(f"need batch_size >= 1, epochs >= 0 and lr > 0 (got {batch_size}, {epochs}, {lr})")
    if on_nan not in ("stop", "skip"):
        raise ValueError(f"on_nan must be 'stop' or 'skip', got {on_nan!r}")
    conditional = getattr(vae, "conditional", False)
    is_tensor = not isinstance(train, torch.utils.data.DataLoader)
    train_c = val_c = None
    if conditional and is_tensor:
        train, train_c = _split_condition(train, "training data")
        val, val_c = _split_condition(val, "validation data") if val is not None else (None, None)
    if is_tensor:
        train = check_data(train, vae.input_shape, name="training data").to(device)
        if train_c is not None:
            train_c = _check_condition(vae, train_c, train.shape[0], "training").to(device)
        dynamic = _needs_binarization(vae, train, binarize_mode)
        if not dynamic:
            vae.likelihood.check_data(train)
    else:
        _loader_is_valid(train, vae)
        dynamic = False
    if val is not None and not isinstance(val, torch.utils.data.DataLoader):
        val = prepare_eval_data(vae, check_data(val, vae.input_shape, name="validation data").to(device),
                                binarize_mode)
        if val_c is not None:
            val = (val, _check_condition(vae, val_c, val.shape[0], "validation").to(device))
    vae.to(device)
    pyro.set_rng_seed(seed + w.rank)  # each process draws its own noise
    generator = torch.Generator(device=device).manual_seed(seed)  # the same data order on every process
    params = list(vae.parameters())
    optimizer = make_adam(params, lr, device)
    loss_fn = _ObjectiveLoss(vae, objective)
    if w.distributed:
        from torch.nn.parallel import DistributedDataParallel

        loss_fn = DistributedDataParallel(loss_fn, device_ids=[device.index] if device.type == "cuda" else None)
    start, skip, global_step, partial = 0, 0, 0, (0.0, 0)
    if resume_state is not None:
        vae.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        start = int(resume_state["epoch"])
        skip = int(resume_state.get("step_in_epoch", 0))
        global_step = int(resume_state.get("global_step", 0))
        partial = (float(resume_state.get("partial_loss", 0.0)), int(resume_state.get("partial_count", 0)))
        generator.set_state(resume_state["rng"]["epoch_generator" if skip else "generator"])
    val_objective = pyro.infer.Trace_ELBO(max_plate_nesting=1)
    history = []
    bar = _progress(range(start, epochs), progress and w.rank == 0, start, epochs)

    def state(epoch, step_in_epoch=0, epoch_generator=None, total=None, n=0):
        rng = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
        if epoch_generator is not None:
            rng["epoch_generator"] = epoch_generator
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        return {"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
                "partial_loss": 0.0 if total is None else float(total), "partial_count": n,
                "model": vae.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng,
                "input_shape": list(vae.input_shape)}

    for epoch in bar:
        if kl_warmup:
            objective.beta = beta * min(1.0, (epoch + 1) / kl_warmup)
        t0 = time.perf_counter()
        vae.train()
        epoch_generator = generator.get_state()
        with pyro.validation_enabled(False):
            total = torch.full((), partial[0] if skip else 0.0, device=device)
            n, skipped = (partial[1] if skip else 0), 0
            if is_tensor:
                xs = binarize(train, generator) if dynamic else train
                perm = torch.randperm(xs.shape[0], generator=generator, device=device)
                arrays = (xs,) if train_c is None else (xs, train_c)
                batches = (tuple(a[shard(idx, w)] for a in arrays) for idx in perm.split(batch_size * w.size))
            else:
                batches = (tuple(t.to(device) for t in b) for b in _batches(train, batch_size, conditional))
            if resume_state is not None and epoch == start:  # the noise stream continues from the checkpoint
                torch.set_rng_state(resume_state["rng"]["torch"])
                if device.type == "cuda" and "cuda" in resume_state["rng"]:
                    torch.cuda.set_rng_state(resume_state["rng"]["cuda"], device)
            guard = on_nan if on_nan == "skip" else ("check" if device.type == "cpu" else "none")
            for step_in_epoch, batch in enumerate(batches):
                if step_in_epoch < skip:
                    continue
                try:
                    loss = train_step(loss_fn, optimizer, params, batch, guard)
                except DivergenceError as e:
                    raise DivergenceError(f"{e} at step {global_step + 1} (epoch {epoch + 1})") from None
                if loss is None:
                    skipped += 1
                    continue
                global_step += 1
                total += loss
                n += batch[0].shape[0]
                if checkpoint_steps and on_step_checkpoint is not None and global_step % checkpoint_steps == 0:
                    if _all_finite(total, params):
                        on_step_checkpoint(state(epoch, step_in_epoch + 1, epoch_generator, total, n))
            skip = 0
            if not _all_finite(total, params):
                raise DivergenceError(f"non-finite loss or parameters in epoch {epoch + 1} "
                                      f"(by step {global_step})")
            totals = all_reduce_sum(torch.stack([total, torch.tensor(float(n), device=device)]), w)
            vae.eval()
            metrics = {"epoch": epoch + 1, "train_loss": (totals[0] / totals[1]).item(), "step": global_step}
            if val is not None and w.rank == 0:
                metrics["val_elbo"] = -mean_loss(val_objective, vae, val)
        metrics["seconds"] = time.perf_counter() - t0
        if hasattr(objective, "beta"):
            metrics["beta"] = float(objective.beta)
        if skipped:
            metrics["skipped_steps"] = skipped
        history.append(metrics)
        if progress and w.rank == 0:
            bar.set_postfix(loss=f"{metrics['train_loss']:.2f}",
                            **({"val_elbo": f"{metrics['val_elbo']:.2f}"} if "val_elbo" in metrics else {}))
        if on_epoch is not None and w.rank == 0:
            on_epoch(metrics, state(epoch + 1))
    return history


def _all_finite(total: torch.Tensor, params) -> bool:
    """One host sync: the accumulated loss and every parameter are finite."""
    checks = [torch.isfinite(total)] + [torch.isfinite(p).all() for p in params]
    return bool(torch.stack(checks).all())


def _progress(it, enabled, start, total):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, initial=start, total=total, desc="epochs", unit="epoch", dynamic_ncols=True)


def _validate_config(config: RunConfig):
    """Everything that can fail before training, checked before the run directory exists."""
    if config.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {config.epochs}")
    if config.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {config.batch_size}")
    if not config.lr > 0:
        raise ValueError(f"--lr must be positive, got {config.lr}")
    if config.z_dim < 1:
        raise ValueError(f"--z-dim must be at least 1, got {config.z_dim}")
    if config.num_particles < 1:
        raise ValueError(f"--num-particles must be at least 1, got {config.num_particles}")
    if any(h < 1 for h in config.hidden):
        raise ValueError(f"--hidden sizes must be positive, got {list(config.hidden)}")
    data = load_dataset(config.dataset, config.data_dir, config.val_fraction, config.seed, config.download)
    if config.conditional:
        config.num_classes = data.num_classes
        if config.network != "mlp":
            raise ValueError("--conditional uses MLP networks (--network mlp)")
    pyro.set_rng_seed(config.seed)  # the initial weights depend on the seed only: runs are reproducible
    vae = build_vae(config, data.input_shape)
    objective = resolve_objective(config.objective, num_particles=config.num_particles,
                                  estimator=config.estimator, beta=config.beta)
    if config.kl_warmup and not hasattr(objective, "beta"):
        raise ValueError("--kl-warmup needs an objective with a KL weight (e.g. --objective analytic)")
    device = resolve_device(config.device)
    if not _needs_binarization(vae, data.x_train, config.binarize):
        vae.likelihood.check_data(data.x_train)
    return data, vae, objective, device


def _new_run_dir(out) -> Path:
    if out is None:
        out = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output directory {out} already exists and is not empty (use --resume {out} to "
                         f"continue it, or choose another --out)")
    return out


def train_run(config: RunConfig, out=None, *, resume: bool = False, progress: bool = True,
              figures: bool = True) -> Path:
    """Train as ``pyro-vae train`` does and return the run directory.

    Bad input (data, options, an occupied output folder) raises before anything is written. With ``resume``,
    ``out`` is an existing run whose config and last checkpoint are loaded and training continues from there.
    Under torchrun every process trains; only rank 0 writes.
    """
    from .distributed import setup, teardown, world

    resume_state = None
    if resume:
        run_dir = Path(out)
        if not (run_dir / CONFIG).exists():
            raise ValueError(f"cannot resume: {run_dir} is not a run directory (no {CONFIG})")
        saved = RunConfig.from_dict(json.loads((run_dir / CONFIG).read_text()))
        if config.epochs != RunConfig.epochs:
            saved.epochs = config.epochs  # --epochs may extend a finished run
        config = saved
        if (run_dir / CHECKPOINT).exists():
            resume_state = load_checkpoint(run_dir / CHECKPOINT)
    elif int(os.environ.get("RANK", "0")) == 0:
        run_dir = _new_run_dir(out)
    else:  # under torchrun only rank 0 checks and writes the folder
        run_dir = Path(out) if out is not None else Path("runs") / "rank-nonzero-unused"
    data, vae, objective, device = _validate_config(config)
    main = setup(device).rank == 0
    created = False
    if main:
        try:
            created = not run_dir.exists()
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            if created:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise ValueError(f"cannot write to output directory {run_dir}: {e.strerror or e}") from None
        if not resume:
            atomic_write_bytes(run_dir / CONFIG, config.to_json().encode())
            (run_dir / METRICS).write_text("")
        elif resume_state is not None:
            _truncate_metrics(run_dir, int(resume_state["epoch"]))
    best = [max((m.get("val_elbo", -math.inf) for m in read_metrics(run_dir)), default=-math.inf)]

    def on_epoch(metrics, state):
        with open(run_dir / METRICS, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if metrics["epoch"] % config.checkpoint_every == 0 or metrics["epoch"] == config.epochs:
            save_checkpoint(run_dir / CHECKPOINT, state)
        if metrics.get("val_elbo", -math.inf) > best[0]:
            best[0] = metrics["val_elbo"]
            save_checkpoint(run_dir / BEST, state)

    try:
        train, val = ((data.x_train, data.y_train), (data.x_val, data.y_val)) if config.conditional else \
            (data.x_train, data.x_val)
        fit(vae, train, val, objective=objective, epochs=config.epochs,
            batch_size=config.batch_size, lr=config.lr, beta=config.beta, kl_warmup=config.kl_warmup,
            binarize_mode=config.binarize, seed=config.seed, device=device, progress=progress,
            on_epoch=on_epoch, on_step_checkpoint=lambda st: save_checkpoint(run_dir / CHECKPOINT, st),
            checkpoint_steps=config.checkpoint_steps, on_nan=config.on_nan, resume_state=resume_state)
    except DivergenceError as e:
        last = run_dir / CHECKPOINT
        where = f"last good checkpoint: {last}" if last.exists() else "no checkpoint was written yet"
        raise DivergenceError(f"{e}; training stopped, {where} (resume with --resume {run_dir})") from None
    except (ValueError, DataError):
        if created and main:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if figures and world().rank == 0:
        from .plots import draw_run_figures
        from .runs import load_run

        draw_run_figures(load_run(run_dir), data)
    teardown()
    return run_dir


def _truncate_metrics(run_dir: Path, epoch: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be recomputed)."""
    path = run_dir / METRICS
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["epoch"] <= epoch]
        atomic_write_bytes(path, "".join(ln + "\n" for ln in lines).encode())
