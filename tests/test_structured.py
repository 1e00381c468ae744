"""Structured models: the hierarchy (bottom-up and ladder) against closed forms, the learned priors' densities
against direct formulas, the VAE's twin against traces for every prior, training with and without capture, and the
two examples' quick modes."""
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

import pyro
import pyro.distributions as dist

import linear_hierarchy as lh
from pyro_vae import VAE, HierarchicalVAE, fit, load_dataset
from pyro_vae.compiling import gradient_program
from pyro_vae.objectives import AnalyticKLELBO, IWAEELBO, MonteCarloELBO, RenyiBound
from pyro_vae.particles import PARTICLE_PLATE, draw_particles, particle_twin, stop_gradient_parameters
from pyro_vae.priors import FlowPrior, MixturePrior, VampPrior, kl_monte_carlo_reason, make_prior
from pyro_vae.training import ObjectiveModule
from scripts import assert_learned, load_script

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


@pytest.mark.parametrize("inference", INFERENCE)
def test_stl_and_dreg_gradients_vanish_at_the_exact_posterior(inference):
    """At q = p(z|x) log w = log p(x) for every z: the path derivative of log w is 0, so STL's and DReG's guide
    gradients are exactly 0 (IWAE's are not). log q_sg must keep the dependence of q(z_2 | z_1) on z_1 (or of
    the ladder's q(z_1 | z_2, x) on z_2): a per-site detached copy cut it and left a gradient of order 1. The
    guide as a plain function (its networks out of reach: the leaked parameter term is cancelled) agrees."""
    model, params = lh.make(inference)
    x = lh.sample(params, 5)
    for guide in (model.guide, lambda x: model.guide(x)):
        for estimator in ("stl", "dreg", "iwae"):
            pyro.set_rng_seed(0)
            loss = IWAEELBO(num_particles=3, estimator=estimator).differentiable_loss(model.model, guide, x)
            grads = torch.autograd.grad(loss, list(model.encoder.parameters()))
            largest = max(float(g.abs().max()) for g in grads)
            assert largest > 1.0 if estimator == "iwae" else largest < 1e-8, (estimator, largest)


def _gradients(model, x, estimator, k, repetitions):
    """(repetitions, P): every parameter's gradient of the negative bound under the seeds 0, 1, ... (paired)."""
    objective, params = IWAEELBO(num_particles=k, estimator=estimator), list(model.parameters())
    out = []
    for seed in range(repetitions):
        pyro.set_rng_seed(seed)
        loss = objective.differentiable_loss(model.model, model.guide, x)
        out.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(out)


def _paired_z(a, b):
    """max |mean / standard error| of the paired differences a - b over the coordinates where they vary; those
    where they do not (the model's own gradient, which both estimators share) must agree exactly."""
    d = a - b
    mean, se = d.mean(0), d.std(0) / math.sqrt(d.shape[0])
    varies = se > 1e-9 * (1 + float(a.abs().max()))
    assert varies.any() and float(mean[~varies].abs().sum()) < 1e-9
    return float((mean[varies] / se[varies]).abs().max())


@pytest.mark.parametrize("inference", INFERENCE)
def test_dreg_is_unbiased_on_the_hierarchy(inference):
    """Away from the posterior (a random linear guide), E[DReG_3] = E[IWAE_3 gradient] (Tucker et al., 2019) for
    every parameter, the ladder's shared decoder included: within 4.5 standard errors of 30 paired draws of a
    batch of 400 (100 copies of 4 points). With the per-site detached log q_sg it was off by 8 (bottom-up) and 35
    (top-down) standard errors. (STL's fix shows at the exact posterior, above: at K = 1 the cut term is a score
    with mean zero, so STL_1 stayed unbiased but lost its zero variance.)"""
    model, params = lh.make(inference, exact=False)
    x = lh.sample(params, 4).repeat(100, 1)
    assert _paired_z(_gradients(model, x, "dreg", 3, 30), _gradients(model, x, "iwae", 3, 30)) < 4.5


