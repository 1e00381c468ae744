"""Tests for pyro_vae.objectives: closed-form KL pairs, AnalyticKLELBO, IWAEELBO (iwae/dreg/stl), make_objective.

Statistical checks compare Monte Carlo estimates with closed forms (tests/linear_gaussian.py) using
tolerances of 4 standard errors computed from the sample variance of repeated, seeded estimates.
"""
import math
import warnings

import pytest
import torch
from torch import nn

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as pyro_transforms
from pyro.distributions.kl import kl_divergence
from torch.distributions import transforms as T
from torch.distributions.kl import _dispatch_kl

from linear_gaussian import LinearGaussian, diagonal_guide, lowrank_guide, mvn_guide
from pyro_vae.objectives import AnalyticKLELBO, IWAEELBO, OBJECTIVES, RenyiBound, make_objective
from pyro_vae.particles import detach_distribution, draw_particles
from pyro_vae.objectives.kl import kl_diag_normal_lowrank, kl_lowrank_diag_normal, kl_lowrank_mvn, kl_mvn_diag_normal

Z_MAX = 4.0  # tolerance in standard errors


def mean_and_se(samples: torch.Tensor):
    """Sample mean and its standard error along dim 0."""
    return samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])


def repeat(fn, repetitions: int, seed: int = 0) -> torch.Tensor:
    """fn() evaluated under seeds seed, seed+1, ... stacked along dim 0."""
    out = []
    for r in range(repetitions):
        pyro.set_rng_seed(seed + r)
        out.append(torch.as_tensor(fn(), dtype=torch.float64))
    return torch.stack(out)


@pytest.fixture
def lg():
    return LinearGaussian.random(d=2, D=4, sigma=0.7)


@pytest.fixture
def x(lg):
    return lg.sample(3)


def off_guide_params(lg, x, shift=0.3, widen=1.3):
    """(loc, scale) of a diagonal guide that is off the exact posterior by `shift` and `widen`."""
    m, S = (t.detach() for t in lg.posterior(x))
    return m + shift, (S.diagonal().sqrt() * widen).expand_as(m).clone()


# ============================================================================================ KL registry
def _randn(*shape, generator):
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def _random_spd(d, generator, batch=()):
    A = torch.randn(*batch, d, d, generator=generator, dtype=torch.float64)
    return A @ A.transpose(-1, -2) + 0.5 * torch.eye(d, dtype=torch.float64)


def _diag_normal(generator, d, batch=()):
    loc = torch.randn(*batch, d, generator=generator, dtype=torch.float64)
    scale = torch.rand(*batch, d, generator=generator, dtype=torch.float64) + 0.3
    return dist.Normal(loc, scale).to_event(1)


def _as_mvn(p):
    return dist.MultivariateNormal(p.base_dist.loc, torch.diag_embed(p.base_dist.scale.pow(2)))


def test_kl_mvn_vs_diagonal_normal_matches_torch_mvn_mvn():
    g = torch.Generator().manual_seed(0)
    q = dist.MultivariateNormal(torch.randn(5, 3, generator=g, dtype=torch.float64), _random_spd(3, g, (5,)))
    p = _diag_normal(g, 3)  # broadcasts against q's batch shape (5,)
    expected = torch.distributions.kl_divergence(q, _as_mvn(p))
    assert torch.allclose(kl_divergence(q, p), expected, atol=1e-10)
    assert _dispatch_kl(type(q), type(p)) is kl_mvn_diag_normal


def test_kl_lowrank_vs_diagonal_normal_matches_torch_mvn_mvn():
    g = torch.Generator().manual_seed(1)
    loc, factor = _randn(4, 3, generator=g), _randn(4, 3, 2, generator=g)
    diag = torch.rand(4, 3, generator=g, dtype=torch.float64) + 0.2
    q = dist.LowRankMultivariateNormal(loc, factor, diag)
    p = _diag_normal(g, 3, (4,))
    q_dense = dist.MultivariateNormal(loc, factor @ factor.transpose(-1, -2) + torch.diag_embed(diag))
    assert torch.allclose(kl_divergence(q, p), torch.distributions.kl_divergence(q_dense, _as_mvn(p)), atol=1e-10)
    assert _dispatch_kl(type(q), type(p)) is kl_lowrank_diag_normal


