r"""Particles: the per-(particle, data point) terms every objective is a formula of, and the two producers.

For a model p(x, z) and a guide q(z|x), K particles z_kn ~ q(z | x_n) give, per particle k and *cell* n
(a data point of the batch plate), the terms

    log p(x_n | z_kn),   log p(z_kn),   log q(z_kn | x_n)                      (always)
    log q_sg(z_kn | x_n)      q's density with stop-gradient parameters       (``stop_q=True``)
    KL(q(z | x_n) || p(z))    closed form where registered, else log q - log p  (``kl=True``)

and the batch scale (the data plate's subsampling factor N/B). The importance log weight is
log w_kn = log p(x_n | z_kn) + log p(z_kn) - log q(z_kn | x_n). Every objective of
:mod:`pyro_vae.objectives` is one formula of a :class:`Particles` (``pyro_vae/objectives/bounds.py``).

**Two producers** give the same particles (same values and gradients for the same random state):

* :func:`trace_particles`, for *any* Pyro model/guide: the guide and the model (replayed) run once under an
  outermost particle plate of size K (``pyro.plate(PARTICLE_PLATE, K, dim=-(plate_nesting + 1))``), and each
  site's log density is reduced per cell (:class:`CellLayout`).
* a model's own trace-free **twin**: an object whose bound ``model``/``guide`` are passed may define
  ``particles(*args, num_particles=, stop_q=, kl=, log_weights=, **kwargs)`` computing the same terms directly
  (``log_weights=False``: the formula reads no log p(z), log q(z|x), which the twin may then skip), and
  ``particle_twin_of(model, guide)`` saying whether the pair is the one its twin mirrors.
  :class:`~pyro_vae.vae.VAE` does (``VAE.particles`` next to ``VAE.model`` and ``VAE.guide``): the same maths
  without Pyro's per-step tracing.

:func:`draw_particles` picks the twin when there is one **and no Pyro effect handler is active**, and traces
otherwise. The twin sends no messages, so it is the same program as the traced model/guide only when nobody
listens: under SVI (whose ``poutine.trace(param_only=True)`` collects the parameters to update), or inside
``poutine.scale``/``condition``/``block``/``mask``/``replay``/``lift``/``trace``, the objective traces, so every
handler sees exactly what it would see with Pyro's own ``Trace_ELBO``. With no handler active, the only
observable effect of ``pyro.module`` is the parameter store; the twin registers its modules there too
(:func:`register_modules`).

Why this module sits below :mod:`pyro_vae.vae` rather than inside :mod:`pyro_vae.objectives`: the VAE's twin
builds :class:`Particles`, and imports run one way (data -> building blocks -> vae -> objectives).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import types
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.distributions import Distribution
from torch.distributions.transforms import Transform

import pyro
import pyro.poutine as poutine
from pyro.distributions.kl import kl_divergence
from pyro.params.param_store import param_with_module_name
from pyro.poutine.runtime import _PYRO_STACK
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import prune_subsample_sites
from pyro.poutine.messenger import Messenger
from pyro.util import check_model_guide_match, check_site_shape, get_rng_state, set_rng_state

from .priors import kl_monte_carlo_reason

__all__ = ["Particles", "cells_to_points", "draw_particles", "trace_particles", "particle_twin", "handlers_active", "register_modules",
           "closed_form_kl",
           "detach_distribution", "stop_gradient_log_q", "stop_gradient_parameters", "guess_plate_nesting",
           "run_traces", "CellLayout", "PARTICLE_PLATE", "NotReparameterizedError"]

PARTICLE_PLATE = "num_particles_vectorized"


class NotReparameterizedError(NotImplementedError):
    """A guide latent site cannot be sampled by reparameterization (its distribution has no rsample)."""


# ---------------------------------------------------------------------------------------------- the terms
@dataclass
class Particles:
    """Per-particle, per-cell terms of one draw of K particles; every tensor has shape ``(K, *cells)``.

    Attributes:
        log_px_given_z: log p(x|z), summed over the observed sites of a cell.
        log_pz: log p(z), summed over the model's latent sites (None when drawn with ``log_weights=False``).
        log_qz: log q(z|x), summed over the guide's sites (None when drawn with ``log_weights=False``).
        scale: the batch scale: prod(full size / size) over the cell plates (N/B when B of N points are drawn).
        log_qz_stop: log q(z|x) with q's parameters stop-gradiented (only the path through z carries gradient).
        kl: KL(q || p) per cell: closed form per latent site where registered, else log q - log p.
        kl_monte_carlo: the latent sites whose KL term in ``kl`` is the Monte Carlo log q - log p.
        kl_monte_carlo_expected: those of them that are Monte Carlo by design: the guide's or the model's
            distribution carries a ``kl_monte_carlo_reason`` (a learned prior, a bottom-up hierarchical site),
            so an objective need not warn about them.
        has_plate: whether the cells are data points (a batch plate encloses every site); False means the
            whole batch is one cell, shape ``(K,)``.
    """

    log_px_given_z: torch.Tensor
    log_pz: torch.Tensor | None
    log_qz: torch.Tensor | None
    scale: float = 1.0
    log_qz_stop: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    kl_monte_carlo: tuple = ()
    kl_monte_carlo_expected: tuple = ()
    has_plate: bool = True
    gradient_scalers: list = field(default_factory=list, repr=False)

    @property
    def num_particles(self) -> int:
        return self.log_px_given_z.shape[0]

    @property
    def log_weights(self) -> torch.Tensor:
        """log w = log p(x|z) + log p(z) - log q(z|x)."""
        self._need_log_weights()
        return self.log_px_given_z + self.log_pz - self.log_qz

    def _need_log_weights(self) -> None:
        if self.log_pz is None or self.log_qz is None:
            raise ValueError("these particles were drawn with log_weights=False (no log p(z), log q(z|x))")

    @property
    def log_weights_stop(self) -> torch.Tensor:
        """log w with q's parameters stop-gradiented: equal in value to ``log_weights``; the guide's
        parameters receive gradient only through z (the path derivative)."""
        if self.log_qz_stop is None:
            raise ValueError("these particles were drawn without stop_q=True")
        self._need_log_weights()
        return self.log_px_given_z + self.log_pz - self.log_qz_stop

    def scale_latent_gradients(self, weights: torch.Tensor) -> None:
        """Multiply the gradient reaching each latent value z_kn (from the terms above) by ``weights[k, n]``.

        The model's parameters are untouched; the guide's receive the scaled path derivative (DReG)."""
        for scaler in self.gradient_scalers:
            scaler(weights.detach())

    def per_point(self, values: torch.Tensor) -> torch.Tensor:
        """Per-cell values ``(*cells)`` summed to one value per data point of the outermost cell plate."""
        return cells_to_points(values, self.has_plate)


def cells_to_points(values: torch.Tensor, has_plate: bool = True) -> torch.Tensor:
    """Per-cell values ``(*cells)`` summed to one value per data point of the outermost cell plate."""
    if not has_plate:
        raise ValueError("per-data-point evaluation needs every sample site of model and guide inside a common "
                         "batch plate, e.g. `with pyro.plate('data', len(x)):`; found no plate shared by all sites")
    return values.reshape(values.shape[0], -1).sum(-1)


def closed_form_kl(q: Distribution, p: Distribution) -> torch.Tensor | None:
    """KL(q || p) from Pyro's KL registry (with the pairs of :mod:`pyro_vae.objectives.kl`), or None."""
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        return None


