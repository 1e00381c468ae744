r"""The variational Renyi bound VR_alpha (Li & Turner, "Renyi Divergence Variational Inference", NeurIPS 2016).

For one data point x and K particles z_k ~ q(z|x) with weights w_k = p(x, z_k) / q(z_k|x),

    VR_alpha(x) = E[ 1/(1 - alpha) log (1/K) sum_k w_k^(1 - alpha) ],     alpha in [0, 1).

alpha = 0 is the importance-weighted bound IWAE_K (:class:`~pyro_vae.objectives.IWAEELBO`), alpha -> 1 the
K-particle ELBO, and in between the bound decreases monotonically in alpha. Pyro's own
:class:`~pyro.infer.RenyiELBO` computes the same value but has no ``differentiable_loss`` and no DReG/STL
gradients; this class has both, one bound per data point, and uses a VAE's trace-free twin.
Formula: :func:`pyro_vae.objectives.bounds.renyi`.
"""
from __future__ import annotations

from .base import ParticleObjective
from .bounds import ESTIMATORS, renyi

__all__ = ["RenyiBound"]


class RenyiBound(ParticleObjective):
    r"""VR_alpha per data point, ``loss = -scale * sum_n 1/(1-alpha) log (1/K) sum_k w_kn^(1-alpha)``, with the
    ``iwae`` (the bound's own gradient), ``dreg`` or ``stl`` gradient estimator.

    The K particles are drawn in one vectorized pass; log weights are summed over sites per *cell* (the data
    points of the batch plate) and the power mean over particles is taken per cell. ``loss`` returns the
    bound's value; ``differentiable_loss`` a tensor with the same value whose gradient is the estimator.
    "q with stop-gradient parameters" (dreg, stl) is :func:`~pyro_vae.particles.stop_gradient_log_q`: the guide
    distribution rebuilt with detached parameters, flows included, for one latent site; for several (a
    hierarchy) the guide replayed against the latent values with detached parameters.

    :param float alpha: in [0, 1).
    :param int num_particles: K.
    :param str estimator: ``"iwae"``, ``"dreg"`` or ``"stl"``.
    :param kwargs: see :class:`~pyro_vae.objectives.base.ParticleObjective`.
    """

    def __init__(self, alpha: float = 0.5, num_particles: int = 2, estimator: str = "iwae", **kwargs):
        if not 0.0 <= float(alpha) < 1.0:
            raise ValueError(f"the Renyi bound needs alpha in [0, 1), got {alpha!r} (alpha = 0 is IWAE, "
                             "alpha -> 1 the ELBO)")
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown gradient estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if not kwargs.pop("vectorize_particles", True):
            raise ValueError(f"{type(self).__name__} vectorizes its particles (the power mean needs all K at once)")
        super().__init__(num_particles=num_particles, vectorize_particles=True, **kwargs)
        self.alpha = float(alpha)
        self.estimator = estimator

    def needs_stop_q(self, for_gradients: bool) -> bool:
        return for_gradients and self.estimator != "iwae"

    def bound(self, particles):
        return renyi(particles, alpha=self.alpha, estimator=self.estimator)
