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

:class:`LocalPosterior` is the non-amortized counterpart: one row of variational parameters per data point,
fitted by SVI for fixed x (test-time refinement, the locally optimal q* of the inference-gap analysis;
docs/gaps.md). ``family.init_local(loc, scale)`` gives the features of the member with mean ``loc``, standard
deviations ``scale`` and no correlation, where a local optimisation in one family starts from another's q.
"""
from __future__ import annotations

import inspect
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import pyro
import pyro.distributions as dist
from pyro import poutine
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
    "LocalPosterior",
    "marginal_moments",
    "positive",
    "make_posterior",
    "POSTERIORS",
]

_MIN_SCALE = 1e-5
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


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

    def raw_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`positive`: the raw feature whose scale is ``scale`` (> 1e-5 for softplus)."""
        if self.scale_param == "exp":
            return scale.log()
        y = (scale - _MIN_SCALE).clamp_min(1e-12)
        return y + torch.log(-torch.expm1(-y))

    def init_local(self, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Features (..., num_params) of the member of this family with mean ``loc``, standard deviations
        ``scale`` (each (..., z_dim)) and no correlation: where a local optimisation in this family starts
        from another family's q(z|x) (:meth:`pyro_vae.VAE.local_posterior`). A family with weights of its own
        may reset them (the IAF makes its flow a fixed scaling). Implement it to use a family of your own as
        the *target* of a local optimisation; a VAE trained with it needs nothing (its encoder's features are
        used as they are)."""
        raise NotImplementedError(f"{type(self).__name__} has no init_local(loc, scale): it cannot start a local "
                                  "optimisation from another family's posterior")

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

    def rsample_and_log_prob(self, params: torch.Tensor, num_particles: int):
        """K = ``num_particles`` reparameterized draws z (K, ..., z_dim) of q and log q(z) (K, ...), with the
        noise that ``self(params).rsample((K,))`` (Pyro's particle plate) draws. Families override it with a
        closed form (no distribution objects) for speed; a VAE's trace-free twin calls it every step."""
        q = self(params)
        z = q.rsample((num_particles,))
        return z, q.log_prob(z)

    def draw(self, params: torch.Tensor, num_particles: int, kl: bool = False, log_q: bool = True):
        """(z, log q(z), KL(q || N(0, I)) or None), the twin's hot path: :meth:`rsample_and_log_prob`, and no
        closed-form KL (the twin then asks Pyro's KL registry). A family may override it to return, with ``kl``,
        its closed-form KL to N(0, I) (shape (...) or (1, ...): it broadcasts against log q) sharing the work of
        the draw, and with ``log_q=False`` (the caller does not read log q) None for log q."""
        z, log_q = self.rsample_and_log_prob(params, num_particles)
        return z, log_q, None


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

    def scale_for_std(self, std: torch.Tensor) -> torch.Tensor:
        """The scale parameter of a coordinate with standard deviation ``std`` (Gaussian: std itself)."""
        return std

    def init_local(self, loc, scale):
        return torch.cat([loc, self.raw_scale(self.scale_for_std(scale))], dim=-1)


class DiagonalNormal(_FactorizedLocScale):
    """Factorized Gaussian posterior q(z|x) = N(mu(x), diag sigma(x)^2).

    The encoder emits ``2 * z_dim`` features: mu and a raw scale mapped to sigma > 0 (``scale_param``).
    Reparameterization: z = mu + sigma * eps, eps ~ N(0, I) (Kingma & Welling, 2014), and
    log q(z|x) = sum_i [-eps_i^2 / 2 - log sigma_i] - d/2 log(2 pi).
    """

    def coordinates(self, loc, scale):
        return dist.Normal(loc, scale)

    def rsample_and_log_prob(self, params, num_particles):
        return self.draw(params, num_particles)[:2]

    def draw(self, params, num_particles, kl=False, log_q=True):
        """z = mu + sigma * eps and log q(z|x) = -sum_i [eps_i^2 / 2 + log sigma_i] - d/2 log(2 pi) (None with
        ``log_q=False``), with the closed-form KL sharing mu, sigma and log sigma."""
        # a leading particle dim of size 1 on the parameters: no broadcast (and no reduction over it in the backward)
        loc, raw = self._check(params).unsqueeze(0).split(self.z_dim, dim=-1)
        scale = self.positive(raw)
        log_scale = scale.log() if kl or log_q else None
        eps = torch.empty((int(num_particles), *loc.shape[1:]), dtype=loc.dtype, device=loc.device).normal_()
        log_qz = None
        if log_q:
            const = eps.square().mul_(-0.5).sub_(_LOG_SQRT_2PI)  # no gradient flows through the noise
            log_qz = (const - log_scale).sum(-1)
        return loc + eps * scale, log_qz, self._kl(loc, scale, log_scale) if kl else None

    def _kl(self, loc, scale, log_scale):
        """KL(N(mu, diag sigma^2) || N(0, I)) = 1/2 sum_i (mu_i^2 + sigma_i^2 - 1 - 2 log sigma_i)."""
        return 0.5 * (loc.square() + scale.square() - 2 * log_scale).sum(-1) - 0.5 * self.z_dim


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

    def scale_for_std(self, std):
        return std / math.sqrt(2.0)  # Var = 2 b^2


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

    def scale_for_std(self, std):
        nu = self.df().to(std.dtype)
        return std * ((nu - 2.0) / nu).sqrt()  # Var = s^2 nu / (nu - 2)


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

    def init_local(self, loc, scale):
        """mu = loc, s = scale, U = I (no correlation)."""
        return torch.cat([loc, self.raw_scale(scale), loc.new_zeros(*loc.shape[:-1], self.num_off)], dim=-1)

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

    def init_local(self, loc, scale):
        """mu = loc, sigma = scale and a small random W (1e-2 N(0, 1)): the ELBO is even in W, so W = 0 exactly
        would be a saddle point with zero expected gradient."""
        factor = 1e-2 * torch.randn(*loc.shape[:-1], self.z_dim * self.rank, dtype=loc.dtype, device=loc.device)
        return torch.cat([loc, factor, self.raw_scale(scale)], dim=-1)


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

    @torch.no_grad()
    def init_local(self, loc, scale):
        """Zeroes the output layer of every step's MADE, so each step is the fixed scaling z -> c_t z
        (c_t = sigmoid(2) with ``stable``, 1 otherwise) whatever its input and context, and the flow the linear
        map z_T = c P z_0 (c = prod_t c_t, P the reversals between steps); returns the base N(P^-1 loc / c,
        diag (P^-1 scale / c)^2) with context 0, so that the flow's output is exactly N(loc, diag scale^2). The
        MADE's hidden layers keep their weights, so the output layer gets gradients."""
        for step in self.steps:
            last = step.nn.layers[-1]
            last.weight.zero_()
            last.bias.zero_()
            if step.nn.skip_layer is not None:
                step.nn.skip_layer.weight.zero_()
        probe = torch.arange(1, self.z_dim + 1, dtype=loc.dtype, device=loc.device)[None]  # coordinate i -> i + 1
        pushed = self.mean(torch.cat([probe, torch.zeros_like(probe), loc.new_zeros(1, self.context_dim)], -1))[0]
        c = pushed.sum() / probe.sum()
        where = (pushed / c).round().long() - 1  # output coordinate i is c times base coordinate where[i]
        base_loc, base_scale = torch.empty_like(loc), torch.empty_like(scale)
        base_loc[..., where], base_scale[..., where] = loc / c, scale / c
        return torch.cat([base_loc, self.raw_scale(base_scale), loc.new_zeros(*loc.shape[:-1], self.context_dim)], -1)


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


# --------------------------------------------------------------------------------------------- non-amortized
@torch.no_grad()
def marginal_moments(q: dist.TorchDistribution, num_samples: int = 1024):
    """(mean, standard deviation) of each latent coordinate of q, each of shape batch_shape + (z_dim,): in
    closed form where the distribution has them, else from ``num_samples`` draws (flows)."""
    try:
        return q.mean, q.variance.sqrt()
    except NotImplementedError:
        z = q.sample((int(num_samples),))
        return z.mean(0), z.std(0)


class LocalPosterior(nn.Module):
    r"""A non-amortized guide over N fixed data points: q(z | x_n) = family(lambda_n), with one row lambda_n of
    variational parameters per point, all in one (N, P) tensor ``params`` sampled inside the batch plate
    ``"data"`` (vectorized over the points, no loop).

    It is what the encoder's q_phi(z|x_n) = family(f_phi(x_n)) becomes when f_phi(x_n) is replaced by a free
    parameter: maximizing each ELBO(x_n; lambda_n) for a fixed decoder gives the locally optimal q* of the
    family (Cremer, Li & Duvenaud, 2018), and a few steps from lambda_n = f_phi(x_n) are test-time refinement
    (semi-amortized inference; Kim et al., 2018; Marino et al., 2018). The family's own weights (an IAF's
    MADE networks) are parameters too, fitted jointly across the N points.

    ``guide(x, c=None)`` matches a VAE's model signature, so ``pyro_vae.evaluation.elbo(vae.model,
    local.guide, x, batch_size=None)`` and ``log_likelihood`` evaluate it (traced particles: any family). It
    must see the same N points in one batch. ``trace`` holds the per-point mean SVI objective of every step
    of :meth:`fit` (a one-draw-per-step estimate of the ELBO, nats per data point).
    """

    def __init__(self, family: PosteriorFamily, params: torch.Tensor, input_shape, name: str = "local_posterior"):
        super().__init__()
        if params.dim() != 2 or params.shape[-1] != family.num_params:
            raise ValueError(f"local parameters must have shape (N, {family.num_params}), got {tuple(params.shape)}")
        self.family = family
        self.params = nn.Parameter(params.detach().clone())
        self.input_shape = tuple(input_shape)
        self.name = name
        self.trace: list[float] = []

    @property
    def num_points(self) -> int:
        return self.params.shape[0]

    def posterior(self) -> dist.TorchDistribution:
        """q(z | x_n) for all N points, batch_shape (N,)."""
        return self.family(self.params)

    def guide(self, x, c=None, *, batch_size: int | None = None, mask=None):
        """``"z"`` ~ family(params) inside the plate ``"data"`` of the N points (``c``, ``mask`` unused)."""
        pyro.module(self.name, self)
        n = x.shape[0] if x.dim() > len(self.input_shape) else 1
        if n != self.num_points:
            raise ValueError(f"this local posterior holds {self.num_points} data points but was given a batch of {n}:"
                             " evaluate it on the same points, in one batch (batch_size=None)")
        with pyro.plate("data", n):
            return pyro.sample("z", self.posterior())

    def fit(self, model, *args, steps: int = 100, num_particles: int = 1, lr: float = 0.01,
            weight_lr: float | None = None, optim=None, loss=None, **kwargs) -> "LocalPosterior":
        r"""``steps`` steps of ``pyro.infer.SVI(model, self.guide, optim, loss)`` on ``model(*args, **kwargs)``:
        maximizes sum_n ELBO(x_n; lambda_n) over this guide's parameters only (the model's ``pyro.param`` /
        ``pyro.module`` sites are hidden from the optimizer), in a fresh param store (the global one is left as
        it was). Defaults: ``loss`` = ``Trace_ELBO`` with ``num_particles`` vectorized particles, ``optim`` =
        ``ClippedAdam`` with learning rate ``lr`` for the per-point parameters and ``weight_lr`` (default lr/5)
        for the family's own weights (shared by all points), both decaying geometrically to a tenth over the
        steps. Appends to ``trace``.
        """
        steps = int(steps)
        if steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps}")
        if optim is None:
            decay, own = 0.1 ** (1.0 / max(steps, 1)), f"{self.name}.params"
            weight_lr = lr / 5 if weight_lr is None else weight_lr
            optim = pyro.optim.ClippedAdam(lambda name: {"lr": lr if name == own else weight_lr, "lrd": decay})
        loss = loss or pyro.infer.Trace_ELBO(num_particles=int(num_particles), vectorize_particles=True)
        model = poutine.block(model, hide_types=["param"])
        with pyro.get_param_store().scope():
            svi = pyro.infer.SVI(model, self.guide, optim, loss)
            for _ in range(steps):
                self.trace.append(-svi.step(*args, **kwargs) / self.num_points)
        return self
