r"""The ELBO with closed-form KL terms and a tunable KL weight beta.

    ELBO_beta(x) = E_{q(z|x)}[log p(x|z)] - beta * KL(q(z|x) || p(z))

(Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014, eq. 10 for beta = 1; Higgins et al.,
"beta-VAE", ICLR 2017 for beta != 1; Bowman et al. 2016 anneal beta from 0 to 1.) The expectation is
estimated by reparameterized Monte Carlo with ``num_particles`` samples, vectorized in one pass; the KL of
each latent site is computed in closed form with :func:`pyro.distributions.kl_divergence` whenever a formula
is registered (importing :mod:`pyro_vae.objectives` registers the Gaussian pairs of
:mod:`pyro_vae.objectives.kl`) and by Monte Carlo, log q(z|x) - log p(z), otherwise.
"""
from __future__ import annotations

import warnings

import torch

from pyro.distributions.kl import kl_divergence
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO
from pyro.util import warn_if_nan

from ._weights import TracedParticles, check_reparameterized, sample_sites, trace_particles

__all__ = ["AnalyticKLELBO"]


class AnalyticKLELBO(TracedParticles, ELBO):
    r"""ELBO = E_q[log p(x|z)] - beta * KL(q(z|x) || p(z)), KL in closed form per latent site.

    For every latent site z_s (present in model and guide)::

        KL_s = kl_divergence(q_s, p_s)             if registered (exact, zero variance)
             = log q_s(z_s) - log p_s(z_s)         otherwise (Monte Carlo; warns once per site)

    and the returned loss is the negative estimate, summed over the batch with Pyro's plate scales (so a
    subsampled plate of B out of N points is scaled by N/B, exactly as in :class:`~pyro.infer.Trace_ELBO`)::

        loss = -(1/K) sum_k [ sum_{observed x} log p(x | z_k) - beta * sum_s KL_s(z_k) ]

    Guide-only (auxiliary) sites contribute -beta * log q. With ``beta = 1`` and a mean-field guide this is
    the estimator of :class:`~pyro.infer.TraceMeanField_ELBO` (same value and gradients for the same seed);
    the differences are the KL weight, the vectorized particles, and the Gaussian KL pairs registered here.

    As with TraceMeanField_ELBO, the closed-form KL is correct when every guide site's distribution does
    not depend on latent variables that the matching model site's parents depend on (true for the VAE
    pattern: z ~ p(z), x ~ p(x|z); z ~ q(z|x)).

    :param int num_particles: K, reparameterized samples of z per data point.
    :param float beta: KL weight; a plain attribute, so a trainer can anneal ``objective.beta``.
    :param max_plate_nesting: the model's plate nesting, *not* counting the particle plate; guessed from one
        dry run when ``inf``.
    :param bool vectorize_particles: draw the K particles in one batched pass (particle plate at dim
        ``-(max_plate_nesting + 1)``); ``False`` loops over particles (for models with dynamic structure).
    :param kwargs: passed on to :class:`pyro.infer.ELBO` (e.g. ``retain_graph``).
    """

    def __init__(self, num_particles: int = 1, beta: float = 1.0, max_plate_nesting=float("inf"),
                 vectorize_particles: bool = True, **kwargs):
        if int(num_particles) < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
        super().__init__(num_particles=int(num_particles), max_plate_nesting=max_plate_nesting,
                         vectorize_particles=vectorize_particles, **kwargs)
        self.max_plate_nesting = max_plate_nesting  # ELBO.__init__ adds 1 for particles; we keep the model's
        self.beta = beta
        self._warned_sites: set[str] = set()

    # ------------------------------------------------------------------------------------------ traces

    def _particle_traces(self, model, guide, args, kwargs):
        """Yield (model_trace, guide_trace, particles_in_trace): one vectorized pass or K single passes."""
        nesting = self._plate_nesting(model, guide, args, kwargs)
        if self.vectorize_particles:
            model_trace, guide_trace, _ = trace_particles(model, guide, args, kwargs, self.num_particles, nesting)
            yield model_trace, guide_trace
        else:
            for _ in range(self.num_particles):
                model_trace, guide_trace, _ = trace_particles(model, guide, args, kwargs, 1, nesting)
                yield model_trace, guide_trace

    # ------------------------------------------------------------------------------------------ terms
    def _kl(self, name: str, model_site, guide_site) -> torch.Tensor:
        """Scaled, summed KL(q_s || p_s): closed form, or log q - log p with a one-time warning."""
        try:
            kl = kl_divergence(guide_site["fn"], model_site["fn"])
        except NotImplementedError:
            if name not in self._warned_sites:
                self._warned_sites.add(name)
                warnings.warn(
                    f"AnalyticKLELBO: no closed-form KL registered for latent site {name!r} "
                    f"(q = {type(guide_site['fn']).__name__}, p = {type(model_site['fn']).__name__}); "
                    "using the Monte Carlo estimate log q(z) - log p(z) for it", RuntimeWarning, stacklevel=4)
            return guide_site["log_prob_sum"] - model_site["log_prob_sum"]
        kl = scale_and_mask(kl, scale=guide_site["scale"], mask=guide_site["mask"])
        if not torch.is_tensor(kl):  # a Python number: same KL for every batch element
            return kl * torch.Size(guide_site["fn"].batch_shape).numel()
        return kl.sum()

    def elbo_terms(self, model_trace, guide_trace) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of log p(x|z) over observed sites, sum of KL over latent and auxiliary sites), both scaled
        by plate scales and summed over particles and data."""
        log_likelihood, kl = 0.0, 0.0
        guide_sites = sample_sites(guide_trace)
        for name, model_site in sample_sites(model_trace).items():
            if model_site["is_observed"]:
                log_likelihood = log_likelihood + model_site["log_prob_sum"]
            else:
                kl = kl + self._kl(name, model_site, guide_sites[name])
        for name, guide_site in guide_sites.items():
            if name not in model_trace.nodes:  # auxiliary guide site: its -log q belongs with the KL
                kl = kl + guide_site["log_prob_sum"]
        return torch.as_tensor(log_likelihood), torch.as_tensor(kl)

    # ------------------------------------------------------------------------------------------ API
    def _negative_elbo(self, model, guide, args, kwargs, for_gradients: bool) -> torch.Tensor:
        elbo = 0.0
        for model_trace, guide_trace in self._particle_traces(model, guide, args, kwargs):
            if for_gradients:
                check_reparameterized(guide_trace, type(self).__name__)
            log_likelihood, kl = self.elbo_terms(model_trace, guide_trace)
            elbo = elbo + (log_likelihood - self.beta * kl) / self.num_particles
        loss = -elbo
        warn_if_nan(loss, "loss")
        return loss

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """-ELBO_beta (a tensor; differentiable w.r.t. model and guide parameters)."""
        return self._negative_elbo(model, guide, args, kwargs, for_gradients=True)

    def loss(self, model, guide, *args, **kwargs) -> float:
        """-ELBO_beta as a float."""
        with torch.no_grad():
            return float(self._negative_elbo(model, guide, args, kwargs, for_gradients=False))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """-ELBO_beta as a float, after backpropagating its gradient into the parameters."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return float(loss.detach())

