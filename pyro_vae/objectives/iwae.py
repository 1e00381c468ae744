r"""The importance-weighted bound (IWAE) with three gradient estimators: iwae, dreg and stl.

For one data point x, K particles z_k ~ q(z|x) and log weights log w_k = log p(x, z_k) - log q(z_k|x),

    IWAE_K(x) = E[ log (1/K) sum_k w_k ] <= log p(x)

(Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016). IWAE_1 is the ELBO and
IWAE_K increases monotonically with K towards log p(x). It is the variational Renyi bound at alpha = 0
(:class:`~pyro_vae.objectives.RenyiBound`), whose formula it uses.

Gradient estimators (z_k = z(eps_k; phi) reparameterized, theta = model, phi = guide parameters,
w~_k = w_k / sum_j w_j):

* ``"iwae"`` (Burda et al. 2016): the total derivative, sum_k w~_k d/d(theta, phi) log w_k.
* ``"stl"`` (sticking the landing; Roeder, Wu & Duvenaud, NeurIPS 2017): q's parameters stop-gradiented
  inside log q. Zero variance at q = p(z|x); unbiased for K = 1, *biased* for K > 1.
* ``"dreg"`` (doubly reparameterized; Tucker, Lawson, Gu & Maddison, ICLR 2019):
  guide: sum_k w~_k^2 (d log w_k / d z_k)(d z_k / d phi) with q's parameters stop-gradiented;
  model: sum_k w~_k d log p_theta(x, z_k) / d theta. Unbiased, zero variance at q = p(z|x), and its guide
  signal-to-noise ratio does not decay with K (Rainforth et al., ICML 2018).
"""
from __future__ import annotations

from .renyi import RenyiBound

__all__ = ["IWAEELBO"]


class IWAEELBO(RenyiBound):
    r"""The IWAE bound, one bound per data point, with the ``iwae``, ``dreg`` or ``stl`` gradient estimator::

        loss = -scale * sum_n [ logsumexp_k log w_{k,n} - log K ]

    with ``scale`` the batch plate's subsampling factor. A model with a global latent outside the batch plate
    has a single cell (the whole batch), the bound :class:`~pyro.infer.RenyiELBO` with ``alpha=0`` computes.

    :param int num_particles: K.
    :param str estimator: ``"iwae"``, ``"dreg"`` or ``"stl"``.
    :param kwargs: see :class:`~pyro_vae.objectives.base.ParticleObjective`.
    """

    def __init__(self, num_particles: int = 1, estimator: str = "iwae", **kwargs):
        super().__init__(alpha=0.0, num_particles=num_particles, estimator=estimator, **kwargs)
