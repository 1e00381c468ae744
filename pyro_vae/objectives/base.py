"""The base of every objective of this package: draw particles, apply one formula, return a Pyro loss.

A :class:`ParticleObjective` is a :class:`pyro.infer.ELBO`, so it works with :class:`pyro.infer.SVI` on any
model/guide; its ``differentiable_loss`` makes it usable as a torch loss (and inside
``DistributedDataParallel``). Particles come from :func:`~pyro_vae.particles.draw_particles`: the model's
trace-free twin when it has one (a :class:`~pyro_vae.vae.VAE`'s own model/guide), Pyro traces otherwise.
A subclass states which optional terms its formula reads (``needs_kl``, :meth:`needs_stop_q`) and
implements :meth:`bound`.
"""
from __future__ import annotations

import functools
import warnings

import torch

from pyro.infer import ELBO
from pyro.util import warn_if_nan

from ..particles import Particles, draw_particles, guess_plate_nesting, handlers_active, particle_twin, run_traces

__all__ = ["ParticleObjective"]


class ParticleObjective(ELBO):
    """An objective that is a formula of K particles per data point (see :mod:`pyro_vae.objectives.bounds`).

    :param int num_particles: K.
    :param max_plate_nesting: the model's plate nesting, *not* counting the particle plate; guessed from one
        dry run when ``inf`` (the trace-free twin needs none).
    :param bool vectorize_particles: draw the K particles in one batched pass (default); ``False`` averages K
        single-particle bounds drawn one after another (for models with dynamic structure).
    :param kwargs: passed on to :class:`pyro.infer.ELBO` (e.g. ``retain_graph``).
    """

    #: the formula reads the closed-form KL term of the particles
    needs_kl = False
    #: the formula reads log p(z) and log q(z|x) (False lets a trace-free twin skip them)
    needs_log_weights = True

    def __init__(self, num_particles: int = 1, max_plate_nesting=float("inf"), vectorize_particles: bool = True,
                 **kwargs):
        if isinstance(num_particles, bool) or int(num_particles) != num_particles or int(num_particles) < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
        super().__init__(num_particles=int(num_particles), max_plate_nesting=max_plate_nesting,
                         vectorize_particles=vectorize_particles, **kwargs)
        self.max_plate_nesting = max_plate_nesting  # ELBO.__init__ adds 1 for particles; we keep the model's own
        self._warned_sites: set[str] = set()

    # ------------------------------------------------------------------------------------------ the formula
    def needs_stop_q(self, for_gradients: bool) -> bool:
        """Whether the formula reads log q with stop-gradient parameters (for its gradient estimator)."""
        return False

    def bound(self, particles: Particles) -> tuple[torch.Tensor, torch.Tensor]:
        """(bound, surrogate) of one draw: the scaled, summed bound and the tensor whose gradient is the
        estimator (equal in value)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ particles
    def _draws(self, model, guide, args, kwargs, for_gradients: bool):
        """The particle draws: one of K vectorized particles, or K of one particle each."""
        stop_q = self.needs_stop_q(for_gradients)
        draws, k = (1, self.num_particles) if self.vectorize_particles else (self.num_particles, 1)
        for _ in range(draws):
            yield draw_particles(model, guide, args, kwargs, num_particles=k, stop_q=stop_q, kl=self.needs_kl,
                                 log_weights=self.needs_log_weights,
                                 plate_nesting=lambda: self._plate_nesting(model, guide, args, kwargs),
                                 require_rsample=for_gradients)

    def _plate_nesting(self, model, guide, args, kwargs) -> int:
        """The model's own plate nesting, guessed once from a dry run (only traced models need it)."""
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = guess_plate_nesting(model, guide, args, kwargs)
        return int(self.max_plate_nesting)

    def _warn_monte_carlo_kl(self, particles: Particles) -> None:
        """Warn once per site whose KL falls back to Monte Carlo, unless the particles say the fallback is by
        design there (``Particles.kl_monte_carlo_expected``: the site's guide or model distribution carries a
        ``kl_monte_carlo_reason``, e.g. a learned prior, which has no closed form)."""
        for name in particles.kl_monte_carlo:
            if name not in self._warned_sites and name not in particles.kl_monte_carlo_expected:
                self._warned_sites.add(name)
                warnings.warn(f"{type(self).__name__}: no closed-form KL registered for latent site {name!r}; "
                              "using the Monte Carlo estimate log q(z) - log p(z) for it", RuntimeWarning,
                              stacklevel=5)

    def _bound_and_surrogate(self, model, guide, args, kwargs, for_gradients: bool):
        """(bound, surrogate) of one vectorized draw, or the average over K single-particle draws."""
        results = [self._checked_bound(particles)
                   for particles in self._draws(model, guide, args, kwargs, for_gradients)]
        if len(results) == 1:
            return results[0]
        return tuple(sum(values) / len(values) for values in zip(*results))

    def _checked_bound(self, particles: Particles):
        if particles.kl_monte_carlo:
            self._warn_monte_carlo_kl(particles)
        return self.bound(particles)

    def bind(self, model, guide):
        """``loss(*args, **kwargs)``, equal to ``surrogate_loss(model, guide, *args, **kwargs)``, with the
        particle producer chosen once: the model's trace-free twin, called directly (what a trainer steps).
        A call made while a Pyro handler is active traces instead, as :func:`~pyro_vae.particles.draw_particles`
        does."""
        twin = particle_twin(model, guide, ignore_handlers=True)
        if twin is None or (self.num_particles > 1 and not self.vectorize_particles):  # (one particle: the same)
            return functools.partial(self.surrogate_loss, model, guide)

        def loss(*args, **kwargs):
            if handlers_active():
                return self.surrogate_loss(model, guide, *args, **kwargs)
            particles = twin(*args, num_particles=self.num_particles, stop_q=self.needs_stop_q(True),
                             kl=self.needs_kl, log_weights=self.needs_log_weights, **kwargs)
            return -self._checked_bound(particles)[1]

        return loss

    # ------------------------------------------------------------------------------------------ pyro.infer.ELBO
    def _get_trace(self, model, guide, args, kwargs):
        """One (model_trace, guide_trace) pair with a single-particle plate (pyro.infer.ELBO's hook)."""
        model_trace, guide_trace, _ = run_traces(model, guide, args, kwargs, 1,
                                                 self._plate_nesting(model, guide, args, kwargs))
        return model_trace, guide_trace

    def surrogate_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The negative bound, as a tensor whose gradient is the objective's estimator, without the NaN warning
        (no host sync: what a trainer with its own divergence guard, or ``torch.compile``, calls)."""
        return -self._bound_and_surrogate(model, guide, args, kwargs, for_gradients=True)[1]

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The negative bound, as a tensor whose gradient is the objective's estimator (warns on NaN)."""
        loss = self.surrogate_loss(model, guide, *args, **kwargs)
        warn_if_nan(loss, "loss")
        return loss

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The negative bound as a float."""
        with torch.no_grad():
            bound, _ = self._bound_and_surrogate(model, guide, args, kwargs, for_gradients=False)
        return -float(bound)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The negative bound as a float, after backpropagating the estimator into the parameters."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return float(loss.detach())