# ---------------------------------------------------------------------------------------------- dispatch
def handlers_active() -> bool:
    """Whether a Pyro effect handler is active (SVI's parameter capture, ``poutine.scale``, ``condition``, ...):
    then only the traced program is the program, and no fast path may stand in for it."""
    return bool(_PYRO_STACK)


def register_modules(modules: dict) -> None:
    """``pyro.module(name, module)`` for each module not yet in Pyro's parameter store under ``name``: what the
    model and guide register, at the cost of one look-up per module once registered (the twin's hot path)."""
    store = pyro.get_param_store()
    for name, module in modules.items():
        first = next(((n, p) for n, p in module.named_parameters() if p.requires_grad), None)
        if first is None or store._params.get(param_with_module_name(name, first[0])) is not first[1]:
            pyro.module(name, module)


def particle_twin(model, guide, *, ignore_handlers: bool = False) -> Callable | None:
    """The trace-free twin ``owner.particles`` when ``model`` and ``guide`` are the bound methods of one object
    whose twin mirrors exactly that pair (``owner.particle_twin_of(model, guide)``) and no Pyro handler is
    active (:func:`handlers_active`; ``ignore_handlers`` asks about the pair alone), else None."""
    if _PYRO_STACK and not ignore_handlers:
        return None
    owner = getattr(model, "__self__", None)
    if owner is None or getattr(guide, "__self__", None) is not owner:
        return None
    matches = getattr(owner, "particle_twin_of", None)
    if matches is None or not matches(model, guide):
        return None
    return owner.particles


