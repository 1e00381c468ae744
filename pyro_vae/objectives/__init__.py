"""Variational objectives for VAEs written the Pyro way (decoder = model, encoder = guide).

Every objective here is a :class:`pyro.infer.ELBO` (usable with :class:`pyro.infer.SVI` on any model/guide)
built on the particle core: :class:`~pyro_vae.objectives.base.ParticleObjective` draws K particles per data
point (:mod:`pyro_vae.particles`) and applies one formula of :mod:`pyro_vae.objectives.bounds`.

* :class:`MonteCarloELBO`: E_q[log p(x|z)] - beta * KL, the KL by Monte Carlo (Pyro's Trace_ELBO at beta = 1).
* :class:`AnalyticKLELBO`: the same with closed-form KL terms.
* :class:`IWAEELBO`: the importance-weighted bound IWAE_K, gradient estimators ``"iwae"``, ``"dreg"``, ``"stl"``.
* :class:`RenyiBound`: the variational Renyi bound VR_alpha, alpha in [0, 1) (alpha = 0 is IWAE).
* :class:`FisherELBO`: the Fisher auto-encoder objective (traced).

Two registries: :data:`OBJECTIVES` maps names (the command line's ``--objective``) to builders and the
options they take; :data:`EQUIVALENTS` maps Pyro's own objective *types* to the particle objective that
computes the same estimator, which is how the trainer runs ``Trace_ELBO`` on a VAE's trace-free twin.
Importing this package registers the Gaussian KL pairs of :mod:`pyro_vae.objectives.kl`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pyro.infer

from . import kl  # noqa: F401  (registers the KL pairs)
from .analytic_kl import AnalyticKLELBO
from .base import ParticleObjective
from .bounds import ESTIMATORS
from .elbo import MonteCarloELBO
from .fisher import FisherELBO
from .iwae import IWAEELBO
from .renyi import RenyiBound

__all__ = ["MonteCarloELBO", "AnalyticKLELBO", "IWAEELBO", "RenyiBound", "FisherELBO", "ParticleObjective",
           "ESTIMATORS", "OBJECTIVES", "ObjectiveSpec", "register_objective", "make_objective", "EQUIVALENTS",
           "as_particle_objective"]


@dataclass(frozen=True)
class ObjectiveSpec:
    """How to build a named objective: ``build(**options)``, the options it takes, and a one-line summary."""

    build: Callable[..., pyro.infer.ELBO]
    options: tuple
    summary: str


def _trace_elbo(num_particles: int = 1) -> pyro.infer.ELBO:
    return pyro.infer.Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1)


def _trace_enum_elbo(num_particles: int = 1) -> pyro.infer.ELBO:
    """Pyro's TraceEnum_ELBO: guide sites marked ``infer={"enumerate": "parallel"}`` (M2's label y) summed out
    exactly. No warning for a batch without enumerated sites (M2's labelled batches have none); the plate
    nesting is guessed from the first batch (fit guesses it without moving the random streams)."""
    return pyro.infer.TraceEnum_ELBO(num_particles=num_particles, strict_enumeration_warning=False)


#: name -> :class:`ObjectiveSpec`; :func:`register_objective` adds one (and the command line lists it).
OBJECTIVES: dict[str, ObjectiveSpec] = {
    "elbo": ObjectiveSpec(_trace_elbo, ("num_particles",), "Pyro's Trace_ELBO, the KL by Monte Carlo"),
    "analytic": ObjectiveSpec(AnalyticKLELBO, ("num_particles", "beta"), "ELBO with closed-form KL, weight beta"),
    "iwae": ObjectiveSpec(IWAEELBO, ("num_particles", "estimator"), "importance-weighted bound IWAE_K"),
    "renyi": ObjectiveSpec(RenyiBound, ("alpha", "num_particles", "estimator"),
                           "variational Renyi bound VR_alpha, alpha in [0, 1)"),
    "fisher": ObjectiveSpec(FisherELBO, ("num_particles",), "Fisher auto-encoder objective"),
    "enum": ObjectiveSpec(_trace_enum_elbo, ("num_particles",),
                          "Pyro's TraceEnum_ELBO, discrete latents summed out (the semi-supervised M2)"),
}


def register_objective(name: str, build: Callable[..., pyro.infer.ELBO], options=(), summary: str = "") -> None:
    """Make ``make_objective(name, **options)`` (and ``--objective name``) build ``build(**options)``."""
    OBJECTIVES[name] = ObjectiveSpec(build, tuple(options), summary)


def make_objective(name: str, **options) -> pyro.infer.ELBO:
    """The objective called ``name`` (see :data:`OBJECTIVES`), a :class:`pyro.infer.ELBO` usable with SVI.

    Options (``num_particles``, ``estimator``, ``beta``, ``alpha``) set to None count as not given; an option
    the objective does not take is an error naming it (``beta`` belongs to ``"analytic"``, ``estimator`` to
    ``"iwae"``/``"renyi"``, ``alpha`` to ``"renyi"``) rather than being silently ignored.
    """
    spec = OBJECTIVES.get(name)
    if spec is None:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    given = {k: v for k, v in options.items() if v is not None}
    refused = sorted(set(given) - set(spec.options))
    if refused:
        takes = ", ".join(spec.options) or "no options"
        raise ValueError(f"objective {name!r} does not take {', '.join(refused)} (it takes {takes})")
    if "num_particles" in given and (isinstance(given["num_particles"], bool) or int(given["num_particles"]) < 1):
        raise ValueError(f"num_particles must be a positive integer, got {given['num_particles']!r}")
    return spec.build(**given)


def _from_trace_elbo(objective) -> ParticleObjective:
    return MonteCarloELBO(num_particles=objective.num_particles, vectorize_particles=objective.vectorize_particles)


def _from_mean_field(objective) -> ParticleObjective:
    return AnalyticKLELBO(num_particles=objective.num_particles, vectorize_particles=objective.vectorize_particles)


#: Pyro objective type (exact) -> builder of the particle objective with the same estimator, for
#: reparameterized guides
EQUIVALENTS: dict[type, Callable[[pyro.infer.ELBO], ParticleObjective]] = {
    pyro.infer.Trace_ELBO: _from_trace_elbo,
    pyro.infer.TraceMeanField_ELBO: _from_mean_field,
}


def as_particle_objective(objective) -> ParticleObjective | None:
    """``objective`` itself if it is a :class:`ParticleObjective`, its equivalent if its type is in
    :data:`EQUIVALENTS`, else None (it is then used through its own ``differentiable_loss``)."""
    if isinstance(objective, ParticleObjective):
        return objective
    build = EQUIVALENTS.get(type(objective))
    return None if build is None else build(objective)
