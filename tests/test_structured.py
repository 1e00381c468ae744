"""Structured models: the hierarchy (bottom-up and ladder) against closed forms, the learned priors' densities
against direct formulas, the VAE's twin against traces for every prior, training with and without capture, and the
two examples' quick modes."""
import importlib.util
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

import pyro
import pyro.distributions as dist

import linear_hierarchy as lh
from pyro_vae import VAE, HierarchicalVAE, fit
from pyro_vae.objectives import AnalyticKLELBO, IWAEELBO, MonteCarloELBO, RenyiBound
from pyro_vae.particles import draw_particles, particle_twin
from pyro_vae.priors import FlowPrior, MixturePrior, VampPrior, kl_monte_carlo_reason, make_prior

ROOT = Path(__file__).resolve().parents[1]
INFERENCE = ["bottom-up", "top-down"]
PRIORS = {"mog": {"prior_components": 3}, "vamp": {"prior_components": 4}, "flow": {}}


def quiet(fn, *args, **kwargs):
    """Call fn with the analytic objective's Monte Carlo KL warning silenced (a learned prior's KL is Monte
    Carlo by design; see test_a_learned_prior_uses_the_monte_carlo_kl_without_a_warning)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "AnalyticKLELBO: no closed-form KL", RuntimeWarning)
        return fn(*args, **kwargs)


def mean_se(values):
    return float(values.mean()), float(values.std() / math.sqrt(values.numel()))


# ----------------------------------------------------------------------------------------- the hierarchy
@pytest.mark.parametrize("inference", INFERENCE)
def test_every_bound_of_the_exact_posterior_is_log_px(inference):
    """With q = p(z|x) every weight is p(x): IWAE_K, the ELBO and VR_alpha all equal log p(x), for any K."""
    model, params = lh.make(inference)
    x = lh.sample(params, 5)
    log_px = float(lh.log_marginal(params, x).sum())
    assert float(lh.elbo(model, params, x).sum().detach()) == pytest.approx(log_px, abs=1e-10)
    for objective in (IWAEELBO(num_particles=1), IWAEELBO(num_particles=7), MonteCarloELBO(num_particles=3),
                      RenyiBound(alpha=0.5, num_particles=4)):
        assert -objective.loss(model.model, model.guide, x) == pytest.approx(log_px, abs=1e-9)


@pytest.mark.parametrize("inference", INFERENCE)
def test_elbo_iwae_and_log_px_are_ordered_for_an_approximate_guide(inference):
    """Closed-form ELBO = the Monte Carlo and analytic-KL estimates; ELBO <= IWAE_5 <= IWAE_50 <= log p(x)."""
    model, params = lh.make(inference, exact=False)
    x = lh.sample(params, 3)
    log_px, closed = float(lh.log_marginal(params, x).sum()), float(lh.elbo(model, params, x).sum())
    pyro.set_rng_seed(0)
    p = draw_particles(model.model, model.guide, (x,), {}, num_particles=4000, kl=True)
    for estimate in (p.log_weights.sum(1), (p.log_px_given_z - p.kl).sum(1)):
        mean, se = mean_se(estimate)
        assert abs(mean - closed) < 4 * se
    log_w = p.log_weights.detach()
    iwae = {k: mean_se((log_w.reshape(-1, k, 3).logsumexp(1) - math.log(k)).sum(-1)) for k in (5, 50)}
    assert closed + 3 * iwae[5][1] < iwae[5][0] < iwae[50][0] < log_px
    assert iwae[50][0] > iwae[5][0] + 3 * math.hypot(iwae[5][1], iwae[50][1])


def test_the_analytic_kl_is_per_layer_at_the_sampled_parents_where_that_is_unbiased():
    """Top-down (the ladder) every layer gets the closed form KL(q(z_l|z_{l+1},x) || p(z_l|z_{l+1})); bottom-up
    z_1 is drawn before its parent z_2, so its closed form at the sampled z_2 would be biased (it ignores the
    correlation of z_1 and z_2 under q; here it misses log p(x) of the exact posterior by nats): it takes the Monte
    Carlo KL, and the bound is exact in expectation."""
    for inference, monte_carlo in (("top-down", ()), ("bottom-up", ("z1",))):
        model, params = lh.make(inference)
        x = lh.sample(params, 5)
        log_px = float(lh.log_marginal(params, x).sum())
        pyro.set_rng_seed(0)
        p = quiet(draw_particles, model.model, model.guide, (x,), {}, num_particles=4000, kl=True)
        assert p.kl_monte_carlo == monte_carlo
        mean, se = mean_se((p.log_px_given_z - p.kl).sum(1))
        assert abs(mean - log_px) < 4 * se
    trace = pyro.poutine.trace(pyro.plate("particles", 4000, dim=-2)(model.guide)).get_trace(x)
    replayed = pyro.poutine.trace(pyro.poutine.replay(pyro.plate("particles", 4000, dim=-2)(model.model),
                                                      trace=trace)).get_trace(x)
    naive = replayed.nodes["x"]["fn"].log_prob(x).sum(-1)
    for site in ("z1", "z2"):
        q = trace.nodes[site]["fn"]
        q = dist.Normal(q.base_dist.loc, q.base_dist.scale).to_event(1)  # as a plain diagonal Gaussian
        naive = naive - torch.distributions.kl_divergence(q, replayed.nodes[site]["fn"]).sum(-1)
    mean, se = mean_se(naive.detach())
    assert abs(mean - log_px) > 5 * se  # the closed form at the sampled parents: biased


@pytest.mark.xfail(strict=True, reason="core limitation: detach_distribution cuts a hierarchical guide site's "
                   "dependence on the latents above it, so log q_sg misses part of the path derivative")
@pytest.mark.parametrize("inference", INFERENCE)
def test_stl_and_dreg_gradients_vanish_at_the_exact_posterior(inference):
    model, params = lh.make(inference)
    x = lh.sample(params, 5)
    for estimator in ("stl", "dreg"):
        pyro.set_rng_seed(0)
        loss = IWAEELBO(num_particles=3, estimator=estimator).differentiable_loss(model.model, model.guide, x)
        for g in torch.autograd.grad(loss, list(model.encoder.parameters())):
            torch.testing.assert_close(g, torch.zeros_like(g), atol=1e-8, rtol=0)


def test_the_default_architecture_is_burdas_two_layer_network():
    m = HierarchicalVAE((1, 28, 28))
    linear = lambda net: [(l.in_features, l.out_features) for l in net.modules() if isinstance(l, torch.nn.Linear)]
    acts = {type(l) for l in m.modules() if isinstance(l, (torch.nn.Tanh, torch.nn.ReLU))}
    enc = [linear(t) + linear(h) for t, h in zip(m.encoder["trunks"], m.encoder["heads"])]
    assert enc == [[(784, 200), (200, 200), (200, 200)], [(100, 100), (100, 100), (100, 100)]]
    assert linear(m.decoder[1]) == [(50, 100), (100, 100), (100, 200)]
    assert linear(m.decoder[0]) == [(100, 200), (200, 200), (200, 784)]
    assert acts == {torch.nn.Tanh}


@pytest.mark.parametrize("inference", INFERENCE)
def test_the_hierarchy_samples_reconstructs_and_generates(inference):
    m = HierarchicalVAE((1, 4, 4), (3, 2), inference=inference, deterministic=((8,), (6,)))
    x = torch.bernoulli(torch.rand(5, 1, 4, 4))
    m.init_output_bias(x.mean(0))
    assert m.sample(3).shape == (3, 1, 4, 4) and m.reconstruct(x).shape == (5, 1, 4, 4)
    trace = pyro.poutine.trace(m.model).get_trace(batch_size=4)
    assert [n for n, s in trace.nodes.items() if s["type"] == "sample"] == ["data", "z2", "z1", "x"]
    assert trace.nodes["x"]["value"].shape == (4, 1, 4, 4)
    guide = pyro.poutine.trace(m.guide).get_trace(x)
    assert {"z1", "z2"} <= set(guide.nodes) and guide.nodes["z1"]["fn"].event_shape == (3,)


# ----------------------------------------------------------------------------------------- the priors
def test_mixture_prior_density_is_logsumexp_of_weighted_components():
    prior = MixturePrior(3, 4)
    with torch.no_grad():
        prior.logits.normal_()
        prior.raw_scales.normal_()
    z = torch.randn(7, 3)
    log_w = prior.logits.log_softmax(-1)
    comps = torch.stack([torch.distributions.MultivariateNormal(prior.locs[k], torch.diag(prior.scales[k] ** 2))
                         .log_prob(z) for k in range(4)], -1)
    torch.testing.assert_close(prior.log_prob(z), (comps + log_w).logsumexp(-1))


def test_vamp_prior_density_is_the_average_posterior_at_the_pseudo_inputs():
    vae = VAE((1, 4, 4), z_dim=2, hidden=(8,), prior="vamp", prior_components=5)
    assert vae.learned_prior.pseudo_inputs.shape == (5, 1, 4, 4)
    z = torch.randn(6, 2)
    q = [vae.encode(vae.learned_prior.pseudo_inputs[k:k + 1]) for k in range(5)]
    direct = torch.stack([qk.log_prob(z) for qk in q], -1).logsumexp(-1) - math.log(5)
    torch.testing.assert_close(vae.prior().log_prob(z), direct)
    assert make_prior("vamp", 2, encode=vae._pseudo_posterior, input_shape=(1, 4, 4)).pseudo_inputs.shape[0] == 500


def test_flow_prior_density_is_the_change_of_variables():
    """log p(z) = log N(f^-1(z); 0, I) + log |det d f^-1(z) / dz|, the Jacobian by autograd."""
    prior = FlowPrior(3, flow_steps=2)
    with torch.no_grad():
        for p in prior.parameters():
            p.normal_(0, 0.3)
    transforms = prior.transforms()

    def inverse(z):
        for t in reversed(transforms):
            z = t.inv(z)
        return z

    for z in torch.randn(4, 3):
        jac = torch.autograd.functional.jacobian(inverse, z)
        eps = inverse(z)
        direct = torch.distributions.Normal(0.0, 1.0).log_prob(eps).sum() + torch.linalg.slogdet(jac)[1]
        torch.testing.assert_close(prior.log_prob(z), direct, rtol=1e-5, atol=1e-5)
    assert prior().sample((5,)).shape == (5, 3)


@pytest.mark.parametrize("name", list(PRIORS))
def test_learned_prior_distributions_say_why_their_kl_is_monte_carlo(name):
    """Under a plate the site's distribution is expanded; it keeps its type and the reason."""
    vae = VAE((1, 4, 4), z_dim=2, hidden=(8,), prior=name, **PRIORS[name])
    fn = vae.prior().expand([4, 3])
    assert kl_monte_carlo_reason(fn) and fn.event_shape == (2,) and fn.batch_shape == (4, 3)
    assert kl_monte_carlo_reason(dist.Normal(0.0, 1.0)) is None


