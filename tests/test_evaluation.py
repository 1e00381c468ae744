"""Tests for pyro_vae.evaluation: per-point ELBO, importance-sampled log p(x), memory bound, latent statistics."""
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import pyro
import pyro.distributions as dist

from linear_gaussian import LinearGaussian
from pyro_vae import evaluation
from pyro_vae.evaluation import (MEMORY_OVERHEAD, active_units, chunk_size_for_budget, kl_per_dimension,
                                 latent_activity, log_likelihood, streaming_logsumexp)

Z_MAX = 4.0


@pytest.fixture
def lg():
    return LinearGaussian.random(d=2, D=4, sigma=0.7)


@pytest.fixture
def x(lg):
    return lg.sample(5)


def slightly_off_guide(lg, x, shift=0.05, widen=1.1):
    """An amortized guide off the exact posterior, and its (loc, scale) on x."""
    return (lg.offset_guide(shift, widen),) + lg.offset_posterior(x, shift, widen)


# ============================================================================================ ELBO
def test_per_point_elbo_matches_closed_form(lg, x):
    guide, loc, scale = slightly_off_guide(lg, x, shift=0.5, widen=1.3)
    exact = lg.elbo(x, loc, torch.diag_embed(scale.pow(2)))
    estimates = []
    for seed in range(30):
        pyro.set_rng_seed(seed)
        estimates.append(evaluation.elbo(lg.model, guide, x, num_particles=50, batch_size=2))
    estimates = torch.stack(estimates)
    assert estimates.shape == (30, 5)
    se = estimates.std(0) / math.sqrt(len(estimates))
    assert ((estimates.mean(0) - exact).abs() < Z_MAX * se).all()


def test_elbo_needs_a_batch_plate(lg, x):
    def model(x):
        z = pyro.sample("z", dist.Normal(torch.zeros(len(x), 2, dtype=x.dtype), 1.0).to_event(2))
        pyro.sample("x", dist.Normal(z @ lg.W.T + lg.b, lg.sigma).to_event(2), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(torch.zeros(len(x), 2, dtype=x.dtype), 1.0).to_event(2))

    with pytest.raises(ValueError, match="batch plate"):
        evaluation.elbo(model, guide, x)


# ============================================================================================ log p(x)
def test_log_likelihood_is_within_0_05_nats_at_k_5000(lg, x):
    guide, _, _ = slightly_off_guide(lg, x)
    estimate = log_likelihood(lg.model, guide, x, num_samples=5000, progress=False)
    exact = lg.log_marginal(x)
    assert estimate.shape == (5,)
    assert (estimate - exact).abs().max() < 0.05
    assert not torch.allclose(estimate, exact, atol=1e-6)  # the guide is off: the estimate is not trivial


@pytest.mark.parametrize("chunk_size", [1, 7, 50, None])
def test_chunking_gives_the_same_answer(lg, x, chunk_size):
    """With q = p(z|x) every log weight is log p(x), so any chunking gives exactly log p(x)."""
    estimate = log_likelihood(lg.model, lg.exact_guide, x, num_samples=50, chunk_size=chunk_size, progress=False)
    assert torch.allclose(estimate, lg.log_marginal(x), atol=1e-10)


def test_chunked_estimate_agrees_with_one_chunk_within_standard_error(lg, x):
    guide, _, _ = slightly_off_guide(lg, x, shift=0.5, widen=1.3)
    runs = {}
    for chunk in (None, 37):
        values = []
        for seed in range(20):
            pyro.set_rng_seed(seed)
            values.append(log_likelihood(lg.model, guide, x, num_samples=200, chunk_size=chunk, progress=False))
        runs[chunk] = torch.stack(values)
    diff = runs[None].mean(0) - runs[37].mean(0)
    se = torch.sqrt(runs[None].var(0) / 20 + runs[37].var(0) / 20)
    assert (diff.abs() < Z_MAX * se).all()


def test_streaming_logsumexp_equals_logsumexp():
    values = torch.randn(23, 4, dtype=torch.float64) * 30
    values[3:9, 1] = -math.inf
    chunks = values.split(5)
    assert torch.allclose(streaming_logsumexp(chunks), torch.logsumexp(values, 0), atol=1e-12)
    with pytest.raises(ValueError):
        streaming_logsumexp([])


