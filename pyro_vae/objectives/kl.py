r"""Closed-form Gaussian KL divergences that Pyro and torch lack, registered with the KL registry.

Importing this module (``import pyro_vae.objectives`` does) registers, with
:func:`torch.distributions.kl.register_kl` (the registry :func:`pyro.distributions.kl_divergence` uses):

=====================================  ==============================  =========================
q (first argument)                     p (second argument)             formula
=====================================  ==============================  =========================
``MultivariateNormal``                 ``Independent(Normal, 1)``      :func:`kl_mvn_diag_normal`
``LowRankMultivariateNormal``          ``Independent(Normal, 1)``      :func:`kl_lowrank_diag_normal`
``Independent(Normal, 1)``             ``LowRankMultivariateNormal``   :func:`kl_diag_normal_lowrank`
Pyro's ``LowRankMultivariateNormal``   Pyro's ``MultivariateNormal``   :func:`kl_lowrank_mvn`
=====================================  ==============================  =========================

The last pair exists in torch, but torch 2.x's version fails when the low-rank factor W is shared across
the batch while the diagonal D is not (the usual case under a particle plate); it is re-registered for
Pyro's subclasses only (more specific, so torch's own classes keep torch's function).

Already available elsewhere (not re-registered): ``MultivariateNormal`` vs ``MultivariateNormal`` and the
low-rank pairs among themselves (torch), ``Independent`` vs ``Independent`` (Pyro; with ``Normal`` bases it
reduces to torch's Normal-Normal KL) and ``Independent(Normal, 1)`` vs ``MultivariateNormal`` (Pyro).

Every function raises :class:`NotImplementedError` when the ``Independent`` side is not a ``Normal`` with
exactly one reinterpreted dimension matching the multivariate event, which makes callers such as
:class:`~pyro_vae.objectives.AnalyticKLELBO` fall back to Monte Carlo.

All formulas are instances of the Gaussian KL, for d-dimensional q = N(m, S) and p = N(m0, S0):

    KL(q || p) = 1/2 [ tr(S0^-1 S) + (m0 - m)^T S0^-1 (m0 - m) - d + log det S0 - log det S ].
"""
from __future__ import annotations

import torch
from torch.distributions import Independent, LowRankMultivariateNormal, MultivariateNormal, Normal, register_kl

import pyro.distributions as pyro_dist

__all__ = ["kl_mvn_diag_normal", "kl_lowrank_diag_normal", "kl_diag_normal_lowrank", "kl_lowrank_mvn"]


def _diagonal_normal_params(p: Independent, event_shape: torch.Size):
    """(m0, s0^2) of p = Independent(Normal(m0, s0), 1), or NotImplementedError if p is not of that form."""
    if not (isinstance(p.base_dist, Normal) and p.reinterpreted_batch_ndims == 1 and p.event_shape == event_shape):
        raise NotImplementedError(
            f"closed-form Gaussian KL needs Independent(Normal, 1) with event_shape {tuple(event_shape)}, "
            f"got Independent({type(p.base_dist).__name__}, {p.reinterpreted_batch_ndims}) "
            f"with event_shape {tuple(p.event_shape)}")
    return p.base_dist.loc, p.base_dist.scale.pow(2)


def _half_gaussian_kl(trace_term, mahalanobis, dim: int, logdet_p, logdet_q):
    """1/2 [tr(S0^-1 S) + (m0-m)^T S0^-1 (m0-m) - d + log det S0 - log det S]."""
    return 0.5 * (trace_term + mahalanobis - dim + logdet_p - logdet_q)