def draw_particles(model, guide, args: tuple, kwargs: dict, *, num_particles: int = 1, stop_q: bool = False,
                   kl: bool = False, log_weights: bool = True, plate_nesting=None,
                   require_rsample: bool = False) -> Particles:
    """K = ``num_particles`` particles from the twin of (model, guide) if it has one, else from traces.

    ``log_weights=False`` says the caller reads only log p(x|z) and the KL: a twin may leave log p(z) and
    log q(z|x) out (None); traces always have them.

    ``plate_nesting`` is the model's own plate nesting, or a function returning it (called only when
    tracing; guessed from one dry run when None). ``require_rsample`` raises
    :class:`NotReparameterizedError` for a guide site without rsample.
    """
    twin = particle_twin(model, guide)
    if twin is not None:
        return twin(*args, num_particles=num_particles, stop_q=stop_q, kl=kl, log_weights=log_weights, **kwargs)
    if callable(plate_nesting):
        plate_nesting = plate_nesting()
    if plate_nesting is None:
        plate_nesting = guess_plate_nesting(model, guide, args, kwargs)
    return trace_particles(model, guide, args, kwargs, num_particles, plate_nesting, stop_q=stop_q, kl=kl,
                           require_rsample=require_rsample)


# ---------------------------------------------------------------------------------------------- tracing
def _sample_sites(trace) -> dict:
    return {name: site for name, site in trace.nodes.items() if site["type"] == "sample"}


def _latent_sites(trace) -> dict:
    return {name: site for name, site in _sample_sites(trace).items() if not site["is_observed"]}


def guess_plate_nesting(model, guide, args, kwargs) -> int:
    """The model's own plate nesting (no particle plate): -min(dim) over vectorized plates, from one dry run.

    The dry run restores the random number generators' state, so guessing does not shift the random stream."""
    rng_state = get_rng_state()
    try:
        with poutine.block(), torch.no_grad():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    finally:
        set_rng_state(rng_state)
    dims = [frame.dim
            for trace in (prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace))
            for site in _sample_sites(trace).values()
            for frame in site["cond_indep_stack"] if frame.vectorized]
    return -min(dims) if dims else 0


def _aliased(guide_trace):
    """A trace for replay whose latent values are fresh autograd nodes ``z.view_as(z)`` (same values), so a
    gradient hook on an alias sees exactly the gradient flowing from the model and log q_sg into z."""
    replay_trace = poutine.Trace()
    aliases = {}
    for name, site in _latent_sites(guide_trace).items():
        aliases[name] = site["value"].view_as(site["value"])
        replay_trace.add_node(name, **dict(site, value=aliases[name]))
    return replay_trace, aliases