def test_chunk_size_follows_the_memory_budget_formula():
    budget, batch, numel = 512 * 2**20, 16, 784
    expected = budget // (batch * MEMORY_OVERHEAD * numel * 4)
    assert chunk_size_for_budget(budget, batch, numel) == expected == 1337
    assert chunk_size_for_budget(budget, batch, numel, element_size=8) == expected // 2
    assert chunk_size_for_budget(10, 16, 784) == 1  # never below one particle


def test_log_likelihood_passes_stay_within_the_budget(lg, x):
    """Each vectorized pass has at most chunk_size_for_budget particles; the chunks of a batch add up to K."""
    passes = []

    def model(x):  # lg.model, recording (points, particles) of every pass
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", lg.prior_dist())
            passes.append((z.shape[1], z.shape[0]))
            pyro.sample("x", dist.Normal(z @ lg.W.T + lg.b, lg.sigma).to_event(1), obs=x)

    budget = 2 * MEMORY_OVERHEAD * x[0].numel() * x.element_size() * 30  # 30 particles for a batch of 2
    estimate = log_likelihood(model, lg.exact_guide, x, num_samples=100, batch_size=2, memory_budget=budget,
                              progress=False)
    assert chunk_size_for_budget(budget, 2, x[0].numel(), x.element_size()) == 30
    batch_of_two = [(2, 30)] * 3 + [(2, 10)]
    passes = passes[1:]  # the first call is the dry run that finds the plate nesting
    assert passes == batch_of_two + batch_of_two + [(1, 60), (1, 40)]  # batches 2, 2, 1; K = 100 each
    assert torch.allclose(estimate, lg.log_marginal(x), atol=1e-10)


def test_log_likelihood_hands_freed_heap_memory_back_between_batches(lg, x, monkeypatch):
    """A long evaluation trims the C heap (release_freed_memory, glibc's malloc_trim) between batches, at most
    once per RELEASE_INTERVAL_S, without changing a single estimate (a 10 000-digit K = 5000 evaluation grew to
    21 GB without it)."""
    calls = []
    monkeypatch.setattr(evaluation, "release_freed_memory", lambda: calls.append(1) or True)
    torch.manual_seed(0)
    reference = log_likelihood(lg.model, lg.exact_guide, x, num_samples=50, batch_size=2, progress=False)
    assert calls == []  # (a short evaluation: no batch ends a full interval after the start)
    monkeypatch.setattr(evaluation, "RELEASE_INTERVAL_S", -1.0)  # every batch
    torch.manual_seed(0)
    trimmed = log_likelihood(lg.model, lg.exact_guide, x, num_samples=50, batch_size=2, progress=False)
    assert len(calls) == math.ceil(len(x) / 2) and torch.equal(trimmed, reference)
    monkeypatch.undo()
    assert evaluation.release_freed_memory() in (True, False)  # callable where there is no glibc too


def test_log_likelihood_accepts_a_dataloader_of_pairs(lg, x):
    loader = DataLoader(TensorDataset(x, torch.arange(len(x))), batch_size=2)
    estimate = log_likelihood(lg.model, lg.exact_guide, loader, num_samples=10, progress=False)
    assert torch.allclose(estimate, lg.log_marginal(x), atol=1e-10)


def test_a_tuple_of_tensors_is_passed_as_positional_arguments(lg, x):
    """(x, c) data for conditional models: split together, called as model(x, c) and guide(x, c)."""
    c = torch.randn(len(x), lg.D, dtype=x.dtype)

    def model(x, c):  # x - c ~ the linear-Gaussian model
        lg.model(x - c)

    def guide(x, c):
        lg.exact_guide(x - c)

    estimate = log_likelihood(model, guide, (x, c), num_samples=10, batch_size=2, progress=False)
    assert torch.allclose(estimate, lg.log_marginal(x - c), atol=1e-10)
    assert evaluation.elbo(model, guide, (x, c), batch_size=3).shape == (5,)
    with pytest.raises(ValueError, match="first"):
        log_likelihood(model, guide, (x, c[:2]), num_samples=2, progress=False)


