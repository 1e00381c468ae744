r"""Learned priors p(z): each an ``nn.Module`` whose ``forward()`` returns a Pyro distribution, event_shape (d,).

* ``"standard"``, :class:`StandardPrior`: p(z) = N(0, I_d), no parameters.
* ``"mog"``, :class:`MixturePrior`: a mixture of K learned Gaussians,
  p(z) = sum_k pi_k N(z; mu_k, diag sigma_k^2), pi = softmax(logits) (``dist.MixtureSameFamily``).
* ``"vamp"``, :class:`VampPrior`: the VampPrior (Tomczak & Welling, "VAE with a VampPrior", AISTATS 2018),
  the encoder's posterior averaged over K learned pseudo-inputs u_k,
  p(z) = (1/K) sum_k q(z | u_k). It needs the encoder: a callable ``encode(u) -> q(z|u)`` (batch_shape (K,)).
* ``"flow"``, :class:`FlowPrior`: N(0, I) pushed through a learned normalizing flow f (masked autoregressive
  steps, Papamakarios et al., 2017), p(z) = N(f^-1(z); 0, I) |det d f^-1(z) / dz|: one network pass per step
  for log p(z), d sequential passes per step to sample.

None of the learned priors has a closed-form KL(q(z|x) || p(z)): the analytic-KL objective estimates it by
Monte Carlo, log q(z|x) - log p(z), at the particle's own z. Their distributions say so on purpose: their
class carries ``kl_monte_carlo_reason`` (read it with :func:`kl_monte_carlo_reason`), a sentence naming why a
Monte Carlo KL is the right estimator for the site, not a missing registration.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import pyro.distributions as dist
from pyro.distributions.transforms import Permute, affine_autoregressive

__all__ = ["Prior", "StandardPrior", "MixturePrior", "VampPrior", "FlowPrior", "GaussianMixture",
           "FlowDistribution", "UniformMixture", "make_prior", "kl_monte_carlo_reason", "PRIORS",
           "DEFAULT_COMPONENTS"]

#: K when ``prior_components`` is not given (500 pseudo-inputs as in Tomczak & Welling's experiments)
DEFAULT_COMPONENTS = {"mog": 10, "vamp": 500}


def kl_monte_carlo_reason(fn) -> str | None:
    """Why the KL against ``fn`` is estimated by Monte Carlo by design (None if ``fn`` does not say), looking
    through wrappers (``Independent``, ``Expanded``, ``Masked``: anything with a ``base_dist``)."""
    while fn is not None:
        reason = getattr(type(fn), "kl_monte_carlo_reason", None)
        if reason:
            return reason
        fn = getattr(fn, "base_dist", None)
    return None


# --------------------------------------------------------------------------------------------- distributions
class GaussianMixture(dist.MixtureSameFamily):
    """A mixture of diagonal Gaussians (:class:`MixturePrior`'s distribution); no closed-form KL exists."""

    kl_monte_carlo_reason = "a Gaussian-mixture prior has no closed-form KL(q || p)"


class UniformMixture(dist.MixtureSameFamily):
    """(1/K) sum_k q(z | u_k) (:class:`VampPrior`'s distribution); no closed-form KL exists."""

    kl_monte_carlo_reason = "the VampPrior (a mixture of posteriors) has no closed-form KL(q || p)"


class FlowDistribution(dist.TransformedDistribution):
    """N(0, I) through a learned flow (:class:`FlowPrior`'s distribution); no closed-form KL exists."""

    kl_monte_carlo_reason = "a flow prior has no closed-form KL(q || p)"


# --------------------------------------------------------------------------------------------- priors
class Prior(nn.Module):
    """Base class: ``prior()`` is p(z), a distribution with batch_shape () and event_shape (z_dim,)."""

    #: the prior is N(0, I) (a model may use its closed forms)
    standard = False

    def __init__(self, z_dim: int):
        super().__init__()
        if int(z_dim) < 1:
            raise ValueError(f"z_dim must be a positive integer, got {z_dim!r}")
        self.z_dim = int(z_dim)

    def forward(self) -> dist.TorchDistribution:  # pragma: no cover
        raise NotImplementedError

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) for z of shape (..., z_dim)."""
        return self().log_prob(z)


class StandardPrior(Prior):
    """p(z) = N(0, I_d)."""

    standard = True

    def __init__(self, z_dim: int):
        super().__init__(z_dim)
        self.register_buffer("loc", torch.zeros(self.z_dim), persistent=False)
        self.register_buffer("scale", torch.ones(self.z_dim), persistent=False)

    def forward(self):
        return dist.Normal(self.loc, self.scale).to_event(1)


class MixturePrior(Prior):
    """p(z) = sum_k softmax(logits)_k N(z; mu_k, diag sigma_k^2), K learned components.

    Means start at N(0, I) draws, standard deviations at 1 (sigma = softplus(raw) + 1e-4), weights uniform.
    """

    def __init__(self, z_dim: int, components: int = DEFAULT_COMPONENTS["mog"]):
        super().__init__(z_dim)
        k = _components(components)
        self.logits = nn.Parameter(torch.zeros(k))
        self.locs = nn.Parameter(torch.randn(k, self.z_dim))
        self.raw_scales = nn.Parameter(torch.full((k, self.z_dim), math.log(math.expm1(1.0 - 1e-4))))

    @property
    def scales(self) -> torch.Tensor:
        return F.softplus(self.raw_scales) + 1e-4

    def forward(self):
        components = dist.Normal(self.locs, self.scales).to_event(1)
        return GaussianMixture(dist.Categorical(logits=self.logits), components)


class VampPrior(Prior):
    """The VampPrior p(z) = (1/K) sum_k q(z | u_k) over K learned pseudo-inputs u_k (Tomczak & Welling, 2018).

    ``encode(u)`` maps pseudo-inputs (K, *input_shape) to the encoder's posterior q(z|u) with batch_shape (K,)
    and event_shape (z_dim,) (a family whose ``log_prob`` broadcasts, e.g. the diagonal Gaussian). It is a
    plain callable, not a submodule: the encoder's weights belong to the model that owns it (and are
    registered under its name), so the same weights are never registered twice. The pseudo-inputs start as
    in the authors' code, u ~ N(0.05, 0.01^2) per pixel (``init_pseudo_inputs`` sets them, e.g. to training
    points).
    """

    def __init__(self, z_dim: int, encode, input_shape, components: int = DEFAULT_COMPONENTS["vamp"]):
        super().__init__(z_dim)
        if not callable(encode):
            raise ValueError("the VampPrior needs the encoder: encode(u) -> q(z|u)")
        self.encode = encode
        self.input_shape = tuple(int(s) for s in input_shape)
        self.pseudo_inputs = nn.Parameter(0.05 + 0.01 * torch.randn(_components(components), *self.input_shape))

    @torch.no_grad()
    def init_pseudo_inputs(self, x: torch.Tensor) -> None:
        """Set u_k to the rows of ``x`` (K, *input_shape)."""
        self.pseudo_inputs.copy_(x.reshape(self.pseudo_inputs.shape))

    def forward(self):
        q = self.encode(self.pseudo_inputs)
        k = self.pseudo_inputs.shape[0]
        if q.batch_shape != (k,) or q.event_shape != (self.z_dim,):
            raise ValueError(f"encode(u) must give batch_shape ({k},), event_shape ({self.z_dim},); got "
                             f"{tuple(q.batch_shape)}, {tuple(q.event_shape)}")
        uniform = dist.Categorical(logits=self.pseudo_inputs.new_zeros(k))
        return UniformMixture(uniform, q)


class FlowPrior(Prior):
    """p(z) = N(0, I) pushed through ``flow_steps`` masked autoregressive steps (reversing the order between
    steps): z = f(eps), log p(z) = log N(f^-1(z); 0, I) + log |det d f^-1 / dz|.

    Each step is Pyro's :func:`~pyro.distributions.transforms.affine_autoregressive` used in its inverse
    direction (a MAF): log p(z) costs one MADE pass per step; sampling inverts them (d passes per step). A step
    starts near the identity, so the prior starts near N(0, I).
    """

    def __init__(self, z_dim: int, flow_steps: int = 2, hidden: int | None = None):
        super().__init__(z_dim)
        if int(flow_steps) < 1:
            raise ValueError(f"flow_steps must be a positive integer, got {flow_steps!r}")
        hidden = [hidden or max(2 * self.z_dim, 8)]
        self.steps = nn.ModuleList(affine_autoregressive(self.z_dim, hidden_dims=hidden)
                                   for _ in range(int(flow_steps)))
        self.register_buffer("loc", torch.zeros(self.z_dim), persistent=False)
        self.register_buffer("scale", torch.ones(self.z_dim), persistent=False)
        self.register_buffer("reverse", torch.arange(self.z_dim - 1, -1, -1), persistent=False)

    def transforms(self) -> list:
        """eps -> z: the inverse of each autoregressive step, the order reversed between steps."""
        out = []
        for i, step in enumerate(self.steps):
            if i:
                out.append(Permute(self.reverse))
            out.append(step.inv)
        return out

    def forward(self):
        return FlowDistribution(dist.Normal(self.loc, self.scale).to_event(1), self.transforms())


def _components(k) -> int:
    if isinstance(k, bool) or int(k) != k or int(k) < 1:
        raise ValueError(f"prior_components must be a positive integer, got {k!r}")
    return int(k)


PRIORS = {"standard": StandardPrior, "mog": MixturePrior, "vamp": VampPrior, "flow": FlowPrior}


def make_prior(name, z_dim: int, components: int | None = None, *, encode=None, input_shape=None,
               **kwargs) -> Prior:
    """A prior by name (``PRIORS``) or a :class:`Prior` instance passed through.

    ``components`` is K for ``"mog"`` (default 10) and ``"vamp"`` (default 500); ``"vamp"`` needs ``encode``
    and ``input_shape``; ``kwargs`` go to the prior (``flow_steps=``, ``hidden=`` for ``"flow"``).
    """
    if isinstance(name, Prior):
        if name.z_dim != int(z_dim):
            raise ValueError(f"the prior has z_dim {name.z_dim}, the model {z_dim}")
        return name
    if name not in PRIORS:
        raise ValueError(f"unknown prior {name!r}; choose one of {', '.join(PRIORS)}")
    if components is not None and name not in DEFAULT_COMPONENTS:
        raise ValueError(f"prior_components applies to the 'mog' and 'vamp' priors, not {name!r}")
    k = DEFAULT_COMPONENTS.get(name) if components is None else components
    if name == "standard":
        return StandardPrior(z_dim, **kwargs)
    if name == "mog":
        return MixturePrior(z_dim, k, **kwargs)
    if name == "vamp":
        if encode is None or input_shape is None:
            raise ValueError("the 'vamp' prior needs encode= (u -> q(z|u)) and input_shape=")
        return VampPrior(z_dim, encode, input_shape, k, **kwargs)
    return FlowPrior(z_dim, **kwargs)