def run_traces(model, guide, args, kwargs, num_particles: int, plate_nesting: int, alias: bool = False):
    """(model_trace, guide_trace, aliases): ``guide`` then ``model`` replayed, under an outermost particle plate
    of size K at dim -(plate_nesting + 1), log densities computed, subsample sites pruned. With ``alias`` the
    model consumes ``z.view_as(z)`` aliases of the latent values (returned by name)."""
    model_trace, guide_trace, aliases, _ = _run_traces(model, guide, args, kwargs, num_particles, plate_nesting,
                                                       alias)
    return model_trace, guide_trace, aliases


def _run_traces(model, guide, args, kwargs, num_particles: int, plate_nesting: int, alias: bool):
    """:func:`run_traces` and the (unpruned) trace the model was replayed against."""
    plate = pyro.plate(PARTICLE_PLATE, num_particles, dim=-(plate_nesting + 1))
    guide_trace = poutine.trace(plate(guide)).get_trace(*args, **kwargs)
    replay_trace, aliases = _aliased(guide_trace) if alias else (guide_trace, {})
    model_trace = poutine.trace(poutine.replay(plate(model), trace=replay_trace)).get_trace(*args, **kwargs)
    if is_validation_enabled():
        check_model_guide_match(model_trace, guide_trace, plate_nesting + 1)
    model_trace, guide_trace = prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    if is_validation_enabled():
        for site in list(_sample_sites(model_trace).values()) + list(_sample_sites(guide_trace).values()):
            check_site_shape(site, plate_nesting + 1)
    return model_trace, guide_trace, aliases, replay_trace


def _check_rsample(guide_trace) -> None:
    for name, site in _latent_sites(guide_trace).items():
        if not site["fn"].has_rsample:
            raise NotReparameterizedError(
                f"this objective needs reparameterized guide sites, but guide site {name!r} "
                f"({type(site['fn']).__name__}) has no rsample; use Trace_ELBO/TraceGraph_ELBO for it")


def trace_particles(model, guide, args, kwargs, num_particles: int, plate_nesting: int, *, stop_q: bool = False,
                    kl: bool = False, require_rsample: bool = False) -> Particles:
    """The traced producer: K vectorized particles of any Pyro model/guide, reduced per cell.

    Guide-only (auxiliary) sites count in log q(z|x) and in the KL term; with ``stop_q`` the model is replayed
    against aliases of the latent values (see :meth:`Particles.scale_latent_gradients`), and log q_sg is
    :func:`stop_gradient_log_q` at those aliases: each site's distribution detached (one latent site), or the
    guide replayed with detached parameters (several, e.g. a hierarchy, where q(z_2 | z_1) depends on z_1).
    """
    model_trace, guide_trace, aliases, replay_trace = _run_traces(model, guide, args, kwargs, num_particles,
                                                                  plate_nesting, stop_q)
    if require_rsample:
        _check_rsample(guide_trace)
    layout = CellLayout.from_traces(model_trace, guide_trace, num_particles, plate_nesting)
    model_sites, guide_sites = _sample_sites(model_trace), _sample_sites(guide_trace)
    observed = {n: s for n, s in model_sites.items() if s["is_observed"]}
    latent = {n: s for n, s in model_sites.items() if not s["is_observed"]}
    p = Particles(log_px_given_z=layout.sum(observed), log_pz=layout.sum(latent), log_qz=layout.sum(guide_sites),
                  scale=layout.scale, has_plate=bool(layout.kept))
    if stop_q:
        p.log_qz_stop = layout.sum(guide_sites, stop_gradient_log_q(guide, args, kwargs, guide_trace, aliases,
                                                                    replay_trace, num_particles, plate_nesting))
        p.gradient_scalers = [_hook_scaler(layout, aliases[n], s["fn"].event_dim)
                              for n, s in _latent_sites(guide_trace).items()]
    if kl:
        p.kl, p.kl_monte_carlo, p.kl_monte_carlo_expected = _traced_kl(layout, latent, guide_sites)
    return p


def _hook_scaler(layout: "CellLayout", alias: torch.Tensor, event_dim: int):
    def scale(weights):
        if alias.requires_grad:
            factor = layout.broadcast_to_value(weights, event_dim)
            alias.register_hook(lambda grad: grad * factor)
    return scale


