"""Posterior families (pyro_vae.guides): shapes, exact densities, and a linear-Gaussian fit.

Tolerances: exactness checks run in float64 and allow a few thousand ulps (round-off through a handful of
matrix products / network passes); the fitting test derives its tolerance from the optimizer's own
convergence certificate (gradient norm and Hessian at the returned point), not from a fixed number.
"""
import math

import pytest
import torch
import torch.distributions as td
from torch.autograd.functional import hessian, jacobian

import pyro
from pyro.infer import SVI, Trace_ELBO

from pyro_vae import VAE
from pyro_vae.guides import (
    _MIN_SCALE,
    POSTERIORS,
    CholeskyNormal,
    DiagonalNormal,
    IAFNormal,
    LowRankNormal,
    make_posterior,
    positive,
)

F64 = torch.float64
#: float64 round-off allowance for O(10)-magnitude log-densities computed two different ways
TOL64 = 1e4 * torch.finfo(F64).eps
#: float32: the cached path and the d-pass inverse path of a flow differ by round-off only
TOL32 = 1e3 * torch.finfo(torch.float32).eps

FAMILIES = {
    "diagonal": {},
    "cholesky": {},
    "lowrank": {"rank": 2},
    "iaf": {"flow_steps": 2, "context_dim": 4},
    "laplace": {},
    "studentt": {"df": 5.0},
}


def test_every_registered_family_is_tested():
    assert set(POSTERIORS) == set(FAMILIES)


# ------------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("lead", [(6,), (3, 6)], ids=["N", "KxN"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_shapes_rsample_and_log_prob(name, lead):
    d = 3
    fam = make_posterior(name, d, **FAMILIES[name])
    params = torch.randn(*lead, fam.num_params, requires_grad=True)
    q = fam(params)
    assert q.batch_shape == lead and q.event_shape == (d,) and q.has_rsample
    z = q.rsample()
    assert z.shape == (*lead, d)
    lp = q.log_prob(z)
    assert lp.shape == lead and torch.isfinite(lp).all()
    # a fresh tensor equal to the sample scores the same (for the flow: inverse path vs cached path)
    torch.testing.assert_close(q.log_prob(z.clone()), lp, rtol=TOL32, atol=TOL32 * lp.abs().max().item())
    zs = q.rsample((5,))
    assert zs.shape == (5, *lead, d) and q.log_prob(zs).shape == (5, *lead)
    assert fam.mean(params).shape == (*lead, d)
    # reparameterized: gradients reach every encoder feature
    (z.pow(2).sum() + lp.sum()).backward()
    assert params.grad is not None and torch.isfinite(params.grad).all()
    assert (params.grad.abs().sum(dim=tuple(range(len(lead)))) > 0).all()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_one_dimensional_latent(name):
    fam = make_posterior(name, 1, **{**FAMILIES[name], **({"rank": 1} if name == "lowrank" else {})})
    q = fam(torch.randn(4, fam.num_params))
    z = q.rsample()
    assert z.shape == (4, 1) and q.log_prob(z).shape == (4,)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_trains_inside_a_vae_guide_with_vectorized_particles(name):
    vae = VAE(input_shape=(1, 4, 4), z_dim=3, hidden=(16,), guide=name, guide_kwargs=FAMILIES[name])
    x = torch.bernoulli(torch.full((5, 1, 4, 4), 0.5))
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}),
              Trace_ELBO(num_particles=3, vectorize_particles=True))
    assert math.isfinite(svi.step(x))
    own = [n for n in pyro.get_param_store() if n.startswith("posterior$$$")]
    assert bool(own) == any(True for _ in vae.posterior.parameters())
    assert vae.posterior_mean(x).shape == (5, 3)


