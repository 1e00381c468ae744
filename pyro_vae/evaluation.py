r"""Evaluation of a trained VAE: per-data-point ELBO, importance-sampled log-likelihood, latent usage.

``model`` and ``guide`` are Pyro callables taking a batch x as their only positional argument (e.g.
``vae.model``, ``vae.guide``) with every sample site inside one batch plate. ``data`` is a tensor
``(N, ...)``, or an iterable of batches (a :class:`~torch.utils.data.DataLoader`) yielding ``x`` or
``(x, y, ...)`` (labels y are dropped), or -- for conditional models ``model(x, c)`` -- a tuple ``(x, c)``
of tensors with the same first dimension, split into batches together and passed as positional
arguments. Everything here runs under :func:`torch.no_grad`.

* :func:`elbo`: ELBO(x_n) = E_q[log p(x_n, z) - log q(z|x_n)], one estimate per point.
* :func:`enumerated_elbo`: the mean ELBO with the guide's discrete sites summed out (TraceEnum_ELBO; M2).
* :func:`log_likelihood`: log p(x_n) ~ log (1/K) sum_k p(x_n, z_k)/q(z_k|x_n), K = 5000 by default
  (Burda et al. 2016, sec. 5), in memory-bounded chunks of particles.
* :func:`active_units`, :func:`latent_activity`: Burda et al.'s activity statistic Cov_x(E_q[z_u|x]).
* :func:`kl_per_dimension`: E_x KL(q(z_u|x) || N(0, 1)) per latent dimension.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch.distributions import Distribution, Independent, LowRankMultivariateNormal, MultivariateNormal, Normal

import pyro

from .compiling import Captured
from .particles import Particles, cells_to_points, draw_particles, guess_plate_nesting, handlers_active

__all__ = ["elbo", "enumerated_elbo", "log_likelihood", "chunk_size_for_budget", "bytes_per_particle",
           "streaming_logsumexp", "posterior_means", "latent_activity", "active_units", "kl_per_dimension",
           "DEFAULT_MEMORY_BUDGET", "MEMORY_OVERHEAD"]

#: default working-memory budget of :func:`log_likelihood` (bytes).
DEFAULT_MEMORY_BUDGET = 512 * 2**20

#: bytes of working memory per (particle, data point), in units of one data point's size in bytes: the
#: decoder output / likelihood parameters (1x), their log-density temporaries (about 2x), validation
#: temporaries and hidden activations of decoders no wider than the data (<= 2x), with a safety margin.
MEMORY_OVERHEAD = 8


# ---------------------------------------------------------------------------------------------- data
def _as_batch(item) -> torch.Tensor:
    x = item[0] if isinstance(item, (tuple, list)) else item
    if not torch.is_tensor(x):
        raise TypeError(f"data batches must be tensors or (x, y) tuples of tensors, got {type(x).__name__}")
    return x


def _is_tensor_tuple(data) -> bool:
    return isinstance(data, (tuple, list)) and len(data) > 0 and all(torch.is_tensor(t) for t in data)


def _first(data) -> torch.Tensor:
    """The x tensor of tensor data (a tensor or a tuple (x, c, ...) of tensors)."""
    return data[0] if _is_tensor_tuple(data) else data


def _batches(data, batch_size: int | None) -> Iterator[tuple]:
    """Positional-argument tuples per batch: ``(x,)`` from a tensor or a loader, ``(x, c, ...)`` from a tuple
    of tensors (split into ``batch_size`` rows together; None = all at once)."""
    if torch.is_tensor(data) or _is_tensor_tuple(data):
        tensors = (data,) if torch.is_tensor(data) else tuple(data)
        n = tensors[0].shape[0] if tensors[0].dim() else 0
        if n == 0 or any(t.dim() == 0 or t.shape[0] != n for t in tensors):
            raise ValueError("data must be a non-empty tensor (N, ...) or a tuple of tensors sharing the first "
                             f"dimension N, got shapes {[tuple(t.shape) for t in tensors]}")
        yield from zip(*(t.split(batch_size or n) for t in tensors))
    elif isinstance(data, Iterable):
        for item in data:
            yield (_as_batch(item),)
    else:
        raise TypeError(f"data must be a tensor (N, ...) or an iterable of batches, got {type(data).__name__}")


def _num_points(data) -> int | None:
    if torch.is_tensor(data) or _is_tensor_tuple(data):
        return int(_first(data).shape[0])
    dataset = getattr(data, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def _progress(enabled: bool, total: int | None, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="pt", disable=not enabled, leave=False)


def _drawer(model, guide, compile: bool = False) -> Callable[[tuple, int], "Draw"]:
    """``draw(args, K)``: the log weights of K particles of one batch (a :class:`Draw`), from the model's twin or
    traced (the plate nesting of a traced model guessed once, on the first batch). ``compile`` records the draw
    into one graph per batch shape and K, for any model (:class:`~pyro_vae.compiling.Captured`; ``"graph"``:
    without Inductor)."""
    nesting: list[int] = []

    def plate_nesting(args):
        if not nesting:
            nesting.append(guess_plate_nesting(model, guide, args, {}))
        return nesting[0]

    def particles(args: tuple, num_particles: int) -> Particles:
        return draw_particles(model, guide, args, {}, num_particles=num_particles,
                              plate_nesting=lambda: plate_nesting(args))

    if not compile:
        return lambda args, num_particles: Draw.of(particles(args, num_particles))
    layout: dict = {}

    def log_weights(*args_and_k):
        *args, k = args_and_k
        p = particles(tuple(args), k)
        layout.setdefault("has_plate", p.has_plate)
        return p.log_weights

    captured = Captured(log_weights, lambda: _module_tensors(model, guide), prepare=log_weights,
                        compile=compile != "graph", name="the log weights")

    def draw(args: tuple, num_particles: int) -> Draw:
        if handlers_active():  # a handler must see the program itself
            return Draw.of(particles(args, num_particles))
        log_w = captured(*args, num_particles)
        return Draw(log_w, layout.get("has_plate", True))

    return draw


@dataclass
class Draw:
    """The log weights ``(K, *cells)`` of one draw, and whether the cells are data points."""

    log_weights: torch.Tensor
    has_plate: bool = True

    @classmethod
    def of(cls, p: Particles) -> "Draw":
        return cls(p.log_weights, p.has_plate)

    def per_point(self, values: torch.Tensor) -> torch.Tensor:
        return cells_to_points(values, self.has_plate)


def _module_tensors(*programs) -> list:
    """The parameters and floating-point buffers of the modules whose methods ``programs`` are (what a captured
    graph reads live; integer buffers such as a flow's permutation are structure, recorded as constants), plus
    every parameter in Pyro's param store (for programs that call ``pyro.param`` directly)."""
    seen, out = set(), []
    modules = [getattr(f, "__self__", None) for f in programs]
    tensors = [t for m in modules if isinstance(m, torch.nn.Module)
               for t in [*m.parameters(), *(b for b in m.buffers() if b.is_floating_point())]]
    for t in tensors + [v.unconstrained() for v in pyro.get_param_store().values()]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


# ---------------------------------------------------------------------------------------------- ELBO
@torch.no_grad()
def elbo(model: Callable, guide: Callable, data, *, num_particles: int = 1, batch_size: int | None = 256,
         progress: bool = False, compile: bool = False) -> torch.Tensor:
    r"""Per-data-point ELBO estimates, shape (N,):

        ELBO(x_n) ~ (1/K) sum_k [log p(x_n, z_k) - log q(z_k | x_n)],  z_k ~ q(z | x_n),  K = num_particles

    (unscaled by any subsampling factor; particles vectorized). Its mean over data points is the test ELBO.
    ``compile`` computes it on a captured, compiled graph (any model/guide; the same draws).
    """
    out, draw = [], _drawer(model, guide, compile)
    with _progress(progress, _num_points(data), "elbo") as bar:
        for args in _batches(data, batch_size):
            p = draw(args, int(num_particles))
            out.append(p.per_point(p.log_weights.mean(0)))
            bar.update(len(out[-1]))
    return torch.cat(out)


def enumerated_elbo(model: Callable, guide: Callable, data, *, num_particles: int = 1,
                    batch_size: int | None = 256, max_plate_nesting: int = 1) -> float:
    r"""The ELBO per data point with the guide's enumerated discrete sites summed out exactly, by Pyro's
    :class:`~pyro.infer.TraceEnum_ELBO` (e.g. M2's label: U(x) = sum_y q(y|x) [L(x, y) - log q(y|x)], the
    continuous latents by K = ``num_particles`` draws per class):

        mean over points of  E_q[log p(x_n, y, z) - log q(y, z | x_n)],  y summed, z ~ q(z | x_n, y).

    TraceEnum_ELBO returns a sum over a batch, not per point, so this is the mean over all points (a float).
    """
    elbo_ = pyro.infer.TraceEnum_ELBO(num_particles=int(num_particles), max_plate_nesting=max_plate_nesting,
                                      strict_enumeration_warning=False)
    total, n = 0.0, 0
    for args in _batches(data, batch_size):
        total -= elbo_.loss(model, guide, *args)
        n += len(args[0])
    return total / n


# ---------------------------------------------------------------------------------------------- log p(x)
def bytes_per_particle(data_numel: int, element_size: int = 4) -> int:
    """Working memory of one particle of one data point: ``MEMORY_OVERHEAD * data_numel * element_size``."""
    return MEMORY_OVERHEAD * int(data_numel) * int(element_size)


def chunk_size_for_budget(memory_budget: int, batch_size: int, data_numel: int, element_size: int = 4) -> int:
    r"""Particles per pass so that one pass over ``batch_size`` points stays within ``memory_budget`` bytes:

        chunk = max(1, floor(memory_budget / (batch_size * MEMORY_OVERHEAD * data_numel * element_size)))

    E.g. 512 MiB, 784-dim float32 data, batch 16: floor(2^29 / (16 * 8 * 784 * 4)) = 1337 particles.
    """
    return max(1, int(memory_budget) // (int(batch_size) * bytes_per_particle(data_numel, element_size)))


#: on the CPU a pass of about this many (particle, data point) pairs measured fastest (it stays in cache):
#: 20 MNIST digits x 500 particles ran 1.5x faster than 20 x 1000 on 2 cores
CPU_PASS_CELLS = 10_000


def _default_chunk(memory_budget: int, x: torch.Tensor) -> int:
    """Particles per pass: the memory budget's chunk, capped on the CPU at CPU_PASS_CELLS / batch size."""
    chunk = chunk_size_for_budget(memory_budget, x.shape[0], x[0].numel(), x.element_size())
    if x.device.type == "cpu":
        chunk = min(chunk, max(1, CPU_PASS_CELLS // x.shape[0]))
    return chunk


def _auto_batch_size(memory_budget: int, num_samples: int, chunk_size: int | None, data_numel: int,
                     element_size: int) -> int:
    """Points per batch when none is given: fill the budget with all K particles (or one chunk) per point."""
    cells = max(1, int(memory_budget) // bytes_per_particle(data_numel, element_size))
    return max(1, cells // min(num_samples, chunk_size or num_samples))


def streaming_logsumexp(chunks: Iterable[torch.Tensor]) -> torch.Tensor:
    """logsumexp over dim 0 of the concatenation of ``chunks``, holding one chunk at a time (O(cells) state):
    acc <- logaddexp(acc, logsumexp(chunk, 0))."""
    acc = None
    for chunk in chunks:
        part = torch.logsumexp(chunk, dim=0)
        acc = part if acc is None else torch.logaddexp(acc, part)
    if acc is None:
        raise ValueError("streaming_logsumexp needs at least one chunk")
    return acc


@torch.no_grad()
def log_likelihood(model: Callable, guide: Callable, data, num_samples: int = 5000, batch_size: int | None = None,
                   chunk_size: int | None = None, progress: bool = True,
                   memory_budget: int = DEFAULT_MEMORY_BUDGET, compile: bool = False) -> torch.Tensor:
    r"""Importance-sampled log p(x_n) per data point, shape (N,) (Burda et al. 2016, eq. 12 with K samples):

        log p(x_n) ~ log (1/K) sum_{k=1}^K p(x_n, z_k) / q(z_k | x_n),   z_k ~ q(z | x_n)
                   = logsumexp_k(log w_k) - log K.

    It is the IWAE_K bound: a lower bound on log p(x_n) in expectation, E[...] <= log p(x_n), tightening
    monotonically in K and consistent as K -> infinity (the bias is O(1/K) for weights of finite variance).

    The K particles are drawn in chunks of ``chunk_size`` vectorized particles (a particle plate of that
    size) and combined by :func:`streaming_logsumexp`, so only one chunk is alive at a time. **Memory
    bound**: a pass over a batch of B points of D elements (element size e bytes) with chunk C holds about

        B * C * MEMORY_OVERHEAD * D * e  bytes   (MEMORY_OVERHEAD = 8)

    plus the model's parameters; ``chunk_size=None`` picks C = :func:`chunk_size_for_budget` so this is at
    most ``memory_budget`` (default 512 MiB), and ``batch_size=None`` (tensor data) picks B so that a pass
    fills the budget. For 784-dim float32 MNIST, K = 5000 and the defaults, a pass has B * C ~ 21 400
    particle-points (~ 512 MiB of working memory); the process stays well under 2 GB.

    :param num_samples: K.
    :param batch_size: data points per pass (tensor data); a DataLoader's batches are used as they come.
    :param chunk_size: particles per pass; default from ``memory_budget``.
    :param memory_budget: working-memory budget in bytes for choosing ``chunk_size`` / ``batch_size``.
    :param compile: compute the log weights on a captured, compiled graph (:class:`~pyro_vae.compiling.Captured`;
        any model/guide; the same draws; each new batch or chunk shape is captured once).
    """
    num_samples = int(num_samples)
    if num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if (torch.is_tensor(data) or _is_tensor_tuple(data)) and batch_size is None:
        x = _first(data)
        batch_size = _auto_batch_size(memory_budget, num_samples, chunk_size, x[0].numel(), x.element_size())
    out, draw = [], _drawer(model, guide, compile)
    released = time.monotonic()
    with _progress(progress, _num_points(data), f"log p(x), K={num_samples}") as bar:
        for args in _batches(data, batch_size):
            chunk = min(int(chunk_size or _default_chunk(memory_budget, args[0])), num_samples)
            out.append(_batch_log_likelihood(draw, args, num_samples, chunk))
            bar.update(len(out[-1]))
            if time.monotonic() - released > RELEASE_INTERVAL_S:
                release_freed_memory()
                released = time.monotonic()
    return torch.cat(out)


#: seconds between two :func:`release_freed_memory` calls in :func:`log_likelihood` (each took about 8 ms there)
RELEASE_INTERVAL_S = 1.0
_LIBC = None


def release_freed_memory() -> bool:
    """Hands the C heap's free memory back to the operating system (glibc's ``malloc_trim(0)``); False where
    there is no glibc (nothing is done).

    Why: glibc serves a freed allocation above its mmap threshold by raising the threshold to that size (up
    to 32 MiB), so the chunk-sized tensors of an importance-sampled evaluation, allocated and freed thousands of
    times in slightly different sizes, come from the heap afterwards, and the heap's free pages are not given
    back. Measured on MNIST with K = 5000 (4 points x 2500 particles a pass): the process grew by ~3.5 MB a
    pass and was killed at 21 GB on the 10 000 test digits; trimming once a second keeps it at 1.1 GB, for
    under 1% of the time (a trim took about 8 ms)."""
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
            _LIBC = libc if libc is not None and hasattr(libc, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if not _LIBC:
        return False
    _LIBC.malloc_trim(0)
    return True


def _batch_log_likelihood(draw, args: tuple, num_samples: int, chunk: int) -> torch.Tensor:
    """logsumexp_k log w_k - log K per data point of one batch, K particles drawn ``chunk`` at a time."""
    draws = []  # the last chunk's particles only (their cell layout): one chunk alive at a time

    def chunks():
        for start in range(0, num_samples, chunk):
            draws[:] = [draw(args, min(chunk, num_samples - start))]
            yield draws[-1].log_weights

    log_sum = streaming_logsumexp(chunks())
    return draws[-1].per_point(log_sum - math.log(num_samples))


# ---------------------------------------------------------------------------------------------- latents
def _encoder_output(encoder, args: tuple):
    if hasattr(encoder, "encode"):
        return encoder.encode(*args)
    if callable(encoder):
        return encoder(*args)
    raise TypeError(f"expected a VAE (with .encode(x)) or a function x -> distribution/means, got {encoder!r}")


def _posterior_mean(encoder, args: tuple) -> torch.Tensor:
    if hasattr(encoder, "posterior_mean"):
        return encoder.posterior_mean(*args)
    out = _encoder_output(encoder, args)
    return out.mean if isinstance(out, Distribution) else out


@torch.no_grad()
def posterior_means(encoder, data, batch_size: int | None = 256) -> torch.Tensor:
    """E_q[z | x_n] for every data point, shape (N, d).

    ``encoder``: a VAE-like object with ``.posterior_mean(x)`` or ``.encode(x)`` (a distribution with
    ``.mean``), or a function ``x -> Tensor[B, d]`` (the means) or ``x -> distribution``.
    """
    return torch.cat([_posterior_mean(encoder, args).reshape(len(args[0]), -1) for args in _batches(data, batch_size)])


def latent_activity(encoder, data, batch_size: int | None = 256) -> torch.Tensor:
    """A_u = Cov_x(E_q[z_u | x]) per latent dimension u, shape (d,) (Burda et al. 2016, sec. 5.2)."""
    means = posterior_means(encoder, data, batch_size)
    if means.shape[0] < 2:
        raise ValueError("latent activity needs at least two data points")
    return means.var(dim=0, unbiased=True)


def active_units(encoder, data, threshold: float = 0.01, batch_size: int | None = 256) -> int:
    """Number of active latent units, A_u = Cov_x(E_q[z_u | x]) > ``threshold`` (Burda et al. 2016: 0.01)."""
    return int((latent_activity(encoder, data, batch_size) > threshold).sum())


def _gaussian_marginals(q: Distribution):
    """(loc, variance) of each latent coordinate's marginal for Gaussian q, else None."""
    if isinstance(q, Independent) and isinstance(q.base_dist, Normal) and q.reinterpreted_batch_ndims == 1:
        return q.base_dist.loc, q.base_dist.scale.pow(2)
    if isinstance(q, Normal):
        return q.loc, q.scale.pow(2)
    if isinstance(q, MultivariateNormal):
        return q.loc, q._unbroadcasted_scale_tril.pow(2).sum(-1).expand_as(q.loc)
    if isinstance(q, LowRankMultivariateNormal):
        var = q._unbroadcasted_cov_factor.pow(2).sum(-1) + q._unbroadcasted_cov_diag
        return q.loc, var.expand_as(q.loc)
    return None


def _kl_marginals_to_standard_normal(q: Distribution, num_samples: int) -> torch.Tensor | None:
    """KL(q(z_u|x) || N(0,1)) per point and coordinate, shape (B, d), or None if q has no usable marginals."""
    marginals = _gaussian_marginals(q)
    if marginals is not None:
        loc, var = marginals
        return 0.5 * (var + loc.pow(2) - 1 - var.log())
    if isinstance(q, Independent) and q.reinterpreted_batch_ndims == 1 and q.base_dist.event_shape == ():
        base = q.base_dist
        zeros = torch.zeros_like(base.sample())
        standard = Normal(zeros, torch.ones_like(zeros))
        try:
            return torch.distributions.kl_divergence(base, standard)
        except NotImplementedError:
            z = base.sample((num_samples,))  # Monte Carlo: E_q[log q_u(z_u) - log N(z_u; 0, 1)]
            return (base.log_prob(z) - standard.log_prob(z)).mean(0)
    return None


@torch.no_grad()
def kl_per_dimension(encoder, data, batch_size: int | None = 256, num_samples: int = 256) -> torch.Tensor:
    """E_x KL(q(z_u | x) || N(0, 1)) for each latent coordinate u, shape (d,).

    Closed form 1/2 (s_u^2 + m_u^2 - 1 - log s_u^2) for Gaussian posteriors (diagonal: m_u, s_u; full or
    low-rank covariance: the marginals, s_u^2 = S_uu); for other factorized posteriors
    (``Independent`` of a univariate family) torch's closed form when registered, else a Monte Carlo
    estimate with ``num_samples`` draws. Posteriors without per-coordinate marginal densities (e.g. flows)
    give NaN with a warning. ``encoder`` is a VAE-like object with ``.encode(x)`` or a function
    ``x -> distribution`` with batch_shape (B,) and event_shape (d,).
    """
    total, count = None, 0
    for args in _batches(data, batch_size):
        q = _encoder_output(encoder, args)
        if not isinstance(q, Distribution):
            raise TypeError(f"kl_per_dimension needs the posterior distribution, got {type(q).__name__}")
        kl = _kl_marginals_to_standard_normal(q, num_samples)
        if kl is None:
            warnings.warn(f"kl_per_dimension: {type(q).__name__} posterior has no per-coordinate marginal "
                          "densities; returning NaN", RuntimeWarning, stacklevel=2)
            return torch.full(q.event_shape, float("nan"))
        total = kl.sum(0) if total is None else total + kl.sum(0)
        count += kl.shape[0]
    return total / count


# ---------------------------------------------------------------------------------------------- any model/guide
# The functions below work on the traces of any model/guide pair (a model of the user's own, docs/own-model.md):
# the *local* latent sites are the guide's sample sites inside the data plate, the vectorized plate of size N
# (the batch) around the model's observed site.
import dataclasses as _dataclasses  # noqa: E402

import pyro as _pyro  # noqa: E402
import pyro.poutine as _poutine  # noqa: E402
from pyro.poutine.messenger import Messenger as _Messenger  # noqa: E402


@_dataclasses.dataclass
class LocalSite:
    """A local latent site of one batch: its guide site (q), its model site (p, given the guide's draws), and
    ``dim``, the data plate's dim. A value of shape ``batch_shape + event_shape`` is one row per point by
    :meth:`per_point`."""

    name: str
    guide_site: dict
    model_site: dict | None
    dim: int

    @property
    def fn(self):
        return self.guide_site["fn"]

    @property
    def shape(self) -> torch.Size:
        return self.fn.batch_shape + self.fn.event_shape

    @property
    def is_vector(self) -> bool:
        """One scalar or one vector per point: batch_shape (N,) at the data dim, event_dim <= 1."""
        batch = self.fn.batch_shape
        return self.fn.event_dim <= 1 and len(batch) == -self.dim and all(s == 1 for s in batch[1:])

    def per_point(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """``t`` (broadcastable to the site's value shape) as (N, d): the data axis first, the rest flattened."""
        axis = len(self.fn.batch_shape) + self.dim
        return t.expand(self.shape).movedim(axis, 0).reshape(n, -1)


def _observed_sites(model_trace) -> dict:
    return {k: s for k, s in model_trace.nodes.items() if s["type"] == "sample" and s["is_observed"]}


def data_plates(model_trace, n: int) -> dict:
    """{name: dim} of the vectorized plates of size ``n`` around the model's observed sites (the data plate)."""
    plates = {f.name: f.dim for site in _observed_sites(model_trace).values()
              for f in site["cond_indep_stack"] if f.vectorized and f.size == n}
    if not plates:
        raise ValueError(f"the model's observed site is not inside a plate of the batch size {n}: the protocol needs "
                         "every per-point site inside one data plate, pyro.plate('data', len(x)) (docs/own-model.md)")
    return plates


def trace_pair(model, guide, args: tuple, guide_messenger=None):
    """(model_trace, guide_trace) of one batch: the guide (under ``guide_messenger`` if given), then the model
    replayed against its draws."""
    traced_guide = guide if guide_messenger is None else guide_messenger(guide)
    guide_trace = _poutine.trace(traced_guide).get_trace(*args)
    model_trace = _poutine.trace(_poutine.replay(model, trace=guide_trace)).get_trace(*args)
    return model_trace, guide_trace


def local_sites(model, guide, args: tuple, traces=None) -> list[LocalSite]:
    """The guide's latent sample sites inside the data plate, in the guide's order."""
    model_trace, guide_trace = traces or trace_pair(model, guide, args)
    plates = data_plates(model_trace, args[0].shape[0])
    out = []
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site["infer"].get("is_auxiliary"):
            continue
        dims = [f.dim for f in site["cond_indep_stack"] if f.vectorized and f.name in plates]
        if dims:
            out.append(LocalSite(name, site, model_trace.nodes.get(name), dims[0]))
    return out


def _is_discrete(fn) -> bool:
    return bool(getattr(fn.support, "is_discrete", False))


def site_mean(fn, num_samples: int = 64) -> torch.Tensor:
    """E[z] of a site's distribution: ``fn.mean`` where it exists and is finite, else the mean of draws."""
    try:
        mean = fn.mean
        if torch.isfinite(mean).all():
            return mean.expand(fn.batch_shape + fn.event_shape)
    except NotImplementedError:
        pass
    return fn.sample((int(num_samples),)).mean(0)


def _marginal_kl(q, p, num_samples: int) -> torch.Tensor | None:
    r"""KL(q(z_u) || p(z_u)) per coordinate u of two vector (or scalar) sites, shape batch + (d,), or None:

        Gaussian marginals (m, v) of both:  1/2 [log(v_p / v_q) + (v_q + (m_q - m_p)^2) / v_p - 1];
        factorized (Independent) univariate families: torch's closed form, else E_q[log q_u - log p_u] by
        ``num_samples`` draws."""
    mq, mp = _gaussian_marginals(q), _gaussian_marginals(p)
    if mq is not None and mp is not None:
        (lq, vq), (lp, vp) = mq, mp
        return 0.5 * ((vp / vq).log() + (vq + (lq - lp).pow(2)) / vp - 1)
    base = [d.base_dist if isinstance(d, Independent) and d.reinterpreted_batch_ndims == q.event_dim else d
            for d in (q, p)]
    if q.event_dim > 1 or any(b.event_shape != () for b in base):
        return None
    try:
        kl = torch.distributions.kl_divergence(*base)
    except NotImplementedError:
        z = base[0].sample((int(num_samples),))
        kl = (base[0].log_prob(z) - base[1].log_prob(z)).mean(0)
    return kl if q.event_dim == 1 else kl.unsqueeze(-1)


@torch.no_grad()
def latent_site_statistics(model, guide, data, batch_size: int | None = 256, threshold: float = 0.01,
                           num_samples: int = 256) -> dict:
    r"""Latent usage of any model/guide, per local latent site s (the guide's continuous sites in the data plate):

    * ``active_units``: #{u : A_u > ``threshold``}, A_u = Cov_x(E_q[z_su | x]) (Burda et al. 2016, sec. 5.2;
      for a site whose guide depends on other latents, E_q[z_s | x, z_parents] at drawn parents);
    * ``kl_per_dimension`` (vector or scalar sites): E_x KL(q(z_su | x) || p(z_su)) per coordinate, the
      marginals of q against the model's p(z_s | ...) at the guide's draws (:func:`_marginal_kl`); NaN where
      neither closed form nor a factorized Monte Carlo estimate exists; None for other shapes.

    Returns {site: {"dims", "active_units", "activity", "kl_per_dimension"}}. Discrete sites are skipped.
    """
    means, kls, sites_seen = {}, {}, {}
    for args in _batches(data, batch_size):
        n = args[0].shape[0]
        for site in local_sites(model, guide, args):
            if _is_discrete(site.fn):
                continue
            sites_seen[site.name] = site
            means.setdefault(site.name, []).append(site.per_point(site_mean(site.fn), n))
            kl = None
            if site.is_vector and site.model_site is not None:
                kl = _marginal_kl(site.fn, site.model_site["fn"], num_samples)
            kls.setdefault(site.name, []).append(None if kl is None else site.per_point(kl, n))
    out = {}
    for name, parts in means.items():
        m = torch.cat(parts)
        if m.shape[0] < 2:
            raise ValueError("latent activity needs at least two data points")
        activity = m.var(dim=0, unbiased=True)
        kl = kls[name]
        kl = None if any(k is None for k in kl) else torch.cat(kl).mean(0)
        out[name] = {"dims": int(m.shape[1]), "active_units": int((activity > threshold).sum()),
                     "activity": activity.tolist(),
                     "kl_per_dimension": None if kl is None else [float(v) if math.isfinite(v) else None
                                                                  for v in kl.tolist()]}
    return out


class _GuideMeans(_Messenger):
    """Each continuous latent sample site takes its distribution's mean (:func:`site_mean`) instead of a draw."""

    def _pyro_sample(self, msg):
        if (msg["is_observed"] or msg["value"] is not None or not hasattr(msg["fn"], "support")  # plates' subsample
                or _is_discrete(msg["fn"])):
            return
        msg["value"] = site_mean(msg["fn"])


def observed_site(model_trace, x: torch.Tensor) -> str:
    """The name of the observed site that holds ``x`` (the first observed site with as many values)."""
    for name, site in _observed_sites(model_trace).items():
        if torch.is_tensor(site["value"]) and site["value"].numel() == x.numel():
            return name
    raise ValueError(f"the model has no observed site holding x (its observed sites: "
                     f"{', '.join(_observed_sites(model_trace)) or 'none'}): observe the data with obs=x")


@torch.no_grad()
def reconstruct(model, guide, x: torch.Tensor, *args) -> torch.Tensor:
    r"""E[x | z] at z = the guide's mean (each site's, where it has one; else a draw), replayed through the model:
    the observed site's mean, shaped like ``x``."""
    model_trace, _ = trace_pair(model, guide, (x, *args), guide_messenger=_GuideMeans())
    site = model_trace.nodes[observed_site(model_trace, x)]
    return site["fn"].mean.reshape(x.shape)


SAMPLING_PROTOCOL = ("pyro-vae generates with pyro.infer.Predictive on model(None, batch_size=n), which must then "
                     "draw the observed site for n points (docs/own-model.md)")


@torch.no_grad()
def sample_model(model, n: int, observed: str, *, mean: bool = True, shape=None) -> torch.Tensor:
    r"""n draws of the model's prior predictive through ``pyro.infer.Predictive`` on ``model(None,
    batch_size=n)``: the observed site ``observed`` drawn x ~ p(x | z) (``mean=False``), or its mean E[x | z] at
    the latents Predictive drew (``mean=True``), reshaped to ``(n, *shape)`` when ``shape`` is given and fits.

    A model that cannot be called that way is a one-line ValueError stating the protocol."""
    n = int(n)
    try:
        draws = _pyro.infer.Predictive(model, num_samples=1, return_sites=None)(None, batch_size=n)
        if observed not in draws:
            raise ValueError(f"no site {observed!r} was drawn")
        if mean:
            latents = {k: v[0] for k, v in draws.items() if k != observed}
            trace = _poutine.trace(_poutine.condition(model, data=latents)).get_trace(None, batch_size=n)
            out = trace.nodes[observed]["fn"].mean
        else:
            out = draws[observed][0]
    except Exception as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"cannot sample from the model: {SAMPLING_PROTOCOL}; it raised {type(e).__name__}"
                         + (f": {text}" if text else "")) from None
    if out.dim() == 0 or out.shape[0] != n:
        raise ValueError(f"cannot sample from the model: {SAMPLING_PROTOCOL}; it drew {tuple(out.shape)}, not {n} points")
    if shape is not None and out[0].numel() == math.prod(shape):
        out = out.reshape(n, *shape)
    return out


@torch.no_grad()
def local_site_means(model, guide, data, batch_size: int | None = 256, site: str | None = None) -> torch.Tensor:
    """E_q[z_s | x_n] of one local latent site (``site``, default the guide's first continuous one), (N, d)."""
    out = []
    for args in _batches(data, batch_size):
        sites = [s for s in local_sites(model, guide, args) if not _is_discrete(s.fn)]
        chosen = next((s for s in sites if site is None or s.name == site), None)
        if chosen is None:
            raise ValueError(f"the guide has no continuous local latent site {site or ''}".rstrip())
        out.append(chosen.per_point(site_mean(chosen.fn), args[0].shape[0]))
    return torch.cat(out)