def _traced_kl(layout: "CellLayout", model_latents: dict, guide_sites: dict):
    """Per cell: sum over latent sites of KL(q_s || p_s) (closed form, or log q_s - log p_s), plus log q of
    guide-only sites. Returns (kl, names of the sites estimated by Monte Carlo, those of them whose guide or
    model distribution says why it has no closed form: :func:`~pyro_vae.priors.kl_monte_carlo_reason`)."""
    terms, monte_carlo, expected = [], [], []
    for name, guide_site in guide_sites.items():
        model_site = model_latents.get(name)
        kl = None if model_site is None else closed_form_kl(guide_site["fn"], model_site["fn"])
        if kl is not None:
            kl = kl.expand(guide_site["fn"].batch_shape) if torch.is_tensor(kl) else \
                torch.full(guide_site["fn"].batch_shape, float(kl))
            terms.append(layout.reduce(guide_site, kl))
            continue
        terms.append(layout.reduce(guide_site, guide_site["unscaled_log_prob"]))
        if model_site is not None:
            monte_carlo.append(name)
            if kl_monte_carlo_reason(guide_site["fn"]) or kl_monte_carlo_reason(model_site["fn"]):
                expected.append(name)
            terms.append(-layout.reduce(model_site, model_site["unscaled_log_prob"]))
    return layout.total(terms), tuple(monte_carlo), tuple(expected)


# ---------------------------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class CellLayout:
    """How to reduce a site's log density (batch-shaped) to per-particle, per-cell values ``(K, *shape)``.

    ``kept`` are the (name, dim, size) of the plates common to every sample site, outermost first: the joint
    density factorizes over them, and so does the importance-sampling problem. Every other dimension (event
    dims, plates only some sites live in) is summed. ``scale`` = prod(full_size / size) over the kept plates:
    each site's log density is scaled *relative* to it, and the subsampling factor multiplies the per-cell
    bound afterwards (for a subsampled data plate, log p(data) ~ (N/B) sum_batch log p(x_n); the factor
    belongs outside the log-sum-exp). A constant factor that every site shares beyond that (``poutine.scale(s)``
    around model and guide) joins ``scale`` too: it weights each cell's bound by s, so the loss of every
    objective scales by s; a factor that differs between sites, or a tensor, stays inside the site's term.
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
                  for trace in (model_trace, guide_trace) for site in _sample_sites(trace).values()]
        common = set.intersection(*stacks) if stacks else set()
        frames = sorted(common, key=lambda f: f[1])
        scale = math.prod((full if full is not None else size) / size for _, _, size, full in frames)
        scale *= _common_factor([site["scale"] / scale for trace in (model_trace, guide_trace)
                                 for site in _sample_sites(trace).values()])
        return cls(num_particles, plate_nesting, tuple((n, d, s) for n, d, s, _ in frames), float(scale))

    def zeros(self) -> torch.Tensor:
        return torch.zeros((self.num_particles,) + tuple(self.shape))

    def total(self, terms: list) -> torch.Tensor:
        """The sum of reduced terms (on their device and dtype), or zeros when there are none."""
        return sum(terms[1:], terms[0]) if terms else self.zeros()

    def reduce(self, site, log_prob: torch.Tensor) -> torch.Tensor:
        """Mask, rescale relative to ``self.scale`` and sum ``log_prob`` down to shape ``(K, *self.shape)``."""
        log_prob = scale_and_mask(log_prob, site["scale"] / self.scale, site["mask"])
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

    def sum(self, sites: dict, log_probs: dict | None = None) -> torch.Tensor:
        """Sum over ``sites`` of the reduced log densities (``site['unscaled_log_prob']`` unless given)."""
        return self.total([self.reduce(site, site["unscaled_log_prob"] if log_probs is None else log_probs[name])
                           for name, site in sites.items()])

    def broadcast_to_value(self, cell_tensor: torch.Tensor, event_dim: int) -> torch.Tensor:
        """Inverse of :meth:`reduce` for shapes: ``(K, *self.shape)`` -> broadcastable to a site's value."""
        total = self.plate_nesting + 1
        shape = [1] * total
        shape[0] = self.num_particles
        for (_, dim, size) in self.kept:
            shape[total + dim] = size
        return cell_tensor.reshape(shape + [1] * event_dim)