@pytest.mark.parametrize("inference", INFERENCE)
def test_the_replayed_stop_gradient_log_q_is_log_q_with_only_the_path_through_z(inference):
    """log q_sg = log q in value; its gradient is the path derivative alone: that of log N(z(phi); m, C) for the
    guide's joint Gaussian q(z_1, z_2 | x) = N(m, C) with m, C held fixed (tests/linear_hierarchy.py), z = z(phi)
    the particles' own draws. The same for the guide as a plain function (the parameter term cancelled)."""
    model, params = lh.make(inference, exact=False)
    x = lh.sample(params, 3)
    with torch.no_grad():
        joints = [lh.guide_joint(model, xn) for xn in x]
    weights = list(model.parameters())
    for guide in (model.guide, lambda x: model.guide(x)):
        pyro.set_rng_seed(0)
        p = draw_particles(model.model, guide, (x,), {}, num_particles=2, stop_q=True)
        pyro.set_rng_seed(0)
        trace = pyro.poutine.trace(pyro.plate(PARTICLE_PLATE, 2, dim=-2)(model.guide)).get_trace(x)
        z = torch.cat([trace.nodes["z1"]["value"], trace.nodes["z2"]["value"]], -1)  # (K, N, d_1 + d_2)
        by_hand = torch.stack([torch.distributions.MultivariateNormal(m, c).log_prob(z[:, n])
                               for n, (m, c) in enumerate(joints)], -1)
        torch.testing.assert_close(p.log_qz_stop, p.log_qz, rtol=0, atol=1e-12)
        torch.testing.assert_close(p.log_qz_stop, by_hand, rtol=1e-10, atol=1e-10)
        for a, b in zip(torch.autograd.grad(p.log_qz_stop.sum(), weights, allow_unused=True),
                        torch.autograd.grad(by_hand.sum(), weights, allow_unused=True)):
            if b is None:
                assert a is None or float(a.abs().max()) == 0
            else:
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_stop_gradient_parameters_detaches_every_parameter_and_restores_the_module():
    """Inside: the owner's networks and ``pyro.param`` give results without gradient, and ``named_parameters``
    lists nothing (``pyro.module`` registers nothing); afterwards every parameter is back, same objects, same
    order, even when the block raised."""
    m = HierarchicalVAE((1, 4, 4), (3, 2), deterministic=((8,), (6,)))
    before = list(m.named_parameters())
    z = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="inside"):
        with stop_gradient_parameters(m):
            assert list(m.named_parameters()) == [] and not m.decoder[0](z).requires_grad
            assert not pyro.param("structured_test_c", torch.ones(2, requires_grad=True)).requires_grad
            raise RuntimeError("inside")
    pyro.get_param_store().__delitem__("structured_test_c")
    after = list(m.named_parameters())
    assert [n for n, _ in after] == [n for n, _ in before] and all(a is b for (_, a), (_, b) in zip(after, before))
    assert m.decoder[0](z).requires_grad


