"""The run configuration: one dataclass, saved as ``config.json`` beside the checkpoint."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

__all__ = ["RunConfig"]

#: the objective options; None means "not given" (the objective's own default)
OBJECTIVE_OPTIONS = ("num_particles", "estimator", "beta", "alpha")


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
    scale_param: str = "softplus"  # encoder scales: softplus | exp
    init_output_bias: str = "data-mean"  # data-mean | zero | default (PyTorch's init)
    conditional: bool = False  # condition on the class label (ConditionalVAE)
    prior: str = "standard"  # conditional prior p(z|c): standard | learned
    num_classes: int | None = None  # filled in from the dataset for conditional runs
    # a model of the user's own (--model FILE.py:CLASS): {spec, class, kwargs, sha256, input_shape}; its source
    # is the run's model.py (pyro_vae.user_model). The VAE options above do not apply to it.
    user_model: dict | None = None
    # objective (options left at None take the objective's default)
    objective: str = "analytic"
    num_particles: int | None = None
    estimator: str | None = None
    beta: float | None = None
    alpha: float | None = None
    kl_warmup: int = 0
    # optimization
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    lr_schedule: str = "constant"  # constant | exponential | cosine | burda
    lr_final: float | None = None
    adam_eps: float = 1e-8
    patience: int | None = None  # epochs without a better validation ELBO before stopping
    seed: int = 0
    device: str = "auto"
    compile: bool = False  # the loss under torch.compile
    checkpoint_every: int = 1  # epochs
    checkpoint_steps: int = 0  # optimizer steps; 0 = only at epoch ends
    on_nan: str = "stop"  # stop | skip

    def __post_init__(self):
        self.hidden = tuple(int(h) for h in self.hidden)

    def objective_options(self) -> dict:
        """The objective options that were given (not None)."""
        return {k: getattr(self, k) for k in OBJECTIVE_OPTIONS if getattr(self, k) is not None}

    def check(self) -> None:
        """Raise ValueError naming the first option out of range."""
        positive = {"epochs": self.epochs, "batch-size": self.batch_size, "z-dim": self.z_dim,
                    "checkpoint-every": self.checkpoint_every}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"--{name} must be at least 1, got {value}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.num_particles is not None and self.num_particles < 1:
            raise ValueError(f"--num-particles must be at least 1, got {self.num_particles}")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"--hidden sizes must be positive, got {list(self.hidden)}")
        if self.kl_warmup < 0:
            raise ValueError(f"--kl-warmup must be >= 0, got {self.kl_warmup}")
        if not self.adam_eps > 0:
            raise ValueError(f"--adam-eps must be positive, got {self.adam_eps}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"--patience must be at least 1, got {self.patience}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d) -> "RunConfig":
        """A config from a dict (a parsed ``config.json``); unknown fields and non-objects are errors."""
        if not isinstance(d, dict):
            raise ValueError(f"a run configuration must be a JSON object, got a {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**_legacy_options(dict(d)))


def _legacy_options(d: dict) -> dict:
    """Configs written before objective options could be 'not given' stored every default: drop those that
    the objective does not take (estimator 'iwae' outside iwae/renyi, beta 1.0 outside analytic)."""
    objective = d.get("objective", "elbo")
    if d.get("estimator") == "iwae" and objective not in ("iwae", "renyi"):
        d["estimator"] = None
    if d.get("beta") == 1.0 and objective != "analytic":
        d["beta"] = None
    return d
