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
import shutil
import time
from pathlib import Path

import torch

import pyro

from .config import RunConfig
from .data import DataError, binarize, check_data, is_binary, load_dataset, TEST_BINARIZATION_SEED
from .runs import CHECKPOINT, CONFIG, METRICS, atomic_write_bytes, build_vae, load_checkpoint, save_checkpoint

__all__ = ["fit", "train_run", "resolve_device", "resolve_objective", "prepare_eval_data"]


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


def _batches(data, batch_size, perm=None):
    """Minibatches of a tensor (in ``perm`` order) or of a DataLoader (x or (x, y) items)."""
    if isinstance(data, torch.Tensor):
        n = data.shape[0]
        for i in range(0, n, batch_size):
            yield data[perm[i:i + batch_size]] if perm is not None else data[i:i + batch_size]
    else:
        for item in data:
            yield item[0] if isinstance(item, (tuple, list)) else item


@torch.no_grad()
def mean_loss(objective, vae, data, batch_size: int = 512) -> float:
    """The objective's loss per data point over ``data`` (e.g. -ELBO), accumulated without per-batch syncs."""
    total, n = None, 0
    for xb in _batches(data, batch_size):
        loss = objective.differentiable_loss(vae.model, vae.guide, xb)
        total = loss if total is None else total + loss
        n += xb.shape[0]
    return float(total) / n


def _loader_is_valid(loader, vae):
    try:
        first = next(iter(loader))
    except StopIteration:
        raise DataError("the DataLoader is empty (0 batches)") from None
    x = first[0] if isinstance(first, (tuple, list)) else first
    check_data(x, vae.input_shape, name="the DataLoader's first batch")


