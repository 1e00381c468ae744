"""The run configuration: one dataclass, saved as ``config.json`` beside the checkpoint."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

__all__ = ["RunConfig"]

#: the objective options; None means "not given" (the objective's own default)
OBJECTIVE_OPTIONS = ("num_particles", "estimator", "beta", "alpha")

#: the single-layer VAE's hidden sizes when ``hidden`` is not given (with ``hierarchy``, None keeps
#: HierarchicalVAE's default (2 d_l, 2 d_l) per layer)
DEFAULT_HIDDEN = (256,)
#: p(z) of the VAE and of a hierarchy's top layer (the names of ``pyro_vae.priors.PRIORS``), and the
#: conditional VAE's priors p(z|c)
PRIORS = ("standard", "mog", "vamp", "flow")
CONDITIONAL_PRIORS = ("standard", "learned")
#: priors with K components (``prior_components``)
MIXTURE_PRIORS = ("mog", "vamp")
#: a hierarchy's inference directions (``pyro_vae.hierarchical.INFERENCE``)
INFERENCE = ("bottom-up", "top-down")


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
    z_dim: int = 10  # the single-layer VAE's (a hierarchy's latent sizes are ``hierarchy``)
    hidden: tuple[int, ...] | None = None  # None: DEFAULT_HIDDEN, or with a hierarchy (2 d_l, 2 d_l) per layer
    activation: str = "relu"
    network: str = "mlp"
    likelihood: str = "bernoulli"
    sigma: str | None = None
    guide: str = "diagonal"
    guide_kwargs: dict = field(default_factory=dict)
    scale_param: str = "softplus"  # encoder scales: softplus | exp
    init_output_bias: str = "data-mean"  # data-mean | zero | default (PyTorch's init)
    conditional: bool = False  # condition on the class label (ConditionalVAE)
    # p(z): standard | mog | vamp | flow (the VAE, a hierarchy's top layer); conditional p(z|c): standard | learned
    prior: str = "standard"
    prior_components: int | None = None  # K of the mog / vamp prior (None: the prior's default, 10 / 500)
    num_classes: int | None = None  # filled in from the dataset for conditional runs
    # a HierarchicalVAE (pyro_vae.hierarchical) with these latent sizes (d_1, ..., d_L), z_1 next to x; ``hidden``
    # then gives the deterministic layers of every stochastic layer
    hierarchy: tuple[int, ...] | None = None
    inference: str = "bottom-up"  # a hierarchy's guide: bottom-up | top-down (the ladder VAE)
    # the semi-supervised M2 (pyro_vae.semisupervised): ``labels`` training points keep their labels (balanced
    # per class, drawn with ``label_seed``; their indices are the run's labels.json), the rest are unlabelled
    semi_supervised: bool = False
    labels: int | None = None
    aux_weight: float | None = None  # alpha per labelled point; None: SemiSupervisedVAE.DEFAULT_AUX_WEIGHT (46)
    unlabelled_per_labelled: int = 10  # k: one labelled minibatch, then k unlabelled ones (= fit's default)
    label_seed: int = 0
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
        if self.hidden is None and self.hierarchy is None:
            self.hidden = DEFAULT_HIDDEN
        if self.hidden is not None:
            self.hidden = tuple(int(h) for h in self.hidden)
        if self.hierarchy is not None:
            self.hierarchy = tuple(int(d) for d in self.hierarchy)

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
        if self.hidden is not None and any(h < 1 for h in self.hidden):
            raise ValueError(f"--hidden sizes must be positive, got {list(self.hidden)}")
        if self.kl_warmup < 0:
            raise ValueError(f"--kl-warmup must be >= 0, got {self.kl_warmup}")
        if not self.adam_eps > 0:
            raise ValueError(f"--adam-eps must be positive, got {self.adam_eps}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"--patience must be at least 1, got {self.patience}")
        self._check_prior()
        self._check_hierarchy()
        self._check_semi_supervised()

    def _check_prior(self) -> None:
        if self.user_model is not None and (self.prior != "standard" or self.prior_components is not None):
            raise ValueError("--prior and --prior-components build the built-in VAE's prior; a model of your own "
                             "(--model) defines its own p(z)")
        choices = CONDITIONAL_PRIORS if self.conditional else PRIORS
        if self.prior not in (*PRIORS, *CONDITIONAL_PRIORS):
            raise ValueError(f"--prior must be one of {', '.join(dict.fromkeys(PRIORS + CONDITIONAL_PRIORS))}, "
                             f"got {self.prior!r}")
        if self.prior not in choices:
            raise ValueError(f"--prior learned is the conditional VAE's prior network p(z|c) (--conditional); "
                             f"choose one of {', '.join(PRIORS)}" if self.prior == "learned" else
                             f"--prior {self.prior} is a prior p(z) of the unconditional VAE; --conditional takes "
                             f"--prior {' or '.join(CONDITIONAL_PRIORS)}")
        if self.prior_components is not None:
            if self.prior_components < 1:
                raise ValueError(f"--prior-components must be at least 1, got {self.prior_components}")
            if self.prior not in MIXTURE_PRIORS:
                raise ValueError(f"--prior-components applies to --prior {' or '.join(MIXTURE_PRIORS)}, "
                                 f"not {self.prior}")

    def _check_hierarchy(self) -> None:
        if self.inference not in INFERENCE:
            raise ValueError(f"--inference must be one of {', '.join(INFERENCE)}, got {self.inference!r}")
        if self.hierarchy is None:
            if self.inference != INFERENCE[0]:
                raise ValueError("--inference applies to a hierarchy (--hierarchy D1,D2,...)")
            return
        if not self.hierarchy or min(self.hierarchy) < 1:
            raise ValueError(f"--hierarchy needs positive latent sizes like 100,50, got {list(self.hierarchy)}")
        unsupported = [("--conditional", self.conditional), ("--model", self.user_model is not None),
                       ("--network conv", self.network != "mlp"), (f"--guide {self.guide}", self.guide != "diagonal"),
                       ("--rank/--flow-steps", bool(self.guide_kwargs)),
                       (f"--scale-param {self.scale_param}", self.scale_param != "softplus")]
        given = [flag for flag, on in unsupported if on]
        if given:
            raise ValueError(f"--hierarchy builds a HierarchicalVAE (unconditional, MLPs, diagonal Gaussian layers), "
                             f"which does not take {', '.join(given)}")

    def _check_semi_supervised(self) -> None:
        if not self.semi_supervised:
            given = [flag for flag, on in (("--labels", self.labels is not None), ("--aux-weight",
                     self.aux_weight is not None), ("--unlabelled-per-labelled", self.unlabelled_per_labelled != RunConfig.unlabelled_per_labelled),
                     ("--label-seed", self.label_seed != 0)) if on]
            if given:
                raise ValueError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to "
                                 "--semi-supervised runs")
            return
        if self.labels is None or self.labels < 1:
            raise ValueError("--semi-supervised needs --labels N >= 1, the number of labelled training points"
                             + ("" if self.labels is None else f", got {self.labels}"))
        if self.aux_weight is not None and not 0 <= self.aux_weight < float("inf"):
            raise ValueError(f"--aux-weight must be a number >= 0, got {self.aux_weight}")
        if self.unlabelled_per_labelled < 1:
            raise ValueError(f"--unlabelled-per-labelled must be at least 1, got {self.unlabelled_per_labelled}")
        if isinstance(self.label_seed, bool) or not isinstance(self.label_seed, int) or self.label_seed < 0:
            raise ValueError(f"--label-seed must be an integer >= 0, got {self.label_seed!r}")
        if self.objective != "enum":
            raise ValueError(f"--semi-supervised sums the label out with TraceEnum_ELBO (--objective enum), not "
                             f"--objective {self.objective}")
        unsupported = [("--conditional", self.conditional), ("--model", self.user_model is not None),
                       ("--hierarchy", self.hierarchy is not None), ("--network conv", self.network != "mlp"),
                       (f"--prior {self.prior}", self.prior != "standard"), ("--kl-warmup", self.kl_warmup > 0)]
        given = [flag for flag, on in unsupported if on]
        if given:
            raise ValueError("--semi-supervised builds the M2 model (MLPs, p(z) = N(0, I), trained by "
                             f"TraceEnum_ELBO), which does not take {', '.join(given)}")

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