# ------------------------------------------------------------------------------------------------ cholesky
def test_cholesky_factor_is_positive_diagonal_times_unit_lower():
    d = 4
    fam = CholeskyNormal(d)
    assert fam.num_params == 2 * d + d * (d - 1) // 2
    params = torch.randn(2, 3, fam.num_params, dtype=F64)
    mu, raw, off = params.split([d, d, d * (d - 1) // 2], dim=-1)
    L = fam.scale_tril(params)
    assert L.shape == (2, 3, d, d)
    assert torch.equal(torch.triu(L, diagonal=1), torch.zeros_like(L))
    assert torch.equal(L.diagonal(dim1=-2, dim2=-1), positive(raw)) and (positive(raw) > 0).all()
    rows, cols = torch.tril_indices(d, d, offset=-1)
    torch.testing.assert_close(L[..., rows, cols], positive(raw)[..., rows] * off, rtol=0, atol=TOL64)
    q = fam(params)
    torch.testing.assert_close(q.covariance_matrix, L @ L.transpose(-1, -2), rtol=TOL64, atol=TOL64)
    # log det Sigma = 2 sum log s exactly: the density at the mean is -d/2 log 2 pi - sum log s
    expected = -0.5 * d * math.log(2 * math.pi) - positive(raw).log().sum(-1)
    torch.testing.assert_close(q.log_prob(mu), expected, rtol=TOL64, atol=TOL64)


def test_cholesky_closed_form_kl_to_standard_normal_matches_torch():
    d = 5
    fam = CholeskyNormal(d)
    params = torch.randn(3, 4, fam.num_params, dtype=F64)
    q = fam(params)
    mu, L = q.loc, fam.scale_tril(params)
    closed = 0.5 * (L.pow(2).sum((-1, -2)) + mu.pow(2).sum(-1) - d
                    - 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1))
    prior = td.MultivariateNormal(torch.zeros(d, dtype=F64), torch.eye(d, dtype=F64))
    torch.testing.assert_close(td.kl_divergence(q, prior), closed, rtol=TOL64, atol=TOL64)


def test_lowrank_covariance_is_factor_plus_diagonal():
    d, rank = 4, 3
    fam = LowRankNormal(d, rank=rank)
    params = torch.randn(5, fam.num_params, dtype=F64)
    mu, factor, raw = params.split([d, d * rank, d], dim=-1)
    W = factor.reshape(5, d, rank)
    cov = W @ W.transpose(-1, -2) + torch.diag_embed(positive(raw) ** 2)
    q = fam(params)
    torch.testing.assert_close(q.covariance_matrix, cov, rtol=TOL64, atol=TOL64)
    z = q.sample()
    dense = td.MultivariateNormal(mu, cov)
    torch.testing.assert_close(q.log_prob(z), dense.log_prob(z), rtol=TOL64, atol=TOL64)
    # W = 0 reduces to the diagonal family with the same raw features
    zero_w = torch.cat([mu, torch.zeros_like(factor), raw], dim=-1)
    diag = DiagonalNormal(d)(torch.cat([mu, raw], dim=-1))
    torch.testing.assert_close(fam(zero_w).log_prob(z), diag.log_prob(z), rtol=TOL64, atol=TOL64)


def test_laplace_and_studentt_densities():
    d = 3
    params = torch.randn(4, 2 * d, dtype=F64)
    mu, raw = params.split(d, dim=-1)
    b = positive(raw)
    lap = make_posterior("laplace", d)(params)
    z = lap.sample()
    torch.testing.assert_close(lap.log_prob(z), (-(2 * b).log() - (z - mu).abs() / b).sum(-1),
                               rtol=TOL64, atol=TOL64)
    # the Laplace KL to the N(0, I) prior is closed form: -H(q) + log(2 pi)/2 + E_q[z^2]/2, Var = 2 b^2
    prior = td.Independent(td.Normal(torch.zeros(d, dtype=F64), 1.0), 1)
    hand_kl = (-(1 + (2 * b).log()) + 0.5 * math.log(2 * math.pi) + 0.5 * (mu**2 + 2 * b**2)).sum(-1)
    torch.testing.assert_close(td.kl_divergence(lap, prior), hand_kl, rtol=TOL64, atol=TOL64)
    fam = make_posterior("studentt", d, df=7.0, learn_df=True).double()
    # initialized at df (the raw value was stored in float32 before .double())
    torch.testing.assert_close(fam.df(), torch.full((d,), 7.0, dtype=F64), rtol=TOL32, atol=0)
    q = fam(params)
    z = q.rsample()
    nu = fam.df()
    hand = (torch.lgamma((nu + 1) / 2) - torch.lgamma(nu / 2) - 0.5 * torch.log(nu * math.pi) - b.log()
            - (nu + 1) / 2 * torch.log1p(((z - mu) / b) ** 2 / nu)).sum(-1)
    torch.testing.assert_close(q.log_prob(z), hand, rtol=TOL64, atol=TOL64)
    q.log_prob(z.detach()).sum().backward()
    assert fam.df_raw.grad is not None and torch.isfinite(fam.df_raw.grad).all()


# ------------------------------------------------------------------------------------------------ IAF
def _compose(transforms):
    def flow(u):
        for t in transforms:
            u = t(u)
        return u
    return flow


def test_iaf_log_prob_is_the_change_of_variables_formula():
    d, n = 3, 4
    fam = IAFNormal(d, flow_steps=3, context_dim=5).double()
    params = torch.randn(n, fam.num_params, dtype=F64)
    q = fam(params)
    torch.manual_seed(1)
    z = q.rsample()
    torch.manual_seed(1)
    z0 = q.base_dist.rsample()  # the same eps-path base draw that rsample pushed through the flow
    mu, raw, _ = fam.split(params)
    hand = []
    for i in range(n):
        flow = _compose(fam(params[i]).transforms)  # fresh transforms, unbatched context
        torch.testing.assert_close(flow(z0[i]), z[i], rtol=TOL64, atol=TOL64)
        J = jacobian(flow, z0[i])
        assert J.tril(-1).abs().sum() + J.triu(1).abs().sum() > 0  # the flow couples coordinates
        log_det = torch.linalg.slogdet(J).logabsdet
        assert log_det.abs() > 0
        base = td.Normal(mu[i], positive(raw[i])).log_prob(z0[i]).sum()
        hand.append(base - log_det)
    hand = torch.stack(hand)
    tol = TOL64 * (1 + hand.abs().max().item())
    torch.testing.assert_close(q.log_prob(z), hand, rtol=0, atol=tol)  # cached inverse
    torch.testing.assert_close(q.log_prob(z.clone()), hand, rtol=0, atol=tol)  # inverted afresh
    # the same through the transforms' own log|det J| on the forward pass
    u, fwd = z0, td.Normal(mu, positive(raw)).log_prob(z0).sum(-1)
    for t in fam.transforms(fam.split(params)[2]):
        v = t(u)
        fwd = fwd - t.log_abs_det_jacobian(u, v)
        u = v
    torch.testing.assert_close(fwd, hand, rtol=0, atol=tol)


def test_iaf_with_leading_particle_dims_and_mean():
    d = 3
    fam = IAFNormal(d, flow_steps=2, context_dim=4).double()
    params = torch.randn(2, 5, fam.num_params, dtype=F64)
    q = fam(params)
    z = q.rsample((7,))
    assert z.shape == (7, 2, 5, d)
    lp = q.log_prob(z)
    torch.testing.assert_close(q.log_prob(z.clone()), lp, rtol=0, atol=TOL64 * (1 + lp.abs().max().item()))
    # each (k, n) slice is its own flow with its own context
    single = fam(params[1, 3])
    torch.testing.assert_close(single.log_prob(z[:, 1, 3].clone()), lp[:, 1, 3], rtol=0,
                               atol=TOL64 * (1 + lp.abs().max().item()))
    # mean = the base mean pushed through the flow
    mu = fam.split(params)[0]
    torch.testing.assert_close(fam.mean(params), _compose(fam(params).transforms)(mu), rtol=TOL64, atol=TOL64)


# ------------------------------------------------------------------------------------------------ linear Gaussian
def linear_gaussian():
    """z ~ N(0, I_2), x | z ~ N(W z, sigma^2 I_3), one fixed x; W's near-parallel columns make the exact
    posterior N(m, S) strongly (negatively) correlated. Returns a dict of the exact quantities."""
    W = torch.tensor([[1.0, 0.8], [0.9, 1.0], [1.1, 1.0]], dtype=F64)
    sigma = 0.5
    x = torch.tensor([1.5, 1.2, 2.0], dtype=F64)
    precision = torch.eye(2, dtype=F64) + W.T @ W / sigma**2  # Lambda = S^-1
    S = torch.linalg.inv(precision)
    m = S @ W.T @ x / sigma**2
    marginal = td.MultivariateNormal(torch.zeros(3, dtype=F64), W @ W.T + sigma**2 * torch.eye(3, dtype=F64))
    return {"W": W, "sigma": sigma, "x": x, "precision": precision, "S": S, "m": m,
            "log_px": marginal.log_prob(x)}


def closed_form_elbo(q, lg):
    """ELBO(q) = E_q log p(x|z) + E_q log p(z) + H(q), exact for a Gaussian q in the linear-Gaussian model:
    E_q log p(x|z) = log N(x; W mu, sigma^2 I) - tr(W Sigma W^T) / (2 sigma^2),
    E_q log p(z) = -d/2 log 2 pi - (tr Sigma + mu^T mu) / 2, and H(q) from the family (its own log det)."""
    W, s2, x = lg["W"], lg["sigma"] ** 2, lg["x"]
    mu = q.mean
    cov = q.covariance_matrix if hasattr(q, "covariance_matrix") else torch.diag_embed(q.variance)
    lik = td.Normal(W @ mu, lg["sigma"]).log_prob(x).sum() - torch.trace(W @ cov @ W.T) / (2 * s2)
    prior = -0.5 * mu.numel() * math.log(2 * math.pi) - 0.5 * (torch.trace(cov) + mu @ mu)
    return lik + prior + q.entropy()


@pytest.mark.parametrize("name", ["diagonal", "cholesky"])
def test_closed_form_elbo_matches_monte_carlo(name):
    """The closed-form ELBO used for fitting agrees with a plain MC average of log p(x, z) - log q(z)."""
    lg = linear_gaussian()
    fam = make_posterior(name, 2)
    q = fam(0.5 * torch.randn(fam.num_params, dtype=F64))
    z = q.rsample((20000,))
    log_w = (td.Normal(z @ lg["W"].T, lg["sigma"]).log_prob(lg["x"]).sum(-1)
             + td.Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z))
    se = log_w.std() / math.sqrt(log_w.numel())
    assert abs(log_w.mean() - closed_form_elbo(q, lg)) < 4 * se  # 4 standard errors: fails w.p. ~6e-5
    assert closed_form_elbo(q, lg) < lg["log_px"]