def test_kl_diagonal_normal_vs_lowrank_matches_torch_mvn_mvn():
    g = torch.Generator().manual_seed(2)
    q = _diag_normal(g, 3, (4,))
    loc, factor = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, 2, generator=g, dtype=torch.float64)
    diag = torch.rand(3, generator=g, dtype=torch.float64) + 0.2
    p = dist.LowRankMultivariateNormal(loc, factor, diag)
    p_dense = dist.MultivariateNormal(loc, factor @ factor.T + torch.diag(diag))
    assert torch.allclose(kl_divergence(q, p), torch.distributions.kl_divergence(_as_mvn(q), p_dense), atol=1e-10)
    assert _dispatch_kl(type(q), type(p)) is kl_diag_normal_lowrank


def test_kl_lowrank_vs_mvn_broadcasts_a_shared_factor():
    """torch's LowRank/MVN KL fails for a factor W shared across the batch; Pyro's classes get a fixed one."""
    g = torch.Generator().manual_seed(4)
    loc, factor = _randn(4, 3, generator=g), _randn(3, 2, generator=g)
    diag = torch.rand(4, 3, generator=g, dtype=torch.float64) + 0.2
    q = dist.LowRankMultivariateNormal(loc, factor, diag)
    p = dist.MultivariateNormal(torch.zeros(3, dtype=torch.float64), _random_spd(3, g))
    q_dense = dist.MultivariateNormal(loc, q.covariance_matrix)
    assert torch.allclose(kl_divergence(q, p), torch.distributions.kl_divergence(q_dense, p), atol=1e-10)
    assert _dispatch_kl(type(q), type(p)) is kl_lowrank_mvn


def test_existing_gaussian_pairs_agree_with_dense_formula():
    """Pyro's Independent/Independent and Independent/MVN and torch's MVN/MVN: the pairs we rely on."""
    g = torch.Generator().manual_seed(3)
    q, p = _diag_normal(g, 3, (2,)), _diag_normal(g, 3)
    dense = torch.distributions.kl_divergence(_as_mvn(q), _as_mvn(p))
    assert torch.allclose(kl_divergence(q, p), dense, atol=1e-10)
    assert torch.allclose(kl_divergence(q, _as_mvn(p)), dense, atol=1e-10)


@pytest.mark.parametrize("p", [dist.Laplace(torch.zeros(3), 1.0).to_event(1),
                               dist.Normal(torch.zeros(3, 3), 1.0).to_event(2)])
def test_kl_pairs_refuse_non_matching_independent(p):
    q = dist.MultivariateNormal(torch.zeros(3), torch.eye(3))
    with pytest.raises(NotImplementedError):
        kl_divergence(q, p)


# ============================================================================================ AnalyticKLELBO
def _guide_and_cov(kind, lg, x):
    loc, scale = off_guide_params(lg, x)
    if kind == "diagonal":
        return diagonal_guide(loc, scale), torch.diag_embed(scale.pow(2))
    L = torch.diag_embed(scale)
    L[..., 1, 0] = 0.2
    if kind == "mvn":
        return mvn_guide(loc, L), L @ L.transpose(-1, -2)
    factor = torch.full((lg.d, 1), 0.3, dtype=loc.dtype)
    return lowrank_guide(loc, factor, scale.pow(2)), factor @ factor.T + torch.diag_embed(scale.pow(2))


