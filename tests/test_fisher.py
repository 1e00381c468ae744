"""Tests for the Fisher auto-encoder objective (pyro_vae.objectives.fisher)."""
import math

import pytest
import torch

import pyro
import pyro.distributions as dist
from tiny_vae import TinyVAE

from pyro_vae.objectives.fisher import FisherELBO, FisherObjective

B, D, K, SIGMA = 5, 4, 3, 0.7


def _linear_gaussian(scale=1.0):
    """z ~ N(0, I_K), x|z ~ N(W z + b, SIGMA^2 I_D); q(z|x) = N(mu, diag s^2) with free per-point mu, s."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(D, K, generator=g, dtype=torch.float64)
    b = torch.randn(D, generator=g, dtype=torch.float64)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    mu0 = torch.randn(B, K, generator=g, dtype=torch.float64)
    s0 = 0.5 + torch.rand(B, K, generator=g, dtype=torch.float64)

    def model(x):
        with pyro.plate("data", B), pyro.poutine.scale(scale=scale):
            z = pyro.sample("z", dist.Normal(torch.zeros(K, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + b, SIGMA).to_event(1), obs=x)

    def guide(x):
        mu = pyro.param("mu", mu0)
        s = pyro.param("s", s0, constraint=dist.constraints.positive)
        with pyro.plate("data", B), pyro.poutine.scale(scale=scale):
            pyro.sample("z", dist.Normal(mu, s).to_event(1))

    return model, guide, x, W, b


def _closed_form(z, x, W, b, mu, s, lam=1.0, gamma=0.0):
    score_q = -(z - mu) / s ** 2
    score_prior = -z
    resid = x - z @ W.T - b
    score_lik = resid @ W / SIGMA ** 2
    log_lik = dist.Normal(z @ W.T + b, SIGMA).log_prob(x).sum()
    fisher = 0.5 * (score_q - score_prior - score_lik).pow(2).sum()
    penalty = 0.5 * score_lik.pow(2).sum()
    return score_q, score_prior, score_lik, -log_lik + lam * fisher + gamma * penalty


def test_scores_match_closed_forms():
    model, guide, x, W, b = _linear_gaussian()
    terms = FisherELBO(fisher_weight=0.3, decoder_score_weight=0.2).terms(model, guide, x)
    mu, s = pyro.param("mu").detach(), pyro.param("s").detach()
    z = terms.z["z"].detach()
    score_q, score_prior, score_lik, loss = _closed_form(z, x, W, b, mu, s, lam=0.3, gamma=0.2)
    torch.testing.assert_close(terms.score_q["z"].detach(), score_q)
    torch.testing.assert_close(terms.score_prior["z"].detach(), score_prior)
    torch.testing.assert_close(terms.score_likelihood["z"].detach(), score_lik)
    assert terms.fisher_per_site["z"].shape == (B,)
    torch.testing.assert_close(terms.loss.detach(), loss)


def test_plate_scale_gives_per_point_scores_and_scaled_loss():
    """With a subsample-style scale s, scores stay per data point and the loss scales by s."""
    model, guide, x, W, b = _linear_gaussian(scale=4.0)
    terms = FisherELBO(fisher_weight=1.0).terms(model, guide, x)
    mu, s = pyro.param("mu").detach(), pyro.param("s").detach()
    z = terms.z["z"].detach()
    score_q, score_prior, score_lik, loss = _closed_form(z, x, W, b, mu, s)
    torch.testing.assert_close(terms.score_likelihood["z"].detach(), score_lik)
    torch.testing.assert_close(terms.score_q["z"].detach(), score_q)
    torch.testing.assert_close(terms.loss.detach(), 4.0 * loss)


def test_loss_gradient_matches_closed_form_gradient():
    """d loss / d(mu, s) through both the reparameterized z and the scores (create_graph) is right."""
    model, guide, x, W, b = _linear_gaussian()
    pyro.set_rng_seed(3)
    loss = FisherELBO().differentiable_loss(model, guide, x)
    got = torch.autograd.grad(loss, [pyro.param("mu").unconstrained(), pyro.param("s").unconstrained()])
    pyro.set_rng_seed(3)
    terms = FisherELBO().terms(model, guide, x)  # same z as above
    z = terms.z["z"].detach()
    mu_u = pyro.param("mu").unconstrained().detach().clone().requires_grad_()
    s_u = pyro.param("s").unconstrained().detach().clone().requires_grad_()
    mu, s = mu_u, torch.exp(s_u)  # positive constraint: s = exp(unconstrained)
    eps = (z - pyro.param("mu").detach()) / pyro.param("s").detach()
    *_, want_loss = _closed_form(mu + s * eps, x, W, b, mu, s)
    want = torch.autograd.grad(want_loss, [mu_u, s_u])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_fisher_term_vanishes_at_exact_posterior():
    """q = p(z|x) exactly (linear-Gaussian posterior) => Fisher term is zero for every z."""
    model, guide, x, W, b = _linear_gaussian()
    prec = torch.eye(K, dtype=torch.float64) + W.T @ W / SIGMA ** 2
    cov = torch.linalg.inv(prec)
    mean = (x - b) @ W @ cov.T / SIGMA ** 2

    def exact_guide(x):
        with pyro.plate("data", B):
            pyro.sample("z", dist.MultivariateNormal(mean, covariance_matrix=cov))

    terms = FisherELBO().terms(model, exact_guide, x)
    assert terms.fisher.abs().item() < 1e-8


def test_rejects_non_reparameterized_guide():
    def model():
        pyro.sample("k", dist.Bernoulli(0.5))

    def guide():
        pyro.sample("k", dist.Bernoulli(0.3))

    with pytest.raises(ValueError, match="reparameterized"):
        FisherELBO().loss(model, guide)
    with pytest.raises(ValueError, match="fisher_weight"):
        FisherELBO(fisher_weight=0.0)


def _data():
    g = torch.Generator().manual_seed(0)
    proto = (torch.rand(4, 64, generator=g) < 0.4).float()
    flips = (torch.rand(64, 64, generator=g) < 0.05).float()
    return ((proto.repeat(16, 1) + flips) % 2).reshape(64, 1, 8, 8)


def _decreased(losses):
    head, tail = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    return all(math.isfinite(v) for v in losses) and tail < head


def test_trains_with_torch_adam():
    vae, x = TinyVAE(), _data()
    objective = FisherELBO(decoder_score_weight=0.01)
    objective.differentiable_loss(vae.model, vae.guide, x)  # registers the modules
    opt = torch.optim.Adam(vae.parameters(), lr=2e-2)
    losses = []
    for _ in range(80):
        opt.zero_grad()
        loss = objective.differentiable_loss(vae.model, vae.guide, x)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert _decreased(losses), losses


def test_trains_with_svi():
    vae, x = TinyVAE(), _data()
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 2e-2}), FisherObjective(num_particles=2))
    losses = [svi.step(x) for _ in range(80)]
    assert _decreased(losses), losses