def fit_closed_form(family, lg):
    """Maximize the closed-form ELBO over a plain parameter vector with LBFGS (float64, no MC noise).

    Returns (gap, tol, theta, dist_bound): gap = log p(x) - ELBO; tol bounds |gap - optimal gap| by the local
    strong-convexity certificate f(theta) - f* <= |grad|^2 / (2 lambda_min(Hessian)), plus round-off;
    dist_bound = |grad| / lambda_min bounds |theta - theta*| the same way."""
    theta = torch.zeros(family.num_params, dtype=F64, requires_grad=True)
    neg_elbo = lambda t: -closed_form_elbo(family(t), lg)  # noqa: E731
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=1000, tolerance_grad=1e-13, tolerance_change=0.0,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = neg_elbo(theta)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    theta = theta.detach()
    loss = neg_elbo(theta)
    t = theta.clone().requires_grad_()
    (g,) = torch.autograd.grad(neg_elbo(t), t)
    lam_min = torch.linalg.eigvalsh(hessian(neg_elbo, theta)).min()
    assert lam_min > 0, "the fit did not end at a strict local optimum"
    roundoff = TOL64 * (1 + lg["log_px"].abs().item())
    tol = (g.norm() ** 2 / (2 * lam_min)).item() + roundoff
    gap = (lg["log_px"] + loss).item()
    return gap, tol, theta, (g.norm() / lam_min).item()