@pytest.mark.parametrize("prior", ["diagonal", "mvn"])
@pytest.mark.parametrize("guide_kind", ["diagonal", "mvn", "lowrank"])
def test_analytic_kl_elbo_matches_closed_form(guide_kind, prior, x):
    lg = LinearGaussian.random(d=2, D=4, sigma=0.7, prior=prior)
    guide, cov = _guide_and_cov(guide_kind, lg, x)
    exact = lg.elbo(x, off_guide_params(lg, x)[0], cov).sum()
    objective = AnalyticKLELBO(num_particles=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no Monte Carlo fallback for Gaussian pairs
        estimates = repeat(lambda: -objective.loss(lg.model, guide, x), 30)
    mean, se = mean_and_se(estimates)
    assert abs(mean - exact) < Z_MAX * se


def test_analytic_kl_elbo_equals_trace_mean_field_elbo(lg, x):
    """Same seed -> same value and gradients as Pyro's TraceMeanField_ELBO (beta = 1, diagonal guide)."""
    loc, scale = off_guide_params(lg, x)
    loc.requires_grad_()
    for k, vectorize in [(1, False), (4, True)]:
        results = []
        for objective in [AnalyticKLELBO(num_particles=k, max_plate_nesting=1),
                          pyro.infer.TraceMeanField_ELBO(num_particles=k, vectorize_particles=vectorize,
                                                         max_plate_nesting=1)]:
            pyro.set_rng_seed(7)
            loss = objective.differentiable_loss(lg.model, diagonal_guide(loc, scale), x)
            results.append((loss.detach(), torch.autograd.grad(loss, loc)[0]))
        (a, ga), (b, gb) = results
        assert torch.allclose(a, b, rtol=1e-12) and torch.allclose(ga, gb, rtol=1e-10)


def test_beta_is_a_settable_kl_weight(lg, x):
    loc, scale = off_guide_params(lg, x)
    guide = diagonal_guide(loc, scale)
    objective = AnalyticKLELBO(num_particles=3)
    values = {}
    for beta in (1.0, 0.0, 0.5):
        objective.beta = beta
        pyro.set_rng_seed(0)
        values[beta] = objective.loss(lg.model, guide, x)
    kl = torch.distributions.kl_divergence(dist.Normal(loc, scale).to_event(1), lg.prior_dist()).sum()
    assert math.isclose(values[1.0] - values[0.0], float(kl), rel_tol=1e-9)
    assert math.isclose(values[0.5], (values[1.0] + values[0.0]) / 2, rel_tol=1e-9)


def test_analytic_kl_gradient_variance_below_trace_elbo():
    """The closed-form KL removes the KL's Monte Carlo noise: smaller total variance of guide gradients."""
    lg = LinearGaussian.random(d=2, D=4, sigma=2.0)  # weak likelihood: the KL term matters
    x = lg.sample(3)
    loc, scale = off_guide_params(lg, x)
    loc, log_scale = loc.requires_grad_(), scale.log().requires_grad_()

    def gradients(objective):
        def one():
            loss = objective.differentiable_loss(lg.model, diagonal_guide(loc, log_scale.exp()), x)
            return torch.cat([g.flatten() for g in torch.autograd.grad(loss, [loc, log_scale])])
        return repeat(one, 200)

    def total_variance(g):  # E||g - mean||^2, with the standard error of that mean
        return mean_and_se((g - g.mean(0)).pow(2).sum(1) * len(g) / (len(g) - 1))

    (v_analytic, se_a), (v_trace, se_t) = (total_variance(gradients(o)) for o in
                                           (AnalyticKLELBO(), pyro.infer.Trace_ELBO()))
    assert v_trace - v_analytic > Z_MAX * math.hypot(se_a, se_t)


def test_mc_fallback_warns_once_naming_the_site(lg, x):
    """No closed form for StudentT vs Normal: Monte Carlo log q - log p, one warning naming the site."""
    loc, scale = off_guide_params(lg, x)

    def student_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.StudentT(5.0, loc, scale).to_event(1))

    objective = AnalyticKLELBO()
    with pytest.warns(RuntimeWarning, match="'z'") as record:
        pyro.set_rng_seed(0)
        value = objective.loss(lg.model, student_guide, x)
        objective.loss(lg.model, student_guide, x)
    assert sum("'z'" in str(w.message) for w in record) == 1
    pyro.set_rng_seed(0)  # with the MC fallback the estimate is exactly Trace_ELBO's for the same draw
    assert math.isclose(value, pyro.infer.Trace_ELBO().loss(lg.model, student_guide, x), rel_tol=1e-10)


def test_non_reparameterized_guide_is_refused():
    def model(x):
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Bernoulli(torch.full((len(x),), 0.5)))
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("c", dist.Bernoulli(torch.full((len(x),), 0.3)))

    for objective in (AnalyticKLELBO(), IWAEELBO(num_particles=2)):
        with pytest.raises(NotImplementedError, match="'c'"):
            objective.differentiable_loss(model, guide, torch.zeros(3))


# ============================================================================================ IWAE bound
def test_bounds_are_ordered_and_iwae_approaches_log_marginal(lg, x):
    """ELBO < IWAE_5 < IWAE_50 < log p(x), each gap significant at 4 standard errors; IWAE_500 is closer
    still (significantly above IWAE_50, not significantly above log p(x), within 0.05 nats of it)."""
    loc, scale = off_guide_params(lg, x)
    guide = diagonal_guide(loc, scale)
    elbo = lg.elbo(x, loc, torch.diag_embed(scale.pow(2))).sum()
    log_px = lg.log_marginal(x).sum()
    iwae = {}
    for k, repetitions in ((5, 200), (50, 800), (500, 200)):  # repetitions so that every gap is > 4 SE
        objective = IWAEELBO(num_particles=k)
        iwae[k] = mean_and_se(repeat(lambda: -objective.loss(lg.model, guide, x), repetitions))
    chain = [(elbo, 0.0), iwae[5], iwae[50], (log_px, 0.0)]
    for (lower, se_lower), (upper, se_upper) in zip(chain[:-1], chain[1:]):
        assert upper - lower > Z_MAX * math.hypot(se_lower, se_upper)
    (iwae_50, se_50), (iwae_500, se_500) = iwae[50], iwae[500]
    assert iwae_500 - iwae_50 > Z_MAX * math.hypot(se_50, se_500)
    assert iwae_500 - log_px < Z_MAX * se_500
    assert log_px - iwae_500 < 0.05