@pytest.mark.xfail(strict=True, reason="needs the change to particles.py/objectives/base.py in docs/structured.md: "
                   "the objective skips the warning for sites whose distribution has a kl_monte_carlo_reason")
def test_a_learned_prior_uses_the_monte_carlo_kl_without_a_warning():
    vae = VAE((1, 4, 4), z_dim=2, hidden=(8,), prior="mog", prior_components=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AnalyticKLELBO().loss(vae.model, vae.guide, torch.bernoulli(torch.rand(4, 1, 4, 4)))


# ----------------------------------------------------------------------------------------- the VAE's twin
def traced(vae):
    return (lambda *a, **k: vae.model(*a, **k)), (lambda *a, **k: vae.guide(*a, **k))


def loss_and_grads(vae, objective, model, guide, x, seed=11):
    pyro.set_rng_seed(seed)
    loss = quiet(objective.differentiable_loss, model, guide, x)
    params = [p for p in vae.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("name", list(PRIORS))
def test_the_twin_equals_traces_for_every_learned_prior(name):
    torch.manual_seed(0)
    vae = VAE((1, 4, 4), z_dim=3, hidden=(10,), prior=name, **PRIORS[name])
    assert not vae.standard_prior() and particle_twin(vae.model, vae.guide) is not None
    x = torch.bernoulli(torch.rand(6, 1, 4, 4))
    for make in (MonteCarloELBO, AnalyticKLELBO, lambda: IWAEELBO(num_particles=3, estimator="dreg"),
                 lambda: RenyiBound(alpha=0.5, num_particles=3)):
        (la, ga), (lb, gb) = (loss_and_grads(vae, make(), *pair, x) for pair in ((vae.model, vae.guide), traced(vae)))
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-4)
        for u, v in zip(ga, gb):
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)
    for pair in ((vae.model, vae.guide), traced(vae)):
        p = quiet(draw_particles, *pair, (x,), {}, num_particles=2, kl=True)
        assert p.kl_monte_carlo == ("z",)
        torch.testing.assert_close(p.kl, p.log_qz - p.log_pz)
    assert vae.sample(3).shape == (3, 1, 4, 4)
    if name == "vamp":  # the model uses the encoder through p(z): it registers it too
        assert "encoder" in vae._model_modules()