def test_mean_field_gap_formula_on_a_correlated_linear_gaussian():
    lg = linear_gaussian()
    S = lg["S"]
    corr = S[0, 1] / (S[0, 0] * S[1, 1]).sqrt()
    assert corr < -0.85  # strongly correlated posterior: the case where full covariance matters
    lam = lg["precision"]
    mf_gap = 0.5 * (lam.diagonal().log().sum() - torch.logdet(lam)).item()
    assert mf_gap > 0.5

    # the optimal diagonal q has mean m and precisions diag(Lambda): theta* = (m, raw of Lambda_ii^-1/2)
    diag = DiagonalNormal(2)
    gap, tol, theta, dist_bound = fit_closed_form(diag, lg)
    assert abs(gap - mf_gap) <= tol, (gap, mf_gap, tol)
    theta_star = torch.cat([lg["m"], raw_of(lam.diagonal().rsqrt())])
    assert (theta - theta_star).norm() <= dist_bound + TOL64, (theta, theta_star)

    # the Cholesky family contains the exact posterior: theta* from chol(S) = diag(s) U
    chol = CholeskyNormal(2)
    gap, tol, theta, dist_bound = fit_closed_form(chol, lg)
    assert gap < 0.01 and abs(gap) <= tol, (gap, tol)  # the ELBO reaches log p(x)
    L = torch.linalg.cholesky(S)
    s_star = L.diagonal()
    theta_star = torch.cat([lg["m"], raw_of(s_star), (L[1, 0] / s_star[1]).reshape(1)])
    assert (theta - theta_star).norm() <= dist_bound + TOL64, (theta, theta_star)