def _common_factor(ratios: list) -> float:
    """The one float factor all ``ratios`` share (1.0 when they differ, or one is a tensor)."""
    if not ratios or any(torch.is_tensor(r) for r in ratios):
        return 1.0
    first = float(ratios[0])
    return first if first > 0 and all(math.isclose(float(r), first, rel_tol=1e-12) for r in ratios) else 1.0


# ---------------------------------------------------------------------------------------------- stop-gradient
def stop_gradient_log_q(guide, args, kwargs, guide_trace, aliases: dict, replay_trace, num_particles: int,
                        plate_nesting: int) -> dict:
    r"""Per guide sample site, log q_sg at its value (the latent's alias): q's density with stop-gradient
    *parameters*, the path through the latent values kept, so that d log q_sg / d phi = (d log q / d z)(d z / d phi).

    * One latent site: the site's distribution with detached parameters (:func:`detach_distribution`).
    * Several (a hierarchy: q(z_2 | z_1, x) depends on the latent z_1, which a detached copy would cut): the
      guide is replayed against the aliases with its parameters detached (:func:`stop_gradient_parameters`), so
      each site's distribution is rebuilt from the aliases of the latents it reads, and log q_sg is each
      replayed site's ``log_prob`` at its alias. The replay is hidden from outer handlers (``poutine.block``) and
      draws no noise. It must reach every parameter: the replayed log q_sg is checked (an autograd graph walk
      that stops at the aliases) to reach no leaf tensor that requires grad. Where it does (parameters the
      replay cannot detach: a plain function closing over tensors or over modules), the leaked parameter
      gradient is cancelled by a second replay at the detached values z' = stop(z):

          log q_sg = log q(z; phi') - log q(z'; phi') + stop(log q(z'; phi'))

      (phi' the parameters as the replay sees them): equal in value, and its gradient with respect to phi is the
      path term alone, as the two parameter terms cancel (up to rounding).
    """
    sites = _sample_sites(guide_trace)
    if len(_latent_sites(guide_trace)) <= 1:
        return {n: detach_distribution(s["fn"]).log_prob(aliases.get(n, s["value"])) for n, s in sites.items()}
    values = {n: aliases.get(n, s["value"]) for n, s in sites.items()}
    log_q = _replayed_log_q(guide, args, kwargs, replay_trace, sites, values, num_particles, plate_nesting)
    exempt = [t for t in (*args, *kwargs.values()) if torch.is_tensor(t)]
    if not _leaves_reached(list(log_q.values()), list(aliases.values()), exempt):
        return log_q
    frozen = {n: v.detach() for n, v in values.items()}
    at_frozen = _replayed_log_q(guide, args, kwargs, replay_trace, sites, frozen, num_particles, plate_nesting)
    return {n: log_q[n] - at_frozen[n] + at_frozen[n].detach() for n in log_q}


def _replayed_log_q(guide, args, kwargs, replay_trace, sites: dict, values: dict, num_particles: int,
                    plate_nesting: int) -> dict:
    """The guide replayed (particle plate, hidden from outer handlers, parameters detached) at ``values``; each
    site's log density at its value."""
    trace = poutine.Trace()
    for name, site in replay_trace.nodes.items():  # the plates' subsample indices
        if site["type"] == "sample" and name not in values:
            trace.add_node(name, **site)
    for name, value in values.items():
        trace.add_node(name, **dict(sites[name], value=value))
    plate = pyro.plate(PARTICLE_PLATE, num_particles, dim=-(plate_nesting + 1))
    with poutine.block(), stop_gradient_parameters(_owner(guide)):
        replayed = poutine.trace(poutine.replay(plate(guide), trace=trace)).get_trace(*args, **kwargs)
    log_q = {}
    for name, value in values.items():
        node = replayed.nodes.get(name)
        if node is None or node["type"] != "sample":
            raise RuntimeError(f"replaying the guide with stop-gradient parameters (dreg, stl) did not reach its "
                               f"sample site {name!r}: the guide must run the same sites when replayed")
        log_q[name] = node["fn"].log_prob(value)
    return log_q