def test_iwae_one_particle_is_the_elbo(lg, x):
    loc, scale = off_guide_params(lg, x)
    guide = diagonal_guide(loc, scale)
    pyro.set_rng_seed(5)
    a = IWAEELBO(num_particles=1).loss(lg.model, guide, x)
    pyro.set_rng_seed(5)
    b = pyro.infer.Trace_ELBO().loss(lg.model, guide, x)
    assert math.isclose(a, b, rel_tol=1e-12)


def test_iwae_with_exact_posterior_has_zero_variance(lg, x):
    """q = p(z|x) makes every log weight equal log p(x): the estimate is exact for any K."""
    log_w = draw_particles(lg.model, lg.exact_guide, (x,), {}, num_particles=5).log_weights
    assert log_w.shape == (5, 3)
    assert torch.allclose(log_w, lg.log_marginal(x).expand(5, 3), atol=1e-10)
    values = repeat(lambda: IWAEELBO(num_particles=5).loss(lg.model, lg.exact_guide, x), 5)
    assert torch.allclose(values, -lg.log_marginal(x).sum(), atol=1e-10)


def test_iwae_equals_renyi_alpha_zero(lg, x):
    """Per-data-point bounds, as RenyiELBO(alpha=0) computes them when the data plate encloses every site."""
    loc, scale = off_guide_params(lg, x)

    def guide(x):
        loc_param = pyro.param("loc", loc.clone())
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc_param, scale).to_event(1))

    results = []
    for objective in [IWAEELBO(num_particles=7, max_plate_nesting=1),
                      pyro.infer.RenyiELBO(alpha=0, num_particles=7, vectorize_particles=True, max_plate_nesting=1)]:
        pyro.clear_param_store()
        pyro.set_rng_seed(3)
        value = objective.loss_and_grads(lg.model, guide, x)
        results.append((value, pyro.param("loc").unconstrained().grad.clone()))
    (a, ga), (b, gb) = results
    assert math.isclose(a, b, rel_tol=1e-12) and torch.allclose(ga, gb, rtol=1e-10)


def test_iwae_without_batch_plate_is_one_bound(lg, x):
    """A model without plates has a single cell: the bound over the whole batch, like RenyiELBO(alpha=0)."""
    loc, scale = off_guide_params(lg, x)

    def model(x):
        z = pyro.sample("z", dist.Normal(torch.zeros_like(loc), 1.0).to_event(2))
        pyro.sample("x", dist.Normal(z @ lg.W.T + lg.b, lg.sigma).to_event(2), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(loc, scale).to_event(2))

    values = []
    for objective in [IWAEELBO(num_particles=6),
                      pyro.infer.RenyiELBO(alpha=0, num_particles=6, vectorize_particles=True, max_plate_nesting=0)]:
        pyro.set_rng_seed(11)
        values.append(objective.loss(model, guide, x))
    assert math.isclose(values[0], values[1], rel_tol=1e-12)


def test_subsampling_scales_the_per_point_bounds(lg, x):
    """A data plate of size N subsampled to B points scales the summed bound (and the ELBO) by N / B."""
    loc, scale = off_guide_params(lg, x)

    def make(full_size):
        def model(x):
            with pyro.plate("data", full_size, subsample=torch.arange(len(x))):
                z = pyro.sample("z", lg.prior_dist())
                pyro.sample("x", dist.Normal(z @ lg.W.T + lg.b, lg.sigma).to_event(1), obs=x)

        def guide(x):
            with pyro.plate("data", full_size, subsample=torch.arange(len(x))):
                pyro.sample("z", dist.Normal(loc, scale).to_event(1))
        return model, guide

    for objective in (IWAEELBO(num_particles=4), AnalyticKLELBO(num_particles=2)):
        values = []
        for full_size in (3, 30):
            pyro.set_rng_seed(2)
            values.append(objective.loss(*make(full_size), x))
        assert math.isclose(values[1], 10 * values[0], rel_tol=1e-10)


