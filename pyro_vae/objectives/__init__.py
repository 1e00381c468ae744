"""Variational objectives for VAEs written the Pyro way (decoder = model, encoder = guide).

* :class:`AnalyticKLELBO`: E_q[log p(x|z)] - beta * KL(q(z|x) || p(z)) with closed-form KL terms.
* :class:`IWAEELBO`: the importance-weighted bound IWAE_K per data point, gradient estimators
  ``"iwae"``, ``"dreg"``, ``"stl"``.
* :func:`make_objective`: an objective by name, for configs and the command line.

Importing this package registers the Gaussian KL pairs of :mod:`pyro_vae.objectives.kl` with
``pyro.distributions.kl_divergence``. Derivations: ``docs/objectives.md``.
"""
from __future__ import annotations

from typing import Callable

import pyro.infer

from . import kl  # noqa: F401  (registers the KL pairs)
from .analytic_kl import AnalyticKLELBO
from .fisher import FisherELBO
from .iwae import ESTIMATORS, IWAEELBO

__all__ = ["AnalyticKLELBO", "IWAEELBO", "FisherELBO", "ESTIMATORS", "OBJECTIVES", "make_objective"]


def _trace_elbo(*, num_particles: int = 1, **_) -> pyro.infer.ELBO:
    return pyro.infer.Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1)


def _analytic(*, num_particles: int = 1, beta: float = 1.0, **_) -> pyro.infer.ELBO:
    return AnalyticKLELBO(num_particles=num_particles, beta=beta)


def _iwae(*, num_particles: int = 1, estimator: str = "iwae", **_) -> pyro.infer.ELBO:
    return IWAEELBO(num_particles=num_particles, estimator=estimator)


#: name -> factory(num_particles=, estimator=, beta=) -> pyro.infer.ELBO. Add an entry to add an objective.
OBJECTIVES: dict[str, Callable[..., pyro.infer.ELBO]] = {
    "elbo": _trace_elbo,
    "analytic": _analytic,
    "iwae": _iwae,
    "fisher": lambda *, num_particles=1, **_: FisherELBO(num_particles=num_particles),
}


def make_objective(name: str, *, num_particles: int = 1, estimator: str = "iwae", beta: float = 1.0
                   ) -> pyro.infer.ELBO:
    """The objective called ``name``, a :class:`pyro.infer.ELBO` usable with :class:`pyro.infer.SVI`.

    * ``"elbo"``: :class:`pyro.infer.Trace_ELBO` with ``num_particles`` (vectorized when > 1). It has no KL
      weight: ``beta`` other than 1 is rejected, use ``"analytic"``.
    * ``"analytic"``: :class:`AnalyticKLELBO` (closed-form KL, KL weight ``beta``).
    * ``"iwae"``: :class:`IWAEELBO` with K = ``num_particles`` and gradient ``estimator`` in
      ``{"iwae", "dreg", "stl"}``.

    ``estimator`` is used by ``"iwae"`` only; ``beta`` by ``"analytic"`` only (other objectives reject
    beta != 1 rather than silently ignoring it).
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(sorted(OBJECTIVES))}")
    if int(num_particles) < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
    if beta != 1.0 and name != "analytic":
        raise ValueError(f"objective {name!r} has no KL weight; beta={beta} needs the 'analytic' objective")
    return OBJECTIVES[name](num_particles=int(num_particles), estimator=estimator, beta=beta)