def _owner(guide) -> torch.nn.Module | None:
    """The nn.Module a guide belongs to: the guide itself (a module, e.g. an AutoGuide) or its ``__self__``."""
    owner = guide if isinstance(guide, torch.nn.Module) else getattr(guide, "__self__", None)
    return owner if isinstance(owner, torch.nn.Module) else None


class _StopGradientParams(Messenger):
    """``pyro.param`` returns its value detached (PyroModule parameters included)."""

    def _pyro_post_param(self, msg) -> None:
        if torch.is_tensor(msg["value"]):
            msg["value"] = msg["value"].detach()


@contextlib.contextmanager
def stop_gradient_parameters(owner: torch.nn.Module | None = None):
    """Within the block, ``pyro.param`` values are detached and so is every parameter of ``owner`` (each
    submodule reads a detached copy of its parameters). The parameters are unchanged: each module's
    parameter dict is set aside whole (its order and entries kept) and restored on exit, the detached
    copies shadowing them as plain attributes meanwhile; ``named_parameters()`` lists none, so
    ``pyro.module`` registers (and warns about) nothing inside."""
    swapped = []
    try:
        if owner is not None:
            copies = {}
            for module in owner.modules():
                params = module.__dict__.get("_parameters")
                if not params:
                    continue
                swapped.append((module, params))
                module.__dict__["_parameters"] = {}
                for name, p in params.items():
                    if p is not None:
                        module.__dict__[name] = copies.setdefault(id(p), p.detach())
        with _StopGradientParams():
            yield
    finally:
        for module, params in reversed(swapped):
            for name in params:
                module.__dict__.pop(name, None)
            module.__dict__["_parameters"] = params


def _leaves_reached(outputs: list, stops: list, exempt: list) -> list:
    """The leaf tensors requiring grad (parameters) that ``outputs`` depend on through autograd, other than
    through ``stops`` (the latent aliases) and other than the ``exempt`` tensors (the program's inputs)."""
    stop = {id(t.grad_fn) for t in stops if torch.is_tensor(t) and t.grad_fn is not None}
    exempt_ids = {id(t) for t in exempt}
    todo = [t.grad_fn for t in outputs if torch.is_tensor(t) and t.grad_fn is not None]
    seen, found = {}, []
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen or id(node) in stop:
            continue
        seen[id(node)] = node  # (held, so that no id is reused while walking)
        leaf = getattr(node, "variable", None)
        if leaf is not None:
            if id(leaf) not in exempt_ids:
                found.append(leaf)
            continue
        todo.extend(next_node for next_node, _ in node.next_functions)
    return found


def detach_distribution(fn: Distribution) -> Distribution:
    """A copy of ``fn`` with stop-gradient parameters: the same density, no gradient to the parameters.

    The distribution is shallow-copied with every tensor attribute detached (parameters and cached lazy
    properties such as MultivariateNormal's ``_unbroadcasted_scale_tril``), recursing into nested
    distributions (``Independent``, ``ExpandedDistribution``, ``MaskedDistribution``, ...) and into the
    transforms of a ``TransformedDistribution``, whose caches are dropped so that ``log_prob`` inverts the
    transform through the value rather than reusing the forward pass. Neural transforms are supported too:
    an ``nn.Module`` they call (e.g. the MADE network of Pyro's conditional affine autoregressive flow,
    held in a ``functools.partial`` with its context) is replaced by a callable that runs it with detached
    weights (:func:`torch.func.functional_call`). Inverting an autoregressive flow through the value costs
    d sequential network passes per step.

    Raises TypeError for other callables (a lambda), whose parameters cannot be reached. The copy treats
    *all* of ``fn``'s parameter tensors as constants: for a guide site whose parameters depend on other latent
    values (q(z_2 | z_1) of a hierarchical guide) that dependence would be cut too, so the traced producer uses
    it for one-latent-site guides only and replays a guide with several (:func:`stop_gradient_log_q`).
    """
    return _detach_object(fn, type(fn).__name__, {})


