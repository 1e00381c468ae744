r"""Shared trace machinery: vectorized particles and per-data-point importance log weights.

For a model p(x, z) and a guide q(z|x), the importance log weight of particle k is

    log w_k = log p(x, z_k) - log q(z_k | x),      z_k ~ q(z | x),  k = 1..K.

All K particles are drawn in one batched pass by wrapping model and guide in an outermost
``pyro.plate(PARTICLE_PLATE, K, dim=-(plate_nesting + 1))``. Log densities are then reduced per *cell*:
the plates that enclose every sample site of both programs (typically the batch plate ``"data"``) are
kept, because the joint density factorizes over them and so does the importance-sampling problem; every
other dimension (event dims, plates that only some sites live in) is summed. The result has shape
``(K, *cell_shape)``, e.g. ``(K, N)`` for a VAE with a batch plate of N points.

Scales: each site's log density is masked and multiplied by its scale *relative to* the kept plates'
subsampling scale prod(full_size / size). The kept plates' scale multiplies the per-cell bound afterwards
(``layout.scale``), because for a subsampled data plate log p(data) ~ (N/B) sum_{batch} log p(x_n) -- the
subsampling factor multiplies the bound, it does not belong inside the log-sum-exp.

Used by :class:`~pyro_vae.objectives.IWAEELBO`, :class:`~pyro_vae.objectives.AnalyticKLELBO` and
:mod:`pyro_vae.evaluation`.
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass

import torch
from torch.distributions import Distribution
from torch.distributions.transforms import Transform

import pyro
import pyro.poutine as poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match, check_site_shape, get_rng_state, set_rng_state

PARTICLE_PLATE = "num_particles_vectorized"


# ---------------------------------------------------------------------------------------------- tracing
def sample_sites(trace) -> dict:
    return {name: site for name, site in trace.nodes.items() if site["type"] == "sample"}


def latent_sites(trace) -> dict:
    return {name: site for name, site in sample_sites(trace).items() if not site["is_observed"]}


def guess_plate_nesting(model, guide, args, kwargs) -> int:
    """The model's own plate nesting (no particle plate): -min(dim) over vectorized plates, from one dry run.

    The dry run restores the random number generators' state, so guessing does not shift the random stream
    (the same seed gives the same draws whether or not max_plate_nesting had to be guessed)."""
    rng_state = get_rng_state()
    try:
        with poutine.block(), torch.no_grad():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    finally:
        set_rng_state(rng_state)
    dims = [frame.dim
            for trace in (prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace))
            for site in sample_sites(trace).values()
            for frame in site["cond_indep_stack"] if frame.vectorized]
    return -min(dims) if dims else 0


def particle_plate(num_particles: int, plate_nesting: int):
    """The outermost plate over particles, at dim -(plate_nesting + 1)."""
    return pyro.plate(PARTICLE_PLATE, num_particles, dim=-(plate_nesting + 1))


def _aliased(guide_trace):
    """A trace for replay whose latent values are fresh autograd nodes ``z.view_as(z)`` (same values).

    The model then consumes the aliases, so a gradient hook on an alias sees exactly the gradient flowing
    from the log weight into z_k, not the guide's own internal uses of z_k.
    """
    replay_trace = poutine.Trace()
    aliases = {}
    for name, site in latent_sites(guide_trace).items():
        aliases[name] = site["value"].view_as(site["value"])
        replay_trace.add_node(name, **dict(site, value=aliases[name]))
    return replay_trace, aliases


def trace_particles(model, guide, args, kwargs, num_particles: int, plate_nesting: int, *, alias: bool = False):
    """Run ``guide`` then ``model`` (replayed) with K = ``num_particles`` vectorized particles.

    Returns ``(model_trace, guide_trace, aliases)`` with log probabilities computed (``compute_log_prob``)
    and subsample sites pruned. With ``alias=True`` the model is replayed against ``z.view_as(z)`` aliases
    of the guide's latent values, returned in ``aliases`` (name -> tensor); otherwise ``aliases`` is empty.
    """
    plate = particle_plate(num_particles, plate_nesting)
    guide_trace = poutine.trace(plate(guide)).get_trace(*args, **kwargs)
    replay_trace, aliases = _aliased(guide_trace) if alias else (guide_trace, {})
    model_trace = poutine.trace(poutine.replay(plate(model), trace=replay_trace)).get_trace(*args, **kwargs)
    if is_validation_enabled():
        check_model_guide_match(model_trace, guide_trace, plate_nesting + 1)
    model_trace = prune_subsample_sites(model_trace)
    guide_trace = prune_subsample_sites(guide_trace)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    if is_validation_enabled():
        for site in list(sample_sites(model_trace).values()) + list(sample_sites(guide_trace).values()):
            check_site_shape(site, plate_nesting + 1)
    return model_trace, guide_trace, aliases


def check_reparameterized(guide_trace, objective: str) -> None:
    """Raise if a guide latent site cannot be sampled by reparameterization (``fn.has_rsample``)."""
    for name, site in latent_sites(guide_trace).items():
        if not site["fn"].has_rsample:
            raise NotImplementedError(
                f"{objective} needs reparameterized guide sites, but guide site {name!r} "
                f"({type(site['fn']).__name__}) has no rsample; use Trace_ELBO/TraceGraph_ELBO for it")


# ---------------------------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class CellLayout:
    """How to reduce a site's log density (batch-shaped) to per-particle, per-cell values ``(K, *shape)``.

    ``kept`` are the (name, dim, size) of the plates common to every sample site, outermost first;
    ``scale`` = prod(full_size / size) over them (the subsampling factor of the per-cell bounds).
    """

    num_particles: int
    plate_nesting: int
    kept: tuple
    scale: float

    @property
    def shape(self) -> torch.Size:
        return torch.Size(size for _, _, size in self.kept)

    @classmethod
    def from_traces(cls, model_trace, guide_trace, num_particles: int, plate_nesting: int) -> "CellLayout":
        stacks = [{(f.name, f.dim, f.size, f.full_size) for f in site["cond_indep_stack"]
                   if f.vectorized and f.name != PARTICLE_PLATE}
                  for trace in (model_trace, guide_trace) for site in sample_sites(trace).values()]
        common = set.intersection(*stacks) if stacks else set()
        frames = sorted(common, key=lambda f: f[1])
        scale = math.prod((full if full is not None else size) / size for _, _, size, full in frames)
        return cls(num_particles, plate_nesting, tuple((n, d, s) for n, d, s, _ in frames), float(scale))

    def reduce(self, site, log_prob: torch.Tensor) -> torch.Tensor:
        """Mask, rescale relative to ``self.scale`` and sum ``log_prob`` down to shape ``(K, *self.shape)``."""
        rel_scale = site["scale"] / self.scale
        log_prob = scale_and_mask(log_prob, rel_scale, site["mask"])
        total = self.plate_nesting + 1
        if log_prob.dim() > total:
            raise ValueError(f"site {site['name']!r}: log_prob has shape {tuple(log_prob.shape)}, more batch dims "
                             f"than plate nesting {self.plate_nesting} + 1 particle dim")
        log_prob = log_prob.reshape((1,) * (total - log_prob.dim()) + log_prob.shape)
        keep = {0} | {total + dim for _, dim, _ in self.kept}
        sum_dims = [i for i in range(total) if i not in keep]
        if sum_dims:
            log_prob = log_prob.sum(sum_dims, keepdim=True)
        log_prob = log_prob.reshape([log_prob.shape[i] for i in sorted(keep)])
        return log_prob.expand((self.num_particles,) + tuple(self.shape))

    def broadcast_to_value(self, cell_tensor: torch.Tensor, event_dim: int) -> torch.Tensor:
        """Inverse of :meth:`reduce` for shapes: ``(K, *self.shape)`` -> broadcastable to a site's value."""
        total = self.plate_nesting + 1
        shape = [1] * total
        shape[0] = self.num_particles
        for (_, dim, size) in self.kept:
            shape[total + dim] = size
        return cell_tensor.reshape(shape + [1] * event_dim)


