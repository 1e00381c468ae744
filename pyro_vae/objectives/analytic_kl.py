r"""The ELBO with closed-form KL terms and a tunable KL weight beta.

    ELBO_beta(x) = E_{q(z|x)}[log p(x|z)] - beta * KL(q(z|x) || p(z))

(Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014, eq. 10 for beta = 1; Higgins et al.,
"beta-VAE", ICLR 2017 for beta != 1; Bowman et al. 2016 anneal beta from 0 to 1.) The expectation is
estimated by reparameterized Monte Carlo with ``num_particles`` samples; the KL of each latent site is
computed in closed form with :func:`pyro.distributions.kl_divergence` whenever a formula is registered
(importing :mod:`pyro_vae.objectives` registers the Gaussian pairs of :mod:`pyro_vae.objectives.kl`) and by
Monte Carlo, log q(z|x) - log p(z), otherwise, with a one-time warning naming the site.
Formula: :func:`pyro_vae.objectives.bounds.elbo` with ``analytic_kl=True``.
"""
from __future__ import annotations

from .bounds import elbo
from .elbo import MonteCarloELBO

__all__ = ["AnalyticKLELBO"]


class AnalyticKLELBO(MonteCarloELBO):
    r"""ELBO = E_q[log p(x|z)] - beta * KL(q(z|x) || p(z)), KL in closed form per latent site.

    For every latent site z_s (present in model and guide)::

        KL_s = kl_divergence(q_s, p_s)             if registered (exact, zero variance)
             = log q_s(z_s) - log p_s(z_s)         otherwise (Monte Carlo; warns once per site)

    and the loss is the negative estimate, summed over the batch with Pyro's plate scales (a subsampled plate
    of B out of N points is scaled by N/B, exactly as in :class:`~pyro.infer.Trace_ELBO`)::

        loss = -(1/K) sum_k [ sum_{observed x} log p(x | z_k) - beta * sum_s KL_s(z_k) ]

    Guide-only (auxiliary) sites contribute -beta * log q. With ``beta = 1`` and a mean-field guide this is
    the estimator of :class:`~pyro.infer.TraceMeanField_ELBO` (same value and gradients for the same seed).
    As there, the closed-form KL is correct when every guide site's distribution does not depend on latent
    variables that the matching model site's parents depend on (true for the VAE pattern).

    :param int num_particles: K, reparameterized samples of z per data point.
    :param float beta: KL weight; a plain attribute, so a trainer can anneal ``objective.beta``.
    :param kwargs: see :class:`~pyro_vae.objectives.base.ParticleObjective`.
    """

    needs_kl = True
    needs_log_weights = False  # the formula reads log p(x|z) and the KL only

    def bound(self, particles):
        return elbo(particles, beta=self.beta, analytic_kl=True)