def fit(vae, train, val=None, *, objective="elbo", num_particles: int = 1, estimator: str = "iwae",
        epochs: int = 10, batch_size: int = 128, lr: float = 1e-3, beta: float = 1.0, kl_warmup: int = 0,
        binarize_mode: str = "auto", seed: int = 0, device="cpu", progress: bool = True, on_epoch=None,
        resume_state: dict | None = None) -> list[dict]:
    """Train ``vae`` by SVI on ``train`` (tensor, numpy array or DataLoader); returns per-epoch metrics.

    Per epoch it records ``train_loss`` (the objective's loss per data point; for the ELBO objectives this is
    -ELBO in nats), ``val_elbo`` (the ELBO per validation point, one reparameterized sample) and wall time.
    Bernoulli likelihoods on grayscale data get a fresh binarization every epoch (dynamic binarization) and a
    validation set binarized once with a fixed seed. ``on_epoch(metrics, state)`` receives the checkpoint
    state after each epoch; ``resume_state`` (such a state) continues a run.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    objective = resolve_objective(objective, num_particles=num_particles, estimator=estimator, beta=beta)
    if kl_warmup and not hasattr(objective, "beta"):
        raise ValueError("kl_warmup needs an objective with a KL weight beta (e.g. objective='analytic')")
    if batch_size < 1 or epochs < 0 or not lr > 0:
        raise ValueError(f"need batch_size >= 1, epochs >= 0 and lr > 0 (got {batch_size}, {epochs}, {lr})")
    is_tensor = not isinstance(train, torch.utils.data.DataLoader)
    if is_tensor:
        train = check_data(train, vae.input_shape, name="training data").to(device)
        dynamic = _needs_binarization(vae, train, binarize_mode)
        if not dynamic:
            vae.likelihood.check_data(train)
    else:
        _loader_is_valid(train, vae)
        dynamic = False
    if val is not None and not isinstance(val, torch.utils.data.DataLoader):
        val = prepare_eval_data(vae, check_data(val, vae.input_shape, name="validation data").to(device),
                                binarize_mode)
        if val.shape[0] == 0:
            val = None
    vae.to(device)
    pyro.set_rng_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr, foreach=True)
    start = 0
    if resume_state is not None:
        vae.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        torch.set_rng_state(resume_state["rng"]["torch"])
        generator.set_state(resume_state["rng"]["generator"].to(generator.get_state().device))
        if device.type == "cuda" and "cuda" in resume_state["rng"]:
            torch.cuda.set_rng_state(resume_state["rng"]["cuda"], device)
        start = int(resume_state["epoch"])
    val_objective = pyro.infer.Trace_ELBO(max_plate_nesting=1)
    history = []
    bar = _progress(range(start, epochs), progress, start, epochs)
    for epoch in bar:
        if kl_warmup:
            objective.beta = beta * min(1.0, (epoch + 1) / kl_warmup)
        t0 = time.perf_counter()
        vae.train()
        with pyro.validation_enabled(False):
            total, n = torch.zeros((), device=device), 0
            if is_tensor:
                xs = binarize(train, generator) if dynamic else train
                perm = torch.randperm(xs.shape[0], generator=generator, device=device)
                batches = _batches(xs, batch_size, perm)
            else:
                batches = (xb.to(device) for xb in _batches(train, batch_size))
            for xb in batches:
                loss = objective.differentiable_loss(vae.model, vae.guide, xb)
                optimizer.zero_grad(set_to_none=True)
                (loss / xb.shape[0]).backward()
                optimizer.step()
                total += loss.detach()
                n += xb.shape[0]
            vae.eval()
            metrics = {"epoch": epoch + 1, "train_loss": total.item() / n}
            if val is not None:
                metrics["val_elbo"] = -mean_loss(val_objective, vae, val)
        metrics["seconds"] = time.perf_counter() - t0
        if hasattr(objective, "beta"):
            metrics["beta"] = float(objective.beta)
        if not all(math.isfinite(v) for v in metrics.values()):
            raise FloatingPointError(f"non-finite loss at epoch {epoch + 1}: {metrics}")
        history.append(metrics)
        if progress:
            bar.set_postfix(loss=f"{metrics['train_loss']:.2f}",
                            **({"val_elbo": f"{metrics['val_elbo']:.2f}"} if "val_elbo" in metrics else {}))
        if on_epoch is not None:
            rng = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
            if device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(device)
            on_epoch(metrics, {"epoch": epoch + 1, "model": vae.state_dict(),
                               "optimizer": optimizer.state_dict(), "rng": rng,
                               "input_shape": list(vae.input_shape)})
    return history


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
    """
    resume_state = None
    if resume:
        run_dir = Path(out)
        if not (run_dir / CONFIG).exists():
            raise ValueError(f"cannot resume: {run_dir} has no {CONFIG}")
        saved = RunConfig.from_dict(json.loads((run_dir / CONFIG).read_text()))
        saved.epochs = config.epochs if config.epochs != RunConfig.epochs else saved.epochs
        config = saved
        if (run_dir / CHECKPOINT).exists():
            resume_state = load_checkpoint(run_dir / CHECKPOINT)
    else:
        run_dir = _new_run_dir(out)
    data, vae, objective, device = _validate_config(config)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write to output directory {run_dir}: {e.strerror or e}") from None
    created = not resume
    try:
        if not resume:
            atomic_write_bytes(run_dir / CONFIG, config.to_json().encode())
            (run_dir / METRICS).write_text("")
        elif resume_state is not None:
            _truncate_metrics(run_dir, int(resume_state["epoch"]))

        def on_epoch(metrics, state):
            with open(run_dir / METRICS, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if metrics["epoch"] % config.checkpoint_every == 0 or metrics["epoch"] == config.epochs:
                save_checkpoint(run_dir / CHECKPOINT, state)

        fit(vae, data.x_train, data.x_val, objective=objective, epochs=config.epochs,
            batch_size=config.batch_size, lr=config.lr, beta=config.beta, kl_warmup=config.kl_warmup,
            binarize_mode=config.binarize, seed=config.seed, device=device, progress=progress,
            on_epoch=on_epoch, resume_state=resume_state)
    except (ValueError, DataError):
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if figures:
        from .plots import draw_run_figures
        from .runs import load_run

        draw_run_figures(load_run(run_dir), data)
    return run_dir


def _truncate_metrics(run_dir: Path, epoch: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be recomputed)."""
    path = run_dir / METRICS
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["epoch"] <= epoch]
        atomic_write_bytes(path, "".join(ln + "\n" for ln in lines).encode())