# ----------------------------------------------------------------------------------------- training
def _fit_falls(module, x, compile, objective="analytic", **options):
    before = quiet(AnalyticKLELBO().loss, module.model, module.guide, x) / len(x)
    history = quiet(fit, module, x, epochs=1, batch_size=16, lr=1e-2, progress=False, compile=compile,
                    objective=objective, init_output_bias="default", **options)
    after = quiet(AnalyticKLELBO().loss, module.model, module.guide, x) / len(x)
    assert math.isfinite(history[-1]["train_loss"]) and after < before
    if compile == "graph":
        assert "capture_seconds" in history[0]


@pytest.mark.slow
@pytest.mark.parametrize("compile", [False, "graph"])
@pytest.mark.parametrize("inference", INFERENCE)
def test_fit_trains_the_hierarchy(inference, compile):
    pyro.set_rng_seed(0)
    x = torch.bernoulli(torch.rand(8, 1, 4, 4)).repeat(16, 1, 1, 1)
    m = HierarchicalVAE((1, 4, 4), (3, 2), inference=inference, deterministic=((16,), (8,)))
    _fit_falls(m, x, compile, objective="iwae", num_particles=3)


@pytest.mark.parametrize("compile", [False, "graph"])
@pytest.mark.parametrize("name", list(PRIORS))
def test_fit_trains_the_vae_with_each_learned_prior(name, compile):
    pyro.set_rng_seed(0)
    x = torch.bernoulli(torch.rand(8, 1, 4, 4)).repeat(16, 1, 1, 1)
    _fit_falls(VAE((1, 4, 4), z_dim=2, hidden=(16,), prior=name, **PRIORS[name]), x, compile)