def log_density(layout: CellLayout, sites: dict, log_probs: dict | None = None) -> torch.Tensor:
    """sum over ``sites`` of the reduced log densities (``site['unscaled_log_prob']`` unless given)."""
    total = 0.0
    for name, site in sites.items():
        lp = site["unscaled_log_prob"] if log_probs is None else log_probs[name]
        total = total + layout.reduce(site, lp)
    if not torch.is_tensor(total):
        return torch.zeros((layout.num_particles,) + tuple(layout.shape))
    return total


def log_weights(model_trace, guide_trace, layout: CellLayout) -> torch.Tensor:
    """log w = log p(x, z) - log q(z|x) per particle and cell, shape ``(K, *layout.shape)``."""
    return log_density(layout, sample_sites(model_trace)) - log_density(layout, sample_sites(guide_trace))


def particle_log_weights(model, guide, args, kwargs, num_particles: int, plate_nesting: int):
    """(log_w of shape (K, *cells), layout) for one vectorized pass of K particles."""
    model_trace, guide_trace, _ = trace_particles(model, guide, args, kwargs, num_particles, plate_nesting)
    layout = CellLayout.from_traces(model_trace, guide_trace, num_particles, plate_nesting)
    return log_weights(model_trace, guide_trace, layout), layout


# ---------------------------------------------------------------------------------------------- detach
def detach_distribution(fn: Distribution) -> Distribution:
    """A copy of ``fn`` whose parameter tensors are detached: same density, no gradient to the parameters.

    Generic rule: shallow-copy the distribution and detach every tensor attribute (parameters and cached
    lazy properties such as MultivariateNormal's ``_unbroadcasted_scale_tril``), recursing into nested
    distributions (``Independent``, ``ExpandedDistribution``, ``MaskedDistribution``, ...) and into the
    transforms of a ``TransformedDistribution`` (whose caches are dropped, so log_prob inverts the
    transform through the value rather than reusing the forward pass). Supported: every torch/Pyro
    distribution whose parameters are tensor attributes (Normal, Laplace, StudentT, LogNormal, Gamma,
    MultivariateNormal, LowRankMultivariateNormal, ... and their wrappers) and transforms with tensor
    parameters (AffineTransform, ExpTransform, ComposeTransform, ...).

    Raises TypeError for a distribution or transform that holds an ``nn.Module`` or another callable
    (e.g. Pyro's neural autoregressive flows): their parameters cannot be detached without re-running
    the network. Note that the copy treats ``fn``'s parameters as constants: for a guide site whose
    parameters depend on other latent values (a hierarchical guide), that dependence is cut too.
    """
    return _detach_object(fn, type(fn).__name__, {})


