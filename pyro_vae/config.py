"""The run configuration: one dataclass, saved as ``config.json`` beside the checkpoint."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

__all__ = ["RunConfig"]


@dataclass
class RunConfig:
    """Everything needed to rebuild a run: data, VAE, objective and optimization settings."""

    # data
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    val_fraction: float = 0.1
    binarize: str = "auto"  # auto | dynamic | none
    # VAE
    z_dim: int = 10
    hidden: tuple[int, ...] = (256,)
    activation: str = "relu"
    network: str = "mlp"
    likelihood: str = "bernoulli"
    sigma: str | None = None
    guide: str = "diagonal"
    guide_kwargs: dict = field(default_factory=dict)
    conditional: bool = False  # condition on the class label (ConditionalVAE)
    prior: str = "standard"  # conditional prior p(z|c): standard | learned
    num_classes: int | None = None  # filled in from the dataset for conditional runs
    # objective
    objective: str = "elbo"
    num_particles: int = 1
    estimator: str = "iwae"
    beta: float = 1.0
    kl_warmup: int = 0
    # optimization
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 1  # epochs
    checkpoint_steps: int = 0  # optimizer steps; 0 = only at epoch ends
    on_nan: str = "stop"  # stop | skip

    def __post_init__(self):
        self.hidden = tuple(int(h) for h in self.hidden)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**d)