def test_log_likelihood_validates_arguments(lg, x):
    with pytest.raises(ValueError, match="num_samples"):
        log_likelihood(lg.model, lg.exact_guide, x, num_samples=0, progress=False)
    with pytest.raises(TypeError, match="data"):
        log_likelihood(lg.model, lg.exact_guide, 3.0, num_samples=2, progress=False)


# ============================================================================================ latents
class FakeEncoder:
    """encode(x) = N(x * [1, 0.05, 0], 0.5): dimension 0 active, 1 and 2 not (variances 1, 0.0025, 0)."""

    def encode(self, x):
        return dist.Normal(x[:, :3] * torch.tensor([1.0, 0.05, 0.0]), 0.5).to_event(1)


def test_active_units_counts_dimensions_with_varying_posterior_means():
    data = torch.randn(400, 3, generator=torch.Generator().manual_seed(0))
    activity = latent_activity(FakeEncoder(), data, batch_size=64)
    assert activity.shape == (3,) and activity[0] > 0.5 and activity[1] < 0.01 and activity[2] == 0
    assert active_units(FakeEncoder(), data) == 1
    assert active_units(lambda x: x[:, :3] * torch.tensor([1.0, 1.0, 0.0]), data) == 2  # a means function


def test_kl_per_dimension_gaussian_families():
    data = torch.randn(50, 3, generator=torch.Generator().manual_seed(1))
    loc, var = data * torch.tensor([1.0, 0.5, 0.0]), torch.tensor([0.5, 1.0, 2.0])
    expected = (0.5 * (var + loc.pow(2) - 1 - var.log())).mean(0)

    def diagonal(x):
        return dist.Normal(x * torch.tensor([1.0, 0.5, 0.0]), var.sqrt()).to_event(1)

    def full(x):  # off-diagonal covariance does not change the marginals
        cov = torch.diag(var) + 0.1 * (torch.ones(3, 3) - torch.eye(3))
        return dist.MultivariateNormal(x * torch.tensor([1.0, 0.5, 0.0]), cov)

    def lowrank(x):
        factor = torch.tensor([[0.5], [0.0], [0.0]])
        return dist.LowRankMultivariateNormal(x * torch.tensor([1.0, 0.5, 0.0]), factor, var - factor.squeeze(-1) ** 2)

    for encode in (diagonal, full, lowrank):
        assert torch.allclose(kl_per_dimension(encode, data, batch_size=16), expected, atol=1e-5)


def test_kl_per_dimension_other_families():
    data = torch.zeros(20, 2)
    laplace = kl_per_dimension(lambda x: dist.Laplace(x, 1.0).to_event(1), data)
    exact = torch.distributions.kl_divergence(dist.Laplace(0.0, 1.0), dist.Normal(0.0, 1.0))
    assert torch.allclose(laplace, exact.expand(2))
    pyro.set_rng_seed(0)
    student = kl_per_dimension(lambda x: dist.StudentT(5.0, x, 1.0).to_event(1), data, num_samples=4000)
    assert torch.isfinite(student).all() and (student > 0).all() and (student < 0.2).all()
    lognormal = kl_per_dimension(lambda x: dist.LogNormal(x, 1.0).to_event(1), data, num_samples=4000)
    assert torch.isfinite(lognormal).all()  # Monte Carlo over each coordinate's marginal
    flow = dist.TransformedDistribution(dist.Normal(torch.zeros(20, 2), 1.0).to_event(1),
                                        [torch.distributions.transforms.AffineTransform(0.0, 2.0, event_dim=1)])
    with pytest.warns(RuntimeWarning, match="marginal"):
        assert torch.isnan(kl_per_dimension(lambda x: flow, data)).all()


def test_works_on_a_pyro_vae():
    from pyro_vae import VAE

    vae = VAE(input_shape=(1, 4, 4), z_dim=2, hidden=(8,))
    x = (torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    with torch.no_grad():
        elbo = evaluation.elbo(vae.model, vae.guide, x, num_particles=3)
        ll = log_likelihood(vae.model, vae.guide, x, num_samples=64, progress=False)
    assert elbo.shape == ll.shape == (6,) and torch.isfinite(ll).all()
    assert 0 <= active_units(vae, x) <= 2 and kl_per_dimension(vae, x).shape == (2,)