@register_kl(MultivariateNormal, Independent)
def kl_mvn_diag_normal(q: MultivariateNormal, p: Independent) -> torch.Tensor:
    r"""KL(N(m, S) || N(m0, diag s0^2)) for a full-covariance q and a diagonal Gaussian p.

    With S = L L^T (q's Cholesky factor):

        KL = 1/2 [ sum_i S_ii / s0_i^2 + sum_i (m0_i - m_i)^2 / s0_i^2 - d
                   + sum_i log s0_i^2 - 2 sum_i log L_ii ]

    Cost O(d^2) per batch element (no matrix inverse: S0 is diagonal).
    """
    loc0, var0 = _diagonal_normal_params(p, q.event_shape)
    scale_tril = q._unbroadcasted_scale_tril
    diag_cov = scale_tril.pow(2).sum(-1)  # S_ii = sum_j L_ij^2
    trace_term = (diag_cov / var0).sum(-1)
    mahalanobis = ((loc0 - q.loc).pow(2) / var0).sum(-1)
    logdet_q = 2 * scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return _half_gaussian_kl(trace_term, mahalanobis, q.event_shape[0], var0.log().sum(-1), logdet_q)


def _lowrank_logdet(q: LowRankMultivariateNormal) -> torch.Tensor:
    """log det(W W^T + D) = log det(I_r + W^T D^-1 W) + sum_i log D_i (matrix determinant lemma)."""
    capacitance_logdet = 2 * q._capacitance_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return capacitance_logdet + q._unbroadcasted_cov_diag.log().sum(-1)


@register_kl(LowRankMultivariateNormal, Independent)
def kl_lowrank_diag_normal(q: LowRankMultivariateNormal, p: Independent) -> torch.Tensor:
    r"""KL(N(m, W W^T + D) || N(m0, diag s0^2)) for a low-rank-plus-diagonal q and a diagonal Gaussian p.

    With S = W W^T + D, S_ii = sum_r W_ir^2 + D_i and, by the matrix determinant lemma,
    log det S = log det(I_r + W^T D^-1 W) + sum_i log D_i, so

        KL = 1/2 [ sum_i (sum_r W_ir^2 + D_i) / s0_i^2 + sum_i (m0_i - m_i)^2 / s0_i^2 - d
                   + sum_i log s0_i^2 - log det S ]

    Cost O(d r^2).
    """
    loc0, var0 = _diagonal_normal_params(p, q.event_shape)
    diag_cov = q._unbroadcasted_cov_factor.pow(2).sum(-1) + q._unbroadcasted_cov_diag
    trace_term = (diag_cov / var0).sum(-1)
    mahalanobis = ((loc0 - q.loc).pow(2) / var0).sum(-1)
    return _half_gaussian_kl(trace_term, mahalanobis, q.event_shape[0], var0.log().sum(-1), _lowrank_logdet(q))


@register_kl(Independent, LowRankMultivariateNormal)
def kl_diag_normal_lowrank(q: Independent, p: LowRankMultivariateNormal) -> torch.Tensor:
    r"""KL(N(m, diag s^2) || N(m0, W0 W0^T + D0)) for a diagonal q and a low-rank-plus-diagonal p.

    q is rewritten as the rank-1 low-rank Gaussian N(m, 0 0^T + diag s^2) and torch's low-rank/low-rank
    formula (Woodbury identity for S0^-1, determinant lemma for log det S0) is applied; cost O(d r^2).
    """
    loc, var = _diagonal_normal_params(q, p.event_shape)
    zero_factor = torch.zeros(var.shape + (1,), dtype=var.dtype, device=var.device)
    q_lowrank = LowRankMultivariateNormal(loc, zero_factor, var, validate_args=False)
    return torch.distributions.kl_divergence(q_lowrank, p)


@register_kl(pyro_dist.LowRankMultivariateNormal, pyro_dist.MultivariateNormal)
def kl_lowrank_mvn(q: LowRankMultivariateNormal, p: MultivariateNormal) -> torch.Tensor:
    r"""KL(N(m, W W^T + D) || N(m0, S0)): torch's formula after broadcasting W to q's full batch shape.

    Same Gaussian KL, 1/2 [tr(S0^-1 S) + (m0-m)^T S0^-1 (m0-m) - d + log det S0 - log det S]; the
    broadcast avoids torch's shape error when W has a smaller batch shape than D.
    """
    q_full = LowRankMultivariateNormal(q.loc, q.cov_factor, q.cov_diag, validate_args=False)
    p_torch = MultivariateNormal(p.loc, scale_tril=p.scale_tril, validate_args=False)
    return torch.distributions.kl_divergence(q_full, p_torch)