class _FrozenModule:
    """Calls ``module`` with every parameter and buffer detached (attribute access passes through)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        state = {name: t.detach() for name, t in
                 [*self.module.named_parameters(), *self.module.named_buffers()]}
        return torch.func.functional_call(self.module, state, args, kwargs)

    def __getattr__(self, name):
        if name == "module":  # not yet set (e.g. while being copied)
            raise AttributeError(name)
        return getattr(self.module, name)


_TRANSFORM_CACHES = {"_cached_x_y": (None, None), "_cached_log_scale": None}


def _detach_object(obj, owner: str, memo: dict):
    """Shallow copy of ``obj`` with detached attributes; ``memo`` (id -> copy) handles cycles such as a
    transform and its ``_InverseTransform`` referring to each other."""
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.nn.Module) and not isinstance(obj, Transform):
        memo[id(obj)] = _FrozenModule(obj)
        return memo[id(obj)]
    new = memo[id(obj)] = copy.copy(obj)
    for key, value in vars(obj).items():
        if isinstance(obj, Transform) and key in _TRANSFORM_CACHES:
            value = _TRANSFORM_CACHES[key]
        elif isinstance(obj, Transform) and key == "_inv" and not isinstance(value, Transform):
            value = None  # a weakref to the *original* inverse, which would use undetached parameters
        new.__dict__[key] = _detach_value(value, f"{owner}.{key}", memo)
    return new


def _detach_value(value, owner: str, memo: dict):
    if torch.is_tensor(value):  # (integer tensors, e.g. a flow's permutation, carry no gradient: kept as they are)
        return value.detach() if value.is_floating_point() or value.is_complex() else value
    if isinstance(value, (Distribution, Transform, torch.nn.Module)):
        return _detach_object(value, owner, memo)
    if isinstance(value, types.MethodType) and isinstance(value.__self__, (Distribution, Transform)):
        # a method bound to the object being copied (e.g. AffineAutoregressive(stable=True) sets
        # self._inverse = self._inverse_stable): rebind it to the detached copy, or it runs the original's
        # undetached network and context (and writes the original's caches)
        return types.MethodType(value.__func__, _detach_object(value.__self__, owner, memo))
    if isinstance(value, dict):
        return type(value)((k, _detach_value(v, owner, memo)) for k, v in value.items())
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        items = [_detach_value(v, owner, memo) for v in value]
        return type(value)(items) if not hasattr(value, "_fields") else type(value)(*items)
    if isinstance(value, functools.partial):
        new = functools.partial(_detach_value(value.func, owner, memo), *_detach_value(value.args, owner, memo),
                                **_detach_value(value.keywords, owner, memo))
        new.__dict__.update({k: _as_structure(k, v) for k, v in vars(value).items()})
        return new
    if callable(value) and not isinstance(value, type) and not _is_method_of_module(value):
        raise TypeError(f"cannot detach the parameters of {owner}: it holds the callable {value!r}; "
                        "stop-gradient estimators (dreg, stl) support distributions whose parameters are tensors "
                        "or nn.Modules")
    return value


def _as_structure(name: str, value):
    """An autoregressive network's integer ``permutation`` as Python ints (the order its inverse loops over):
    structure, not data, so iterating it reads no tensor (a captured graph could not record that read)."""
    if name == "permutation" and torch.is_tensor(value) and not value.is_floating_point():
        return tuple(int(i) for i in value.tolist())
    return value


def _is_method_of_module(value) -> bool:
    """A bound method of an nn.Module (e.g. a flow's ``get_permutation``): harmless metadata, kept as is."""
    return isinstance(getattr(value, "__self__", None), torch.nn.Module)
