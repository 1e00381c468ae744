"""Amortized posterior families q(z|x).

A *posterior family* turns the encoder's output features into a distribution over the latent
vector z with ``event_shape == (z_dim,)``. The encoder network only has to produce
``family.num_params`` features per data point; the family owns the parameterization, so the
guide can be swapped (``VAE(..., guide="cholesky")``) without touching the model.

Interface (every family is an :class:`torch.nn.Module`):

* ``family.z_dim``: the latent dimension.
* ``family.num_params``: how many encoder features it consumes.
* ``family(params)``: a Pyro distribution, ``batch_shape == params.shape[:-1]``,
  ``event_shape == (z_dim,)``, sampled with ``rsample`` (reparameterized).
* ``family.mean(params)``: a point summary (posterior mean, or the flow of the base mean).

``params`` may carry any number of leading batch dimensions, e.g. ``(N, P)`` or ``(K, N, P)``.

Families (``POSTERIORS``; d = z_dim; encoder features = ``num_params``):

* ``diagonal``, :class:`DiagonalNormal`: 2d features.
* ``cholesky``, :class:`CholeskyNormal`: 2d + d(d-1)/2 features.
* ``lowrank``, :class:`LowRankNormal`: d (rank + 2) features.
* ``iaf``, :class:`IAFNormal`: 2d + context_dim features, plus the flow's own weights.
* ``laplace``, :class:`DiagonalLaplace`: 2d features.
* ``studentt``, :class:`DiagonalStudentT`: 2d features (plus d learned degrees of freedom with ``learn_df``).

See docs/guides.md ("Swapping guides") for the formulas and when each one helps.
"""
from __future__ import annotations

import inspect
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import pyro.distributions as dist
from pyro.distributions.transforms import ConditionalAffineAutoregressive, Permute
from pyro.nn import ConditionalAutoRegressiveNN

__all__ = [
    "PosteriorFamily",
    "DiagonalNormal",
    "CholeskyNormal",
    "LowRankNormal",
    "IAFNormal",
    "DiagonalLaplace",
    "DiagonalStudentT",
    "positive",
    "make_posterior",
    "POSTERIORS",
]

_MIN_SCALE = 1e-5


def positive(raw: torch.Tensor) -> torch.Tensor:
    """Softplus map to strictly positive scales: sigma = softplus(raw) + 1e-5.

    Softplus grows linearly rather than exponentially, so a large encoder output cannot blow up
    sigma the way ``exp`` can; the floor keeps log sigma finite.
    """
    return F.softplus(raw) + _MIN_SCALE


#: how a family maps raw encoder outputs to positive scales (``scale_param=``, ``--scale-param``)
SCALE_PARAMS = {"softplus": positive, "exp": torch.exp}


def _softplus_inverse(y: float) -> float:
    """x with softplus(x) == y, for y > 0 (used to initialize raw parameters)."""
    return y + math.log(-math.expm1(-y))