# ============================================================================================ gradient estimators
def _guide_gradients(lg, x, estimator, k, repetitions, shift=0.3, widen=1.3, alpha=0.0):
    """Samples (repetitions, 4 * N) of the guide gradient (loc, log scale) under the seeds 0, 1, ...
    Seeds are shared between estimators, so differences are paired (common random numbers)."""
    loc, scale = off_guide_params(lg, x, shift, widen)
    loc, log_scale = loc.requires_grad_(), scale.log().requires_grad_()
    objective = RenyiBound(alpha, num_particles=k, estimator=estimator) if alpha else \
        IWAEELBO(num_particles=k, estimator=estimator)

    def one():
        loss = objective.differentiable_loss(lg.model, diagonal_guide(loc, log_scale.exp()), x)
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, [loc, log_scale])])
    return repeat(one, repetitions)


def _paired_z(a, b):
    mean, se = mean_and_se(a - b)
    return mean / se


def test_dreg_is_unbiased_for_the_iwae_gradient_with_higher_snr(lg, x):
    """Tucker et al. 2019: E[DReG] = E[IWAE gradient]; at K = 64 DReG's guide SNR beats IWAE's
    (Rainforth et al. 2018: IWAE's guide SNR decays like 1/sqrt(K))."""
    g_iwae, g_dreg = (_guide_gradients(lg, x, e, 64, 200) for e in ("iwae", "dreg"))
    assert _paired_z(g_dreg, g_iwae).abs().max() < Z_MAX
    snr_iwae = g_iwae.mean(0).abs() / g_iwae.std(0)
    snr_dreg = g_dreg.mean(0).abs() / g_dreg.std(0)
    assert (snr_dreg > snr_iwae).all()
    assert snr_dreg.mean() > 5 * snr_iwae.mean()


def test_stl_is_unbiased_for_one_particle_but_biased_for_iwae(lg, x):
    """Roeder et al. 2017's STL is unbiased for the ELBO (K = 1), but for K > 1 it drops a score term with
    non-zero mean (Tucker et al. 2019, sec. 3): its mean differs from the IWAE gradient's."""
    assert _paired_z(*(_guide_gradients(lg, x, e, 1, 200) for e in ("stl", "iwae"))).abs().max() < Z_MAX
    assert _paired_z(*(_guide_gradients(lg, x, e, 16, 100) for e in ("stl", "iwae"))).abs().max() > 10


def test_stop_gradient_estimators_vanish_at_exact_posterior(lg, x):
    """At q = p(z|x), log w is constant in z: STL and DReG guide gradients are exactly 0, IWAE's are not."""
    m, S = lg.posterior(x)
    loc, tril = m.clone().requires_grad_(), torch.linalg.cholesky(S).requires_grad_()
    for estimator in ("stl", "dreg", "iwae"):
        pyro.set_rng_seed(0)
        loss = IWAEELBO(num_particles=8, estimator=estimator).differentiable_loss(lg.model, mvn_guide(loc, tril), x)
        grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, [loc, tril])])
        assert torch.allclose(loss, -lg.log_marginal(x).sum(), atol=1e-10)
        if estimator == "iwae":
            assert grad.abs().max() > 1e-3
        else:
            assert grad.abs().max() < 1e-10


def test_model_gradient_and_value_are_shared_by_all_estimators(x):
    """All estimators give the model parameters sum_k w~_k d log p / d theta, and the loss value is the bound."""
    lg = LinearGaussian.random(d=2, D=4, sigma=0.7)
    lg.W.requires_grad_()
    loc, scale = off_guide_params(lg, x)
    results = {}
    for estimator in ("iwae", "dreg", "stl"):
        objective = IWAEELBO(num_particles=6, estimator=estimator)
        pyro.set_rng_seed(4)
        loss = objective.differentiable_loss(lg.model, diagonal_guide(loc, scale), x)
        pyro.set_rng_seed(4)
        value = objective.loss(lg.model, diagonal_guide(loc, scale), x)
        assert float(loss.detach()) == value
        results[estimator] = torch.autograd.grad(loss, lg.W)[0]
    assert torch.allclose(results["dreg"], results["iwae"], rtol=1e-10)
    assert torch.allclose(results["stl"], results["iwae"], rtol=1e-10)


def test_unknown_estimator_is_refused():
    with pytest.raises(ValueError, match="dreg"):
        IWAEELBO(num_particles=2, estimator="vimco")


# ============================================================================================ Renyi bound
ALPHAS = (0.0, 0.25, 0.5, 0.75, 0.95)