@pytest.mark.slow
def test_fit_trains_the_ladder_with_a_learned_top_prior():
    pyro.set_rng_seed(0)
    x = torch.bernoulli(torch.rand(8, 1, 4, 4)).repeat(16, 1, 1, 1)
    m = HierarchicalVAE((1, 4, 4), (3, 2), inference="top-down", deterministic=((16,), (8,)), prior="vamp",
                        prior_components=4)
    assert "encoder" in m._model_modules()
    _fit_falls(m, x, "graph")


# ----------------------------------------------------------------------------------------- the examples
def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def assert_learned(gain: dict, what: str) -> None:
    assert gain["stderr"] > 0 and gain["mean"] > 3 * gain["stderr"], \
        f"{what}: gain {gain['mean']:.3f} ± {gain['stderr']:.3f} nats per point, not above 3 standard errors"


@pytest.mark.slow
def test_hierarchical_example_quick():
    rows = quiet(_load(ROOT / "examples" / "hierarchical.py").main, ["--quick"])
    assert list(rows) == ["bottom-up", "top-down"]
    for name, row in rows.items():
        assert_learned(row["learned"], f"hierarchical.py {name} (ELBO)")
        assert_learned(row["learned_log_px"], f"hierarchical.py {name} (log p(x))")


@pytest.mark.slow
def test_learned_prior_example_quick():
    rows = quiet(_load(ROOT / "examples" / "learned_prior.py").main, ["--quick"])
    assert list(rows) == ["standard", "mog", "vamp", "flow"]
    for name, row in rows.items():
        assert_learned(row["learned"], f"learned_prior.py {name} (ELBO)")
        assert_learned(row["learned_log_px"], f"learned_prior.py {name} (log p(x))")
