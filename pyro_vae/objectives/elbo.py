r"""The evidence lower bound by reparameterized Monte Carlo, with a KL weight.

    ELBO_beta(x) = E_{q(z|x)}[log p(x|z)] - beta * KL(q(z|x) || p(z))
                 ~ (1/K) sum_k [log p(x|z_k) - beta (log q(z_k|x) - log p(z_k))],   z_k ~ q(z|x)

(Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014, eq. 3; beta != 1: Higgins et al.,
"beta-VAE", ICLR 2017). With beta = 1 this is Pyro's :class:`~pyro.infer.Trace_ELBO` for reparameterized
guides (same value and gradients for the same seed), which the trainer maps to this class to use a VAE's
trace-free twin. Formula: :func:`pyro_vae.objectives.bounds.elbo`.
"""
from __future__ import annotations

from .base import ParticleObjective
from .bounds import elbo

__all__ = ["MonteCarloELBO"]


class MonteCarloELBO(ParticleObjective):
    r"""ELBO_beta with the KL estimated by Monte Carlo: ``loss = -scale * sum_n (1/K) sum_k [log p(x_n|z_kn)
    - beta (log q(z_kn|x_n) - log p(z_kn))]``. All guide sites must be reparameterizable.

    :param int num_particles: K.
    :param float beta: KL weight; a plain attribute, so a trainer can anneal ``objective.beta``.
    :param kwargs: see :class:`~pyro_vae.objectives.base.ParticleObjective`.
    """

    def __init__(self, num_particles: int = 1, beta: float = 1.0, **kwargs):
        super().__init__(num_particles=num_particles, **kwargs)
        self.beta = float(beta)

    def bound(self, particles):
        return elbo(particles, beta=self.beta)
