"""The run directory: ``config.json``, ``metrics.jsonl``, ``checkpoint.pt`` and figures; reloads with one call.

Checkpoints hold only tensors and plain containers and are read with ``torch.load(weights_only=True)``, so a
crafted file cannot execute code; the configuration is JSON. Writes are atomic (temporary file, fsync, rename):
an interrupted write leaves the previous file intact.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import RunConfig

__all__ = ["Run", "load_run", "atomic_write_bytes", "save_checkpoint", "load_checkpoint", "read_metrics",
           "build_vae"]

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    _atomic_write(Path(path), lambda f: f.write(data))


def save_checkpoint(path, state: dict) -> None:
    """Atomically save a dict of tensors / plain values with ``torch.save``."""
    _atomic_write(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``: no pickled code can run."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"refusing to load {path}: not a safe pyro-vae checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build_vae(config: RunConfig, input_shape):
    """Build the (untrained) VAE a config describes."""
    from .vae import VAE

    if config.conditional:
        from .conditional import ConditionalVAE

        if not config.num_classes:
            raise ValueError(f"--conditional needs a labelled dataset; {config.dataset!r} has no classes")
        return ConditionalVAE(input_shape=input_shape, num_classes=config.num_classes, z_dim=config.z_dim,
                              prior=config.prior, likelihood=config.likelihood, guide=config.guide,
                              hidden=config.hidden, activation=config.activation, sigma=config.sigma,
                              guide_kwargs=config.guide_kwargs)
    if config.prior != "standard":
        raise ValueError("--prior learned applies to conditional VAEs (--conditional)")
    return VAE(input_shape=input_shape, z_dim=config.z_dim, likelihood=config.likelihood, guide=config.guide,
               hidden=config.hidden, activation=config.activation, network=config.network,
               sigma=config.sigma, guide_kwargs=config.guide_kwargs)


@dataclass
class Run:
    """A loaded run: its folder, configuration, trained VAE and per-epoch metrics."""

    dir: Path
    config: RunConfig
    vae: "torch.nn.Module"
    metrics: list
    epoch: int

    def load_data(self):
        """The run's dataset, split exactly as in training."""
        from .data import load_dataset

        c = self.config
        return load_dataset(c.dataset, c.data_dir, c.val_fraction, c.seed)


def load_run(run_dir, map_location="cpu", best: bool = False) -> Run:
    """Reload a run directory written by ``pyro-vae train`` (or :func:`pyro_vae.training.train_run`).

    ``best=True`` loads the checkpoint with the best validation ELBO (``best.pt``) instead of the last one.
    """
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).exists() or not (run_dir / CHECKPOINT).exists():
        raise FileNotFoundError(f"{run_dir} is not a pyro-vae run directory (needs {CONFIG} and {CHECKPOINT})")
    config = RunConfig.from_dict(json.loads((run_dir / CONFIG).read_text()))
    state = load_checkpoint(run_dir / (BEST if best and (run_dir / BEST).exists() else CHECKPOINT), map_location)
    vae = build_vae(config, tuple(state["input_shape"]))
    vae.load_state_dict(state["model"])
    vae.eval()
    return Run(run_dir, config, vae, read_metrics(run_dir), int(state["epoch"]))


def evaluate_run(run: Run, *, num_samples: int = 0, batch_size: int = 256, elbo_particles: int = 10,
                 max_points: int | None = None, device="cpu", progress: bool = False, write: bool = True) -> dict:
    """Test-set metrics of a run, written to ``RUN_DIR/eval.json``.

    ``test_elbo``: the ELBO per test point in nats (``elbo_particles`` reparameterized samples averaged per
    point). With ``num_samples=K > 0`` also ``test_nll`` = -log p(x) estimated by importance sampling with K
    samples per point (positive nats per data point), ``active_units`` (Burda et al., 2015) and the KL per
    latent dimension. ``max_points`` evaluates only the first test points (the test order is fixed).
    """
    from . import evaluation
    from .training import prepare_eval_data, resolve_device

    device = resolve_device(device) if isinstance(device, str) else device

    data = run.load_data()
    vae = run.vae.to(device).eval()
    x = prepare_eval_data(vae, data.x_test.to(device), run.config.binarize)
    if max_points:
        x = x[:max_points]
    result = {"epoch": run.epoch, "num_test": int(x.shape[0])}
    if vae.conditional:  # model(x, c) with the label as condition; encoders see the whole test set at once
        y = data.y_test.to(device)[: x.shape[0]]
        data_args, encoder, enc_batch = (x, y), (lambda xb: vae.encode(xb, y)), None
    else:
        data_args, encoder, enc_batch = x, vae, batch_size
    with torch.no_grad():
        result["test_elbo"] = float(evaluation.elbo(vae.model, vae.guide, data_args, num_particles=elbo_particles,
                                                    batch_size=batch_size).mean())
        result["active_units"] = int(evaluation.active_units(encoder, x, batch_size=enc_batch))
        kl = evaluation.kl_per_dimension(encoder, x, batch_size=enc_batch)
        result["kl_per_dimension"] = [float(v) if math.isfinite(v) else None for v in kl.tolist()]
    if num_samples:
        ll = evaluation.log_likelihood(vae.model, vae.guide, data_args, num_samples=num_samples, batch_size=None,
                                       progress=progress)
        result["test_nll"] = float(-ll.mean())
        result["test_nll_stderr"] = float(ll.std() / len(ll) ** 0.5)
        result["num_samples"] = int(num_samples)
    if write:
        atomic_write_bytes(Path(run.dir) / "eval.json", (json.dumps(result, indent=2) + "\n").encode())
    return result