def raw_of(scale):
    """The encoder feature r with positive(r) == scale (inverse of softplus(r) + floor)."""
    y = scale - _MIN_SCALE
    return y + torch.log(-torch.expm1(-y))


# ------------------------------------------------------------------------------------------------ errors
def test_unknown_guide_and_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="unknown guide 'fullrank'.*cholesky.*diagonal.*iaf.*lowrank"):
        make_posterior("fullrank", 3)
    with pytest.raises(ValueError, match="'iaf' does not take rank; it takes flow_steps"):
        make_posterior("iaf", 3, rank=2)
    with pytest.raises(ValueError, match="'diagonal' does not take flow_steps; it takes scale_param"):
        make_posterior("diagonal", 3, flow_steps=2)
    with pytest.raises(ValueError, match="rank"):
        make_posterior("lowrank", 3, rank=0)
    with pytest.raises(ValueError, match="rank <= z_dim, got rank=4 > z_dim=3"):
        make_posterior("lowrank", 3, rank=4)
    with pytest.raises(ValueError, match="unknown scale_param 'square'"):
        make_posterior("diagonal", 3, scale_param="square")
    with pytest.raises(ValueError, match="flow_steps"):
        make_posterior("iaf", 3, flow_steps=0)
    with pytest.raises(ValueError, match="df"):
        make_posterior("studentt", 3, df=2.0)
    with pytest.raises(ValueError, match=r"needs encoder features of shape \(\.\.\., 9\), got \(4, 6\)"):
        make_posterior("cholesky", 3)(torch.zeros(4, 6))
    fam = make_posterior("iaf", 3)
    assert make_posterior(fam, 3) is fam


@pytest.mark.parametrize("name, kwargs", [("iaf", {"flow_steps": 3}), ("studentt", {"learn_df": True})])
def test_family_weights_round_trip_through_a_state_dict(name, kwargs):
    a, b = make_posterior(name, 3, **kwargs), make_posterior(name, 3, **kwargs)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.3 * torch.randn_like(p))
    b.load_state_dict(a.state_dict())
    params = torch.randn(4, a.num_params)
    z = a(params).sample()
    torch.testing.assert_close(b(params).log_prob(z), a(params).log_prob(z))