class PosteriorFamily(nn.Module):
    """Base class: maps encoder features to q(z|x).

    ``scale_param`` chooses how raw encoder outputs become positive scales: ``"softplus"`` (default),
    sigma = softplus(raw) + 1e-5, or ``"exp"``, sigma = exp(raw) (the raw output is log sigma, as in most
    reference VAE code).
    """

    num_params: int

    def __init__(self, z_dim: int, scale_param: str = "softplus"):
        super().__init__()
        if int(z_dim) < 1:
            raise ValueError(f"z_dim must be a positive integer, got {z_dim!r}")
        if scale_param not in SCALE_PARAMS:
            raise ValueError(f"unknown scale_param {scale_param!r}; choose one of {', '.join(SCALE_PARAMS)}")
        self.z_dim = int(z_dim)
        self.scale_param = scale_param

    def positive(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw encoder outputs -> positive scales, by ``scale_param``."""
        return SCALE_PARAMS[self.scale_param](raw)

    def _check(self, params: torch.Tensor) -> torch.Tensor:
        """Raise a ValueError unless ``params`` has shape (..., num_params)."""
        if not isinstance(params, torch.Tensor) or params.dim() < 1 or params.shape[-1] != self.num_params:
            shape = tuple(params.shape) if isinstance(params, torch.Tensor) else type(params).__name__
            raise ValueError(
                f"{type(self).__name__}(z_dim={self.z_dim}) needs encoder features of shape "
                f"(..., {self.num_params}), got {shape}"
            )
        return params

    def forward(self, params: torch.Tensor) -> dist.TorchDistribution:  # pragma: no cover
        raise NotImplementedError

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return self(params).mean


# --------------------------------------------------------------------------------------------- factorized
class _FactorizedLocScale(PosteriorFamily):
    """A factorized location-scale family: features (mu, raw scale), q = prod_i base(mu_i, scale_i)."""

    def __init__(self, z_dim: int, scale_param: str = "softplus"):
        super().__init__(z_dim, scale_param)
        self.num_params = 2 * self.z_dim

    def coordinates(self, loc: torch.Tensor, scale: torch.Tensor) -> dist.TorchDistribution:
        raise NotImplementedError

    def forward(self, params):
        loc, raw = self._check(params).split(self.z_dim, dim=-1)
        return self.coordinates(loc, self.positive(raw)).to_event(1)

    def mean(self, params):
        return self._check(params)[..., : self.z_dim]


class DiagonalNormal(_FactorizedLocScale):
    """Factorized Gaussian posterior q(z|x) = N(mu(x), diag sigma(x)^2).

    The encoder emits ``2 * z_dim`` features: mu and a raw scale mapped to sigma > 0 (``scale_param``).
    Reparameterization: z = mu + sigma * eps, eps ~ N(0, I) (Kingma & Welling, 2014).
    """

    def coordinates(self, loc, scale):
        return dist.Normal(loc, scale)


class DiagonalLaplace(_FactorizedLocScale):
    """Factorized Laplace posterior q(z|x) = prod_i Laplace(z_i; mu_i(x), b_i(x)).

    Density per coordinate: (1 / 2b) exp(-|z - mu| / b), b > 0 from the raw feature (``scale_param``). The
    encoder emits ``2 * z_dim`` features (mu, raw b). Reparameterized through the inverse CDF,
    z = mu - b sign(u) log(1 - 2|u|), u ~ U(-1/2, 1/2).

    KL(q || N(0, I)) is closed form per coordinate (torch registers Laplace || Normal):
    -log(2b) - 1 + log(2 pi)/2 + (mu^2 + 2 b^2)/2.
    """

    def coordinates(self, loc, scale):
        return dist.Laplace(loc, scale)


class DiagonalStudentT(_FactorizedLocScale):
    """Factorized Student-t posterior q(z|x) = prod_i t_nu_i(z_i; mu_i(x), s_i(x)).

    Density per coordinate: Gamma((nu+1)/2) / (Gamma(nu/2) sqrt(nu pi) s) (1 + ((z - mu)/s)^2 / nu)^(-(nu+1)/2),
    with s > 0 from the raw feature (``scale_param``). The encoder emits ``2 * z_dim`` features (mu, raw s);
    the degrees of freedom nu are global, not amortized: fixed at ``df`` or, with ``learn_df=True``, one
    learned value per latent dimension, nu_i = 2 + softplus(r_i), initialized at ``df``.

    nu must exceed 2: against the N(0, I) prior the ELBO contains E_q[-|z|^2 / 2], which is -inf when q
    has no finite variance (nu <= 2). Sampling is reparameterized (z = mu + s * eps / sqrt(chi2_nu / nu)).
    KL(q || N(0, I)) has no closed form, so objectives estimate it by Monte Carlo.

    Args:
        z_dim: latent dimension d.
        df: degrees of freedom nu (> 2), fixed, or the initial value with ``learn_df``.
        learn_df: learn one nu per latent dimension (a parameter of the family, not of the encoder).
        scale_param: ``"softplus"`` or ``"exp"``.
    """

    def __init__(self, z_dim: int, df: float = 5.0, learn_df: bool = False, scale_param: str = "softplus"):
        super().__init__(z_dim, scale_param)
        df = float(df)
        if not (2.0 < df < math.inf):
            raise ValueError(f"studentt guide needs 2 < df < inf (finite variance), got df={df!r}")
        self.learn_df = bool(learn_df)
        if self.learn_df:
            self.df_raw = nn.Parameter(torch.full((self.z_dim,), _softplus_inverse(df - 2.0)))
        else:
            self.register_buffer("_df", torch.full((self.z_dim,), df), persistent=False)

    def df(self) -> torch.Tensor:
        """Degrees of freedom per latent dimension, shape (z_dim,)."""
        return 2.0 + F.softplus(self.df_raw) if self.learn_df else self._df

    def coordinates(self, loc, scale):
        return dist.StudentT(self.df().to(loc.dtype).expand_as(loc), loc, scale)


# --------------------------------------------------------------------------------------------- full / low rank
class CholeskyNormal(PosteriorFamily):
    """Full-covariance Gaussian posterior q(z|x) = N(mu(x), L(x) L(x)^T).

    Parameterization (numerically stable): L = diag(s) U, where U is unit-lower-triangular (ones on the
    diagonal, the d(d-1)/2 free strictly-lower entries from the encoder) and s = :func:`positive` (raw) > 0.
    Row i of L is s_i times row i of U, so L is lower triangular with diagonal exactly s, and

        log det Sigma = 2 log det L = 2 sum_i log s_i,

    with no ``exp`` of an unbounded output and no matrix factorization (equivalently Sigma = U diag(s^2) U^T,
    an LDL^T factorization). Reparameterization: z = mu + L eps, eps ~ N(0, I_d) (Rezende, Mohamed &
    Wierstra, 2014, "Stochastic Backpropagation and Approximate Inference in Deep Generative Models";
    Kucukelbir et al., 2017, full-rank ADVI).

    The encoder emits ``2d + d(d-1)/2`` features, in order: mu (d), raw s (d), strictly-lower entries of U
    (d(d-1)/2, row-major as in ``torch.tril_indices(d, d, -1)``). That is O(d^2) parameters and an
    O(d^2) sample / O(d^2) log-density (triangular solve), against O(d) for :class:`DiagonalNormal`.
    """

    def __init__(self, z_dim: int, scale_param: str = "softplus"):
        super().__init__(z_dim, scale_param)
        d = self.z_dim
        self.num_off = d * (d - 1) // 2
        self.num_params = 2 * d + self.num_off
        rows, cols = torch.tril_indices(d, d, offset=-1)
        self.register_buffer("_flat_index", rows * d + cols, persistent=False)

    def unit_lower(self, off: torch.Tensor) -> torch.Tensor:
        """U: ones on the diagonal, ``off`` (..., d(d-1)/2) below it, zeros above; shape (..., d, d)."""
        d = self.z_dim
        flat = off.new_zeros(*off.shape[:-1], d * d).index_copy(-1, self._flat_index, off)
        eye = torch.eye(d, dtype=off.dtype, device=off.device)
        return flat.reshape(*off.shape[:-1], d, d) + eye

    def scale_tril(self, params: torch.Tensor) -> torch.Tensor:
        """L = diag(s) U, shape (..., d, d): lower triangular with diagonal s = positive(raw)."""
        _, raw, off = self._check(params).split([self.z_dim, self.z_dim, self.num_off], dim=-1)
        return self.positive(raw).unsqueeze(-1) * self.unit_lower(off)

    def forward(self, params):
        loc = self._check(params)[..., : self.z_dim]
        return dist.MultivariateNormal(loc, scale_tril=self.scale_tril(params))

    def mean(self, params):
        return self._check(params)[..., : self.z_dim]


class LowRankNormal(PosteriorFamily):
    """Low-rank-plus-diagonal Gaussian posterior q(z|x) = N(mu(x), W(x) W(x)^T + diag sigma(x)^2).

    W is d x ``rank``, sigma = :func:`positive` (raw). The encoder emits ``d (rank + 2)`` features, in order:
    mu (d), W row-major (d * rank), raw sigma (d). With W = 0 this is :class:`DiagonalNormal` with the same
    raw features. Cost O(d * rank) parameters; log-density via the Woodbury identity and the matrix
    determinant lemma in O(d rank^2) (Rezende et al., 2014; Ong et al., 2018, "Gaussian variational
    approximation with a factor covariance structure").

    Args:
        z_dim: latent dimension d.
        rank: number of columns of W (``--rank`` on the command line), at most z_dim.
        scale_param: ``"softplus"`` or ``"exp"`` for sigma.
    """

    def __init__(self, z_dim: int, rank: int = 2, scale_param: str = "softplus"):
        super().__init__(z_dim, scale_param)
        if isinstance(rank, bool) or int(rank) != rank or int(rank) < 1:
            raise ValueError(f"lowrank guide needs a positive integer rank, got rank={rank!r}")
        if int(rank) > self.z_dim:
            raise ValueError(f"lowrank guide needs rank <= z_dim, got rank={rank} > z_dim={self.z_dim} (rank z_dim "
                             "is already a full covariance: use the cholesky guide)")
        self.rank = int(rank)
        self.num_params = self.z_dim * (self.rank + 2)

    def forward(self, params):
        d = self.z_dim
        loc, factor, raw = self._check(params).split([d, d * self.rank, d], dim=-1)
        factor = factor.reshape(*factor.shape[:-1], d, self.rank)
        return dist.LowRankMultivariateNormal(loc, factor, self.positive(raw) ** 2)

    def mean(self, params):
        return self._check(params)[..., : self.z_dim]


# --------------------------------------------------------------------------------------------- flow
class IAFNormal(PosteriorFamily):
    """Amortized inverse autoregressive flow on a diagonal Gaussian base (Kingma et al., 2016,
    "Improved Variational Inference with Inverse Autoregressive Flow", arXiv:1606.04934).

    The encoder emits ``2d + context_dim`` features: mu, raw sigma (sigma = :func:`positive` (raw)) and a
    context vector h. Then

        z_0 = mu + sigma * eps,   eps ~ N(0, I)
        z_t = f_t(z_{t-1}; h),    t = 1..T (``flow_steps``), with the coordinate order reversed between steps,

    where each f_t is a :class:`~pyro.distributions.transforms.ConditionalAffineAutoregressive` transform whose
    shift m_t and gate/scale s_t come from a MADE network (:class:`~pyro.nn.ConditionalAutoRegressiveNN`)
    of (z_{t-1}, h). With ``stable=True`` (default; the paper's Eq. 14, LSTM-style update)

        z_t = sigma_t * z_{t-1} + (1 - sigma_t) * m_t,   sigma_t = sigmoid(s_t + 2),

    otherwise z_t = m_t + exp(s_t) * z_{t-1} (Eq. 10). The Jacobian of each step is triangular, so

        log q(z_T | x) = log N(z_0; mu, sigma^2) - sum_t sum_i log sigma_t,i.

    The flow weights are the family's own parameters (registered with ``pyro.module("posterior", ...)`` by
    the VAE's guide); only mu, sigma and h are per data point.

    Caching: ``q = family(params)`` remembers the inverse of the last sample it drew, so ``q.log_prob`` of
    that exact tensor is cheap. Any other tensor (a copy, a second draw's predecessor, data from elsewhere)
    is inverted afresh, d sequential network passes per step: correct, just slower.

    ``mean(params)`` pushes the base mean mu through the flow (a point summary, not E_q[z]).

    Args:
        z_dim: latent dimension d.
        flow_steps: number of IAF steps T (``--flow-steps`` on the command line).
        context_dim: size of the context h the encoder emits (default d).
        hidden_dims: hidden layer sizes of each step's MADE network, each >= d (default [10 d]).
        stable: use the gated update of Eq. 14 (default) instead of Eq. 10.
        scale_param: ``"softplus"`` or ``"exp"`` for the base sigma.
    """

    def __init__(self, z_dim: int, flow_steps: int = 2, context_dim: int | None = None,
                 hidden_dims=None, stable: bool = True, scale_param: str = "softplus"):
        super().__init__(z_dim, scale_param)
        d = self.z_dim
        if isinstance(flow_steps, bool) or int(flow_steps) != flow_steps or int(flow_steps) < 1:
            raise ValueError(f"iaf guide needs a positive integer flow_steps, got flow_steps={flow_steps!r}")
        context_dim = d if context_dim is None else context_dim
        if isinstance(context_dim, bool) or int(context_dim) != context_dim or int(context_dim) < 1:
            raise ValueError(f"iaf guide needs a positive integer context_dim, got context_dim={context_dim!r}")
        hidden_dims = [10 * d] if hidden_dims is None else [int(h) for h in hidden_dims]
        if not hidden_dims or min(hidden_dims) < d:
            raise ValueError(f"iaf guide needs hidden_dims each >= z_dim={d}, got {hidden_dims!r}")
        self.flow_steps = int(flow_steps)
        self.context_dim = int(context_dim)
        self.hidden_dims = tuple(hidden_dims)
        self.stable = bool(stable)
        self.num_params = 2 * d + self.context_dim
        self.steps = nn.ModuleList(self._make_step() for _ in range(self.flow_steps))
        self.register_buffer("_reverse", torch.arange(d - 1, -1, -1), persistent=False)

    def _make_step(self) -> ConditionalAffineAutoregressive:
        with warnings.catch_warnings():  # z_dim == 1: a context-only affine map, which is fine
            warnings.filterwarnings("ignore", message="ConditionalAutoRegressiveNN input_dim = 1")
            made = ConditionalAutoRegressiveNN(self.z_dim, self.context_dim, list(self.hidden_dims),
                                               permutation=torch.arange(self.z_dim))
        return ConditionalAffineAutoregressive(made, stable=self.stable)

    def split(self, params: torch.Tensor):
        """(mu, raw sigma, context h) from encoder features (..., num_params)."""
        return self._check(params).split([self.z_dim, self.z_dim, self.context_dim], dim=-1)

    def transforms(self, context: torch.Tensor) -> list:
        """The T steps conditioned on h, with a reversal of the coordinates between consecutive steps.

        Each call builds fresh transform objects (hence a fresh inverse cache)."""
        out = []
        for t, step in enumerate(self.steps):
            if t:
                out.append(Permute(self._reverse))
            out.append(step.condition(context))
        return out

    def forward(self, params):
        loc, raw, context = self.split(params)
        base = dist.Normal(loc, self.positive(raw)).to_event(1)
        return dist.TransformedDistribution(base, self.transforms(context))

    def mean(self, params):
        z, _, context = self.split(params)
        for t in self.transforms(context):
            z = t(z)
        return z


POSTERIORS = {
    "diagonal": DiagonalNormal,
    "cholesky": CholeskyNormal,
    "lowrank": LowRankNormal,
    "iaf": IAFNormal,
    "laplace": DiagonalLaplace,
    "studentt": DiagonalStudentT,
}


def _options(cls) -> list[str]:
    """Keyword options of a family's constructor besides z_dim."""
    names = list(inspect.signature(cls.__init__).parameters)[1:]
    return [n for n in names if n != "z_dim"]


def make_posterior(name, z_dim: int, **kwargs) -> PosteriorFamily:
    """Build a posterior family by name (see ``POSTERIORS``) or pass a family instance through.

    Raises ValueError for an unknown name (listing the choices) or an option the family does not take
    (e.g. ``rank=`` for ``iaf``).
    """
    if isinstance(name, PosteriorFamily):
        return name
    try:
        cls = POSTERIORS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown guide {name!r}; choose one of {', '.join(sorted(POSTERIORS))}"
        ) from None
    allowed = _options(cls)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        takes = f"it takes {', '.join(allowed)}" if allowed else "it takes no options"
        raise ValueError(f"guide {name!r} does not take {', '.join(unknown)}; {takes}")
    return cls(z_dim, **kwargs)