def test_renyi_closed_form_runs_from_log_marginal_to_the_elbo(lg, x):
    """The scaffolding itself: L_0 = log p(x), L_alpha decreasing in alpha, L_alpha -> ELBO as alpha -> 1."""
    loc, scale = off_guide_params(lg, x)
    cov = torch.diag_embed(scale.pow(2))
    values = torch.stack([lg.renyi_bound(x, loc, cov, a) for a in ALPHAS + (1 - 1e-7,)])
    assert torch.allclose(values[0], lg.log_marginal(x), atol=1e-12)
    assert (values[:-1] > values[1:]).all()
    assert torch.allclose(values[-1], lg.elbo(x, loc, cov), atol=1e-5)


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.75])
def test_renyi_estimate_converges_to_the_closed_form(lg, x, alpha):
    """With K particles the estimate's mean is L_alpha plus a delta-method bias
    -Var(v) / (2 K (1 - alpha) E[v]^2), v = w^(1 - alpha); it must match to 4 standard errors."""
    loc, scale = off_guide_params(lg, x)
    guide = diagonal_guide(loc, scale)
    exact = lg.renyi_bound(x, loc, torch.diag_embed(scale.pow(2)), alpha).sum()
    k = 500
    pyro.set_rng_seed(123)
    v = ((1 - alpha) * draw_particles(lg.model, guide, (x,), {}, num_particles=200_000).log_weights).exp()
    bias = (-v.var(0) / (2 * k * (1 - alpha) * v.mean(0).pow(2))).sum()
    objective = RenyiBound(alpha, num_particles=k)
    mean, se = mean_and_se(repeat(lambda: -objective.loss(lg.model, guide, x), 60))
    assert abs(bias) < 0.05  # K is large enough for the expansion
    assert abs(mean - (exact + bias)) < Z_MAX * se


def test_renyi_estimate_decreases_in_alpha_for_every_draw(lg, x):
    """For the same particles, (1/K sum_k w_k^p)^(1/p) is a power mean, increasing in p = 1 - alpha."""
    guide = diagonal_guide(*off_guide_params(lg, x))
    for seed in range(5):
        values = []
        for alpha in ALPHAS:
            pyro.set_rng_seed(seed)
            values.append(-RenyiBound(alpha, num_particles=8).loss(lg.model, guide, x))
        assert all(a > b for a, b in zip(values, values[1:])), values


def test_renyi_at_alpha_zero_is_the_iwae_bound_with_every_estimator(lg, x):
    loc, scale = off_guide_params(lg, x)
    loc.requires_grad_()
    for estimator in ("iwae", "dreg", "stl"):
        results = []
        for objective in (RenyiBound(0.0, num_particles=5, estimator=estimator),
                          IWAEELBO(num_particles=5, estimator=estimator)):
            pyro.set_rng_seed(9)
            loss = objective.differentiable_loss(lg.model, diagonal_guide(loc, scale), x)
            results.append((loss.detach(), torch.autograd.grad(loss, loc)[0]))
        (a, ga), (b, gb) = results
        assert torch.equal(a, b) and torch.equal(ga, gb)


def test_renyi_equals_pyros_renyi_elbo(lg, x):
    """Per-data-point bounds, as Pyro's RenyiELBO computes them when the data plate encloses every site: the
    same value and gradient."""
    loc, scale = off_guide_params(lg, x)

    def guide(x):
        loc_param = pyro.param("loc", loc.clone())
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc_param, scale).to_event(1))

    results = []
    for objective in [RenyiBound(0.5, num_particles=7, max_plate_nesting=1),
                      pyro.infer.RenyiELBO(alpha=0.5, num_particles=7, vectorize_particles=True, max_plate_nesting=1)]:
        pyro.clear_param_store()
        pyro.set_rng_seed(3)
        value = objective.loss_and_grads(lg.model, guide, x)
        results.append((value, pyro.param("loc").unconstrained().grad.clone()))
    (a, ga), (b, gb) = results
    assert math.isclose(a, b, rel_tol=1e-12) and torch.allclose(ga, gb, rtol=1e-10)


def test_renyi_dreg_is_unbiased_with_higher_snr(lg, x):
    """The doubly reparameterized VR gradient, sum_k (alpha w~_k + (1 - alpha) w~_k^2) dlog w_k/dz dz/dphi,
    has the mean of the bound's own gradient, and a higher guide SNR."""
    g_plain, g_dreg = (_guide_gradients(lg, x, e, 32, 200, alpha=0.5) for e in ("iwae", "dreg"))
    assert _paired_z(g_dreg, g_plain).abs().max() < Z_MAX
    snr = [g.mean(0).abs() / g.std(0) for g in (g_plain, g_dreg)]
    assert snr[1].mean() > 2 * snr[0].mean()