def _detach_object(obj, owner: str, memo: dict):
    """Shallow copy of ``obj`` with detached tensor attributes; ``memo`` (id -> copy) handles cycles such as
    a transform and its ``_InverseTransform`` referring to each other."""
    if isinstance(obj, torch.nn.Module):
        raise TypeError(f"cannot detach the parameters of {owner}: it holds the nn.Module {type(obj).__name__}; "
                        "stop-gradient estimators (dreg, stl) support distributions with tensor parameters only")
    if id(obj) in memo:
        return memo[id(obj)]
    new = memo[id(obj)] = copy.copy(obj)
    for key, value in vars(obj).items():
        if isinstance(obj, Transform) and key == "_cached_x_y":
            value = (None, None)
        elif isinstance(obj, Transform) and key == "_inv" and not isinstance(value, Transform):
            value = None  # a weakref to the *original* inverse, which would use undetached parameters
        new.__dict__[key] = _detach_value(value, f"{owner}.{key}", memo)
    return new


def _detach_value(value, owner: str, memo: dict):
    if torch.is_tensor(value):
        return value.detach()
    if isinstance(value, (Distribution, Transform, torch.nn.Module)):
        return _detach_object(value, owner, memo)
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        items = [_detach_value(v, owner, memo) for v in value]
        return type(value)(items) if not hasattr(value, "_fields") else type(value)(*items)
    if isinstance(value, functools.partial) or (callable(value) and not isinstance(value, type)):
        raise TypeError(f"cannot detach the parameters of {owner}: it holds the callable {value!r}; "
                        "stop-gradient estimators (dreg, stl) support distributions with tensor parameters only")
    return value


class TracedParticles:
    """Mixin for our ELBO subclasses: the plate nesting (guessed once, without the particle plate) and
    ``_get_trace``, the single-particle trace hook of :class:`pyro.infer.ELBO`."""

    def _plate_nesting(self, model, guide, args, kwargs) -> int:
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = guess_plate_nesting(model, guide, args, kwargs)
        return int(self.max_plate_nesting)

    def _get_trace(self, model, guide, args, kwargs):
        """One (model_trace, guide_trace) pair with a single-particle plate (pyro.infer.ELBO's hook)."""
        model_trace, guide_trace, _ = trace_particles(model, guide, args, kwargs, 1,
                                                      self._plate_nesting(model, guide, args, kwargs))
        return model_trace, guide_trace
