"""Forcing the score-function (REINFORCE) estimator in Pyro: a guide whose latent sites have no rsample.

``score_function(guide)`` makes every latent sample site of ``guide`` non-reparameterized, so Pyro's
:class:`~pyro.infer.TraceGraph_ELBO` builds the score-function surrogate for it,

    grad_phi E_q[f(z)] = E_q[f(z) grad_phi log q_phi(z)]      (Williams, 1992),

optionally with Pyro's decaying-average baseline. Used by the gradient-variance study
(:mod:`pyro_vae.studies.gradient_variance`, ``pyro-vae gradient-variance``).
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch

from pyro.distributions.torch_distribution import TorchDistribution
from pyro.poutine.messenger import Messenger

__all__ = ["NonReparameterized", "ScoreFunctionMessenger", "score_function"]


class NonReparameterized(TorchDistribution):
    """Wrap a distribution so Pyro treats it as NOT reparameterizable (``has_rsample = False``).

    Samples are drawn without a pathwise gradient; ``log_prob`` (and hence the score
    ``grad log q``) is the base distribution's. Pyro's ``TraceGraph_ELBO`` then builds the
    score-function (REINFORCE) surrogate for the site (``ScoreParts(log_prob, score_function=log_prob,
    entropy_term=0)``).
    """

    arg_constraints = {}
    has_rsample = False

    def __init__(self, base_dist, validate_args=None):
        self.base_dist = base_dist
        super().__init__(base_dist.batch_shape, base_dist.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base_dist.support

    @property
    def has_enumerate_support(self):
        return False

    @property
    def mean(self):
        return self.base_dist.mean

    @property
    def variance(self):
        return self.base_dist.variance

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return self.base_dist.sample(sample_shape)

    def rsample(self, sample_shape=torch.Size()):
        raise NotImplementedError("NonReparameterized has no rsample: that is its purpose")

    def log_prob(self, value):
        return self.base_dist.log_prob(value)

    def entropy(self):
        return self.base_dist.entropy()

    def expand(self, batch_shape, _instance=None):
        return NonReparameterized(self.base_dist.expand(batch_shape))


class ScoreFunctionMessenger(Messenger):
    """Make latent sample sites non-reparameterized (see :class:`NonReparameterized`).

    :param sites: names of the sites to change, or None for every unobserved sample site.
    :param baseline: None, or a dict of Pyro baseline options put in ``site["infer"]["baseline"]``,
        e.g. ``{"use_decaying_avg_baseline": True, "baseline_beta": 0.9}`` (note: Pyro's key is
        ``"baseline"``, singular).
    """

    def __init__(self, sites: Iterable[str] | None = None, baseline: Mapping | None = None):
        super().__init__()
        self.sites = None if sites is None else frozenset(sites)
        self.baseline = None if baseline is None else dict(baseline)

    def _pyro_sample(self, msg):
        if msg["is_observed"] or (self.sites is not None and msg["name"] not in self.sites):
            return
        if not isinstance(msg["fn"], torch.distributions.Distribution):  # e.g. a plate's subsample site
            return
        if not isinstance(msg["fn"], NonReparameterized):
            msg["fn"] = NonReparameterized(msg["fn"])
        if self.baseline:
            infer = dict(msg.get("infer") or {})
            infer["baseline"] = {**infer.get("baseline", {}), **self.baseline}
            msg["infer"] = infer


def score_function(fn: Callable | None = None, sites=None, baseline=None):
    """Handler form of :class:`ScoreFunctionMessenger`: ``score_function(guide)`` is a guide whose latent
    sites are sampled without rsample, so ``TraceGraph_ELBO`` uses the score-function estimator."""
    msngr = ScoreFunctionMessenger(sites=sites, baseline=baseline)
    return msngr(fn) if fn is not None else msngr