def test_renyi_refuses_alpha_outside_the_unit_interval():
    for alpha in (-0.5, 1.0, 2.0):
        with pytest.raises(ValueError, match=r"alpha in \[0, 1\)"):
            RenyiBound(alpha)


# ============================================================================================ detach helper
def _detachable_distributions(p):
    s = p.exp()
    return [dist.Normal(p, s).to_event(1), dist.Laplace(p, s), dist.StudentT(5.0, p, s), dist.LogNormal(p, s),
            dist.MultivariateNormal(p, scale_tril=torch.diag(s)),
            dist.LowRankMultivariateNormal(p, p[:, None] * torch.ones(3, 2), s),
            dist.TransformedDistribution(dist.Normal(p, s), [T.AffineTransform(p, s), T.ExpTransform()]),
            dist.Normal(p, s).expand([2, 3]).mask(torch.tensor(True)).to_event(1)]


@pytest.mark.parametrize("index", range(8))
def test_detach_distribution_keeps_density_and_cuts_parameter_gradients(index):
    p = torch.randn(3, requires_grad=True)
    q = _detachable_distributions(p)[index]
    z = q.rsample()
    q.log_prob(z)  # populate caches (lazy properties, transform caches) before copying
    z = z.detach().requires_grad_()
    q_stopped = detach_distribution(q)
    log_q = q_stopped.log_prob(z)
    assert torch.equal(log_q, q.log_prob(z))
    assert torch.autograd.grad(log_q.sum(), p, allow_unused=True, retain_graph=True)[0] is None
    assert torch.autograd.grad(log_q.sum(), z)[0] is not None


@pytest.mark.parametrize("conditional", [False, True])
def test_detach_distribution_runs_neural_flows_with_detached_weights(conditional):
    """An autoregressive flow (its MADE network an nn.Module, conditioned through functools.partial) keeps its
    density, and no gradient reaches its weights, its context or its base parameters; z still gets one."""
    torch.manual_seed(0)
    p = torch.randn(3, requires_grad=True)
    context = torch.randn(2, requires_grad=True)
    if conditional:
        flow_module = pyro_transforms.conditional_affine_autoregressive(3, 2)
        flow = flow_module.condition(context)
    else:
        flow_module = flow = pyro_transforms.affine_autoregressive(3)
    q = dist.TransformedDistribution(dist.Normal(p, 1.0), [flow])
    z = q.rsample()
    z = z.detach().requires_grad_()
    log_q = detach_distribution(q).log_prob(z)  # inverts the flow through z (no cache)
    torch.testing.assert_close(log_q, q.log_prob(z))
    leaves = [p, context, *flow_module.parameters()]
    assert all(g is None for g in torch.autograd.grad(log_q.sum(), leaves, allow_unused=True, retain_graph=True))
    assert torch.autograd.grad(log_q.sum(), z)[0].abs().sum() > 0


def test_detach_distribution_refuses_parameters_it_cannot_reach():
    class Shift(T.Transform):
        bijective = True
        domain = codomain = torch.distributions.constraints.real

        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def _call(self, x):
            return x + self.fn()

        def _inverse(self, y):
            return y - self.fn()

        def log_abs_det_jacobian(self, x, y):
            return torch.zeros_like(x)

    shift = torch.zeros(3, requires_grad=True)
    q = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0), [Shift(lambda: shift)])
    with pytest.raises(TypeError, match="callable"):
        detach_distribution(q)


# ============================================================================================ SVI smoke
class Decoder(nn.Module):
    def __init__(self, z_dim, hidden, x_dim):
        super().__init__()
        self.fc1, self.fc21 = nn.Linear(z_dim, hidden), nn.Linear(hidden, x_dim)

    def forward(self, z):
        return torch.sigmoid(self.fc21(nn.functional.softplus(self.fc1(z))))


