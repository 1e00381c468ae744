r"""The formulas, once: each objective of this package is one function of :class:`~pyro_vae.particles.Particles`.

Notation: K particles z_kn ~ q(z|x_n) per cell n (a data point), log w_kn = log p(x_n, z_kn) - log q(z_kn|x_n),
``scale`` the batch's subsampling factor. Each function returns ``(bound, surrogate)``: the bound's value
(summed over cells and scaled), and a tensor of the same value whose gradient is the chosen estimator.

* :func:`elbo`: ELBO_beta = E_q[log p(x|z)] - beta KL(q || p), the KL by Monte Carlo or in closed form.
* :func:`renyi`: the variational Renyi bound VR_alpha (alpha = 0 is IWAE_K), gradient estimators
  ``"iwae"`` (the bound's own gradient), ``"stl"`` and ``"dreg"``.

Adding an objective = adding a formula here and a small :class:`~pyro_vae.objectives.base.ParticleObjective`
subclass that calls it (docs/objectives.md, "Adding an objective").
"""
from __future__ import annotations

import math

import torch

from ..particles import Particles

__all__ = ["elbo", "renyi", "log_mean_exp", "ESTIMATORS"]

#: gradient estimators of the importance-weighted bounds
ESTIMATORS = ("iwae", "dreg", "stl")


def log_mean_exp(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """log (1/K) sum_k exp(values_k) along ``dim``, computed stably."""
    return torch.logsumexp(values, dim) - math.log(values.shape[dim])


def elbo(p: Particles, beta: float = 1.0, analytic_kl: bool = False):
    r"""ELBO_beta = scale * sum_n (1/K) sum_k [ log p(x_n|z_kn) - beta * KL_kn ]   (Kingma & Welling, 2014).

    KL_kn = log q(z_kn|x_n) - log p(z_kn) (Monte Carlo; with beta = 1 the summand is log w_kn, Pyro's
    Trace_ELBO) or, with ``analytic_kl``, the closed form KL(q(z|x_n) || p(z)) (``p.kl``; Kingma & Welling's
    eq. 10; beta != 1 is the beta-VAE of Higgins et al., 2017). Every term is reparameterized, so the
    estimate is its own surrogate.
    """
    if analytic_kl:
        if p.kl is None:
            raise ValueError("the analytic-KL ELBO needs particles drawn with kl=True")
        per_particle = p.log_px_given_z - _times(beta, p.kl)
    else:
        per_particle = (p.log_weights if _is_one(beta) else
                        p.log_px_given_z - beta * (p.log_qz - p.log_pz))
    value = _times(p.scale / per_particle.shape[0], per_particle.sum())  # the mean over the K particles
    return value, value


def _times(factor, value: torch.Tensor) -> torch.Tensor:
    """factor * value, without a multiplication by 1 (the common case) in the graph."""
    return value if _is_one(factor) else factor * value


def _is_one(factor) -> bool:
    """Whether ``factor`` is the number 1. A tensor never is: a captured step takes the KL weight as a 0-d tensor
    input, whose value the graph must not freeze into a branch."""
    return not torch.is_tensor(factor) and factor == 1


def renyi(p: Particles, alpha: float = 0.0, estimator: str = "iwae"):
    r"""VR_alpha = scale * sum_n 1/(1 - alpha) log (1/K) sum_k w_kn^(1 - alpha),  alpha in [0, 1).

    The variational Renyi bound (Li & Turner, NeurIPS 2016) estimated with K particles; alpha = 0 is the
    importance-weighted bound IWAE_K (Burda, Grosse & Salakhutdinov, ICLR 2016), alpha -> 1 the K-particle
    ELBO. For every realization it decreases in alpha (a power mean of the w_k decreases with its exponent).

    With w~_kn = softmax_k((1 - alpha) log w_kn), the gradient estimators are

    * ``"iwae"``: the bound's own gradient, sum_k w~_k d log w_k;
    * ``"stl"`` (Roeder, Wu & Duvenaud, 2017): the same with q's parameters stop-gradiented inside log w,
      dropping the score term (unbiased only for K = 1);
    * ``"dreg"`` (Tucker, Lawson, Gu & Maddison, ICLR 2019): the model keeps sum_k w~_k d log p / d theta,
      the guide gets sum_k [alpha w~_k + (1 - alpha) w~_k^2] (d log w_k / d z_k)(d z_k / d phi) with q's
      parameters stop-gradiented (alpha = 0: Tucker et al.'s w~^2). Unbiased; derived in docs/objectives.md.

    The returned surrogate always has the bound's value: ``bound.detach() + S - S.detach()``.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"the Renyi bound needs alpha in [0, 1), got {alpha}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown gradient estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    power = 1.0 - alpha
    bound = _power_mean_bound(p.log_weights, power, p.scale)
    if estimator == "iwae" or p.log_qz_stop is None:  # the bound's own gradient (or a value-only draw)
        return bound, bound
    log_w = p.log_weights_stop
    if estimator == "stl":
        surrogate = _power_mean_bound(log_w, power, p.scale)
    else:
        w = torch.softmax(_times(power, log_w.detach()), dim=0)
        p.scale_latent_gradients(alpha + power * w)  # times w~ below: alpha w~ + (1 - alpha) w~^2
        surrogate = _times(p.scale, (w * log_w).sum())
    return bound, bound.detach() + (surrogate - surrogate.detach())


def _power_mean_bound(log_w: torch.Tensor, power: float, scale: float) -> torch.Tensor:
    """scale * sum_n 1/power log (1/K) sum_k w_kn^power."""
    return _times(scale / power, log_mean_exp(_times(power, log_w)).sum())