@pytest.mark.parametrize("inference", [pytest.param("bottom-up", marks=pytest.mark.slow), "top-down"])
def test_dreg_on_the_hierarchy_is_captured_into_one_graph_equal_to_eager(inference):
    """The guide's replay with detached parameters is recorded by make_fx with the rest of the training step
    (parameters as graph inputs): the recorded step's loss and gradients equal eager's for the same random state."""
    torch.manual_seed(0)
    m = HierarchicalVAE((1, 4, 4), (3, 2), inference=inference, deterministic=((8,), (6,)))
    x = torch.bernoulli(torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(1)))
    module = ObjectiveModule(m, IWAEELBO(num_particles=3, estimator="dreg"), compile="graph")
    results = []
    for step in (gradient_program(module._loss, module.params), module.step, module.step):
        pyro.set_rng_seed(7)
        with pyro.validation_enabled(False):
            results.append(step(x))
    assert module.step.captured and len(module.step.graphs) == 1
    for eager, first, again in zip(*results):
        torch.testing.assert_close(first, eager, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(again, eager, rtol=1e-5, atol=1e-6)


def test_dreg_on_the_hierarchy_under_svi_and_poutine_scale():
    """Under Pyro's handlers the replay is hidden from them: an SVI step (SGD) moves every parameter by -lr times
    the handler-free DReG gradient for the same random state, and ``poutine.scale(2)`` around model and guide
    doubles the gradient."""
    model, params = lh.make("top-down", exact=False)
    x = lh.sample(params, 4)
    objective, weights = IWAEELBO(num_particles=3, estimator="dreg"), list(model.parameters())
    pyro.set_rng_seed(0)
    plain = torch.autograd.grad(objective.differentiable_loss(model.model, model.guide, x), weights)
    pyro.clear_param_store()
    before = [w.detach().clone() for w in weights]
    svi = pyro.infer.SVI(model.model, model.guide, pyro.optim.SGD({"lr": 1e-3}), objective)
    pyro.set_rng_seed(0)
    svi.step(x)
    for w, w0, g in zip(weights, before, plain):
        torch.testing.assert_close(w.detach(), w0 - 1e-3 * g, rtol=1e-9, atol=1e-12)
    model, _ = lh.make("top-down", exact=False)
    weights = list(model.parameters())
    pyro.set_rng_seed(0)
    loss = objective.differentiable_loss(pyro.poutine.scale(model.model, 2.0), pyro.poutine.scale(model.guide, 2.0), x)
    for a, b in zip(torch.autograd.grad(loss, weights), plain):
        torch.testing.assert_close(a, 2 * b, rtol=1e-9, atol=1e-12)


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


@pytest.mark.parametrize("name", list(PRIORS))
def test_a_learned_prior_uses_the_monte_carlo_kl_without_a_warning(name):
    """Twin and traces alike mark the site as Monte Carlo *by design*; so does the bottom-up hierarchy."""
    vae = VAE((1, 4, 4), z_dim=2, hidden=(8,), prior=name, **PRIORS[name])
    x = torch.bernoulli(torch.rand(4, 1, 4, 4))
    hierarchy = HierarchicalVAE((1, 4, 4), (3, 2), deterministic=((8,), (6,)))
    for model, guide in ((vae.model, vae.guide), traced(vae), (hierarchy.model, hierarchy.guide)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            AnalyticKLELBO().loss(model, guide, x)
            p = draw_particles(model, guide, (x,), {}, num_particles=2, kl=True)
        assert p.kl_monte_carlo == p.kl_monte_carlo_expected == (("z1",) if model == hierarchy.model else ("z",))


def test_an_unexplained_monte_carlo_kl_still_warns_and_names_only_its_site():
    """Site "a" (a Gaussian-mixture prior) is Monte Carlo by design; site "b" (a Student-t guide against a
    Normal prior, no closed form registered, no reason given) warns, once."""
    prior_a = MixturePrior(2, 3)

    def model(x):
        with pyro.plate("data", len(x)):
            a = pyro.sample("a", prior_a())
            b = pyro.sample("b", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(a.sum(-1) + b, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("a", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("b", dist.StudentT(4.0, 0.0, 1.0))

    objective = AnalyticKLELBO()
    with pytest.warns(RuntimeWarning) as record:
        objective.loss(model, guide, torch.zeros(3))
        objective.loss(model, guide, torch.zeros(3))
    messages = [str(w.message) for w in record if "closed-form KL" in str(w.message)]
    assert len(messages) == 1 and "'b'" in messages[0] and "'a'" not in messages[0]


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


@pytest.mark.slow
def test_hierarchical_example_quick():
    rows = quiet(load_script(ROOT / "examples" / "hierarchical.py").main, ["--quick"])
    assert list(rows) == ["bottom-up", "top-down"]
    for name, row in rows.items():
        assert_learned(row["learned"], f"hierarchical.py {name} (ELBO)")
        assert_learned(row["learned_log_px"], f"hierarchical.py {name} (log p(x))")


@pytest.mark.slow
def test_learned_prior_example_quick():
    rows = quiet(load_script(ROOT / "examples" / "learned_prior.py").main, ["--quick"])
    assert list(rows) == ["standard", "mog", "vamp", "flow"]
    for name, row in rows.items():
        assert_learned(row["learned"], f"learned_prior.py {name} (ELBO)")
        assert_learned(row["learned_log_px"], f"learned_prior.py {name} (log p(x))")


# ----------------------------------------------------------------------------------------- the benchmarks
def _reference():
    return load_script(ROOT / "benchmarks" / "reference_two_layer.py")


def test_the_plain_two_layer_reference_is_the_same_model_as_the_hierarchical_vae():
    """benchmarks/reference_two_layer.py (no Pyro) and HierarchicalVAE: one seed gives the same weights, and one
    random state the same log weights, the same analytic-KL ELBO loss and the same IWAE loss."""
    ref_module = _reference()
    torch.manual_seed(0)
    ref = ref_module.TwoLayerVAE(64, (8, 4))
    torch.manual_seed(0)
    h = HierarchicalVAE((64,), (8, 4), activation="tanh")
    ours = dict(h.named_parameters())
    names = {"trunk1": "encoder.trunks.0", "head1": "encoder.heads.0", "trunk2": "encoder.trunks.1",
             "head2": "encoder.heads.1", "decoder_x": "decoder.0", "decoder_z1": "decoder.1"}
    for name, p in ref.named_parameters():
        block, rest = name.split(".", 1)
        assert torch.equal(p, ours[f"{names[block]}.{rest}"]), name
    x = torch.bernoulli(torch.rand(6, 64), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    log_px, rest, _, _ = ref.log_weights(x, 3)
    torch.manual_seed(2)
    assert torch.allclose(log_px + rest, draw_particles(h.model, h.guide, (x,), {}, num_particles=3).log_weights,
                          atol=1e-4)
    for k, objective in ((1, AnalyticKLELBO()), (3, IWAEELBO(num_particles=3))):
        torch.manual_seed(3)
        expected = float(ref_module.loss_fn(ref, x, k, "analytic"))
        torch.manual_seed(3)
        assert objective.loss(h.model, h.guide, x) == pytest.approx(expected, rel=1e-5), k


def test_the_plain_two_layer_reference_trains_resumes_bit_exactly_and_bounds_its_nll(tmp_path):
    ref = _reference()
    common = ["--quick", "--checkpoint", str(tmp_path / "c.pt")]
    ref.main(common + ["--epochs", "1", "--out", str(tmp_path / "a.json")])
    resumed = ref.main(common + ["--epochs", "2", "--out", str(tmp_path / "b.json")])
    direct = ref.main(["--quick", "--checkpoint", str(tmp_path / "d.pt"), "--epochs", "2",
                       "--out", str(tmp_path / "d.json")])
    assert resumed["epochs"] == direct["epochs"] == 2
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in direct["history"]]
    assert resumed["per_point_nll"] == direct["per_point_nll"]
    # the importance-sampled log p(x) is at least the ELBO on average: NLL <= -ELBO (up to the estimators' noise)
    assert direct["test_nll"] <= -direct["test_elbo"] + 3 * direct["test_nll_stderr"]
    assert len(direct["active_units_per_layer"]) == 2 and len(direct["kl_per_layer"]) == 2


def test_the_structured_mnist_benchmark_runs_through_the_command_line_and_reports_paired_rows(tmp_path):
    """benchmarks/structured_mnist.py --quick: every run trains by `pyro-vae train`, is evaluated, and the report
    has the paired rows; running again resumes (no retraining) and gives the same table."""
    bench = load_script(ROOT / "benchmarks" / "structured_mnist.py")
    table = bench.main(["--quick", "--out", str(tmp_path), "--runs", "vae2,vae2-td"])
    assert "two-layer VAE (k=1), top-down" in table and "z1:" in table and "z2:" in table
    saved = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in ("vae2", "vae2-td")}
    for r in saved.values():
        assert r["epochs"] == 1 and r["num_test"] == 50 and len(r["per_point_nll"]) == 50
        assert set(r["latent_sites"]) == {"z1", "z2"} and r["command"].startswith("pyro-vae train --hierarchy 8,4")
    assert bench.main(["--quick", "--out", str(tmp_path), "--report"]) == table
    # --full-test: the whole test set, a file of its own, and a column of the second table paired with the first row
    bench.main(["--quick", "--out", str(tmp_path), "--runs", "vae2,vae2-td", "--full-test"])
    full = {n: json.loads((tmp_path / f"{n}-full.json").read_text()) for n in ("vae2", "vae2-td")}
    num_test = len(load_dataset("digits").x_test)
    assert all(len(r["per_point_nll"]) == r["num_test"] == num_test for r in full.values())
    delta = sum(a - b for a, b in zip(full["vae2-td"]["per_point_nll"], full["vae2"]["per_point_nll"])) / num_test
    row = next(line for line in bench.main(["--quick", "--out", str(tmp_path), "--report"]).splitlines()
               if line.startswith("| two-layer VAE (k=1), top-down"))
    assert row.endswith(f"| {full['vae2-td']['test_nll']:.2f} ± {full['vae2-td']['test_nll_stderr']:.2f}, "
                        f"Δ {delta:+.2f} ± " + row.rsplit("± ", 1)[1])


@pytest.mark.slow
def test_the_structured_speed_benchmark_times_captured_fit_against_the_reference(tmp_path):
    rows = load_script(ROOT / "benchmarks" / "structured_mnist.py").main(["--quick", "--speed", "--reps", "1",
                                                                   "--out", str(tmp_path)])
    assert [r["k"] for r in rows] == [1, 5]
    assert all(r["captured_s"] > 0 and r["reference_s"] > 0 and r["compile_s"] is not None for r in rows)