class Encoder(nn.Module):
    def __init__(self, z_dim, hidden, x_dim):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(x_dim, hidden), nn.Linear(hidden, z_dim), nn.Linear(hidden, z_dim)

    def forward(self, x):
        hidden = nn.functional.softplus(self.fc1(x))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class ExampleVAE(nn.Module):
    """Pyro's examples/vae/vae.py model and guide, unchanged but small."""

    def __init__(self, z_dim=2, hidden=8, x_dim=12):
        super().__init__()
        self.encoder, self.decoder, self.z_dim = Encoder(z_dim, hidden, x_dim), Decoder(z_dim, hidden, x_dim), z_dim

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decoder(z)
            pyro.sample("obs", dist.Bernoulli(loc_img, validate_args=False).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


class Program(nn.Module):
    """An nn.Module whose forward is a Pyro program (for ELBOModule)."""

    def __init__(self, net, fn):
        super().__init__()
        self.net, self.fn = net, fn

    def forward(self, x):
        return self.fn(x)


SMOKE = [("elbo", {}), ("analytic", {}), ("iwae", {"estimator": "iwae"}), ("iwae", {"estimator": "dreg"}),
         ("iwae", {"estimator": "stl"})]


def _binary_batch():
    g = torch.Generator().manual_seed(0)
    return (torch.rand(32, 12, generator=g) < torch.linspace(0.1, 0.9, 12)).float()


def _decreased(losses):
    return all(math.isfinite(v) for v in losses) and sum(losses[-5:]) < sum(losses[:5])


@pytest.mark.parametrize("name,kwargs", SMOKE, ids=[f"{n}-{k.get('estimator', '')}" for n, k in SMOKE])
def test_svi_trains_the_pyro_vae_example(name, kwargs):
    x, vae = _binary_batch(), ExampleVAE()
    with pyro.validation_enabled(True):
        svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.03}),
                             make_objective(name, num_particles=3, **kwargs))
        losses = [svi.step(x) for _ in range(40)]
    assert _decreased(losses)


@pytest.mark.parametrize("name,kwargs", SMOKE, ids=[f"{n}-{k.get('estimator', '')}" for n, k in SMOKE])
def test_elbo_module_trains_with_a_torch_optimizer(name, kwargs):
    x, vae = _binary_batch(), ExampleVAE()
    objective = make_objective(name, num_particles=3, **kwargs)
    module = objective(Program(vae.decoder, vae.model), Program(vae.encoder, vae.guide))
    optimizer = torch.optim.Adam(module.parameters(), lr=0.03)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = module(x)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert _decreased(losses)


# ============================================================================================ make_objective
def test_make_objective_builds_each_objective():
    assert isinstance(make_objective("elbo", num_particles=2), pyro.infer.Trace_ELBO)
    analytic = make_objective("analytic", num_particles=2, beta=0.5)
    assert isinstance(analytic, AnalyticKLELBO) and analytic.beta == 0.5 and analytic.num_particles == 2
    iwae = make_objective("iwae", num_particles=5, estimator="dreg")
    assert isinstance(iwae, IWAEELBO) and iwae.estimator == "dreg" and iwae.num_particles == 5
    assert set(OBJECTIVES) >= {"elbo", "analytic", "iwae"}


def test_make_objective_errors_name_the_problem():
    with pytest.raises(ValueError, match="choose one of") as error:
        make_objective("elbow")
    assert all(name in str(error.value) for name in OBJECTIVES)
    with pytest.raises(ValueError, match="beta"):
        make_objective("iwae", beta=0.5)
    with pytest.raises(ValueError, match="num_particles"):
        make_objective("analytic", num_particles=0)


@pytest.mark.parametrize("objective", [
    pyro.infer.Trace_ELBO(),  # converted: vectorize_particles=False with one particle
    IWAEELBO(num_particles=3, estimator="dreg"),
    AnalyticKLELBO(num_particles=3, vectorize_particles=False),  # K single draws: through surrogate_loss
])
def test_bind_gives_the_surrogate_loss_value_and_gradient(objective):
    """``objective.bind(model, guide)`` (the producer chosen once, as the trainer steps) equals surrogate_loss."""
    from pyro_vae import VAE
    from pyro_vae.objectives import as_particle_objective

    objective = as_particle_objective(objective) or objective
    torch.manual_seed(0)
    vae = VAE((1, 4, 4), z_dim=2, hidden=(8,))
    x = torch.bernoulli(torch.full((5, 1, 4, 4), 0.3))
    results = []
    for loss_fn in (objective.bind(vae.model, vae.guide),
                    lambda *a: objective.surrogate_loss(vae.model, vae.guide, *a)):
        vae.zero_grad()
        pyro.set_rng_seed(1)
        loss = loss_fn(x)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in vae.parameters()]))
    (a, ga), (b, gb) = results
    assert torch.allclose(a, b)
    assert all(torch.allclose(u, v, atol=1e-6) for u, v in zip(ga, gb))
