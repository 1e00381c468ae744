"""The particle core: a VAE's trace-free twin gives the same particles, values and gradients as Pyro's traces.

The traced producer is reached through the public API by passing model and guide as plain functions (not the
VAE's own bound methods): every objective then traces them. Same seed -> same noise -> equal results.
"""
import pytest
import torch

import pyro
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_vae import VAE, ConditionalVAE
from pyro_vae.objectives import AnalyticKLELBO, IWAEELBO, MonteCarloELBO, RenyiBound
from pyro_vae.particles import draw_particles, particle_twin

FAMILIES = {"diagonal": {}, "cholesky": {}, "lowrank": {"rank": 2}, "iaf": {"flow_steps": 2}, "laplace": {},
            "studentt": {"learn_df": True}}

OBJECTIVES = {
    "elbo_k1": lambda: MonteCarloELBO(),
    "elbo_k3_beta": lambda: MonteCarloELBO(num_particles=3, beta=0.7),
    "analytic_k1": lambda: AnalyticKLELBO(),
    "analytic_k3_beta": lambda: AnalyticKLELBO(num_particles=3, beta=0.5),
    **{f"iwae_k{k}_{e}": (lambda k=k, e=e: IWAEELBO(num_particles=k, estimator=e))
       for k in (1, 5) for e in ("iwae", "dreg", "stl")},
    **{f"renyi_{e}": (lambda e=e: RenyiBound(alpha=0.5, num_particles=4, estimator=e)) for e in ("iwae", "dreg", "stl")},
}


def traced(vae):
    """(model, guide) as plain functions: the objectives trace them."""
    return (lambda *a, **k: vae.model(*a, **k)), (lambda *a, **k: vae.guide(*a, **k))


def loss_and_grads(vae, objective, model, guide, args, seed=11):
    pyro.set_rng_seed(seed)
    loss = objective.differentiable_loss(model, guide, *args)
    params = [p for p in vae.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def assert_same(vae, a, b):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-4)
    for (name, _), u, v in zip([(n, p) for n, p in vae.named_parameters() if p.requires_grad], ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5, msg=name)


def make_vae(family, conditional=False):
    torch.manual_seed(0)
    likelihood = "gaussian" if family == "lowrank" else "bernoulli"
    if conditional:
        vae = ConditionalVAE((1, 4, 4), num_classes=3, z_dim=3, hidden=(10,), prior="learned", guide=family,
                             guide_kwargs=FAMILIES[family])
        args = (torch.bernoulli(torch.rand(5, 1, 4, 4)), torch.tensor([0, 1, 2, 1, 0]))
    else:
        vae = VAE(input_shape=(1, 4, 4), z_dim=3, hidden=(10,), guide=family, likelihood=likelihood,
                  guide_kwargs=FAMILIES[family])
        x = torch.rand(6, 1, 4, 4)
        args = (torch.bernoulli(x) if likelihood == "bernoulli" else x,)
    return vae, args


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_twin_equals_traces_for_every_family_objective_and_estimator(family, objective):
    vae, args = make_vae(family)
    assert particle_twin(vae.model, vae.guide) is not None
    with pytest.warns(RuntimeWarning) if family in ("iaf", "studentt") and "analytic" in objective else _nothing():
        twin = loss_and_grads(vae, OBJECTIVES[objective](), vae.model, vae.guide, args)
    traces = loss_and_grads(vae, OBJECTIVES[objective](), *traced(vae), args)
    assert_same(vae, twin, traces)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_twin_equals_traces_for_the_conditional_vae(objective):
    for family in ("diagonal", "iaf"):
        vae, args = make_vae(family, conditional=True)
        with pytest.warns(RuntimeWarning) if family == "iaf" and "analytic" in objective else _nothing():
            twin = loss_and_grads(vae, OBJECTIVES[objective](), vae.model, vae.guide, args)
        assert_same(vae, twin, loss_and_grads(vae, OBJECTIVES[objective](), *traced(vae), args))


@pytest.mark.parametrize("pyro_objective, ours", [(Trace_ELBO(), MonteCarloELBO()),
                                                   (Trace_ELBO(num_particles=3, vectorize_particles=True,
                                                               max_plate_nesting=1), MonteCarloELBO(num_particles=3)),
                                                   (TraceMeanField_ELBO(), AnalyticKLELBO())])
@pytest.mark.parametrize("family", ["diagonal", "cholesky"])
def test_twin_equals_pyros_own_objectives(family, pyro_objective, ours):
    vae, args = make_vae(family)
    assert_same(vae, loss_and_grads(vae, ours, vae.model, vae.guide, args),
                loss_and_grads(vae, pyro_objective, vae.model, vae.guide, args))


def test_particles_hold_every_term_in_k_by_n():
    vae, (x,) = make_vae("cholesky")
    for model, guide in [(vae.model, vae.guide), traced(vae)]:
        pyro.set_rng_seed(0)
        p = draw_particles(model, guide, (x,), {}, num_particles=4, stop_q=True, kl=True)
        for term in (p.log_px_given_z, p.log_pz, p.log_qz, p.log_qz_stop, p.kl):
            assert term.shape == (4, 6)
        torch.testing.assert_close(p.log_qz_stop, p.log_qz)
        assert p.kl_monte_carlo == () and p.scale == 1.0
        closed = torch.distributions.kl_divergence(vae.encode(x), vae.prior())
        torch.testing.assert_close(p.kl, closed.expand(4, 6))


def test_subclasses_that_change_the_model_are_traced():
    class MyVAE(VAE):
        def model(self, x, c=None, **kwargs):
            return super().model(x, c, **kwargs)

    assert particle_twin(MyVAE(input_shape=(1, 4, 4), z_dim=2).model, MyVAE(input_shape=(1, 4, 4), z_dim=2).guide) is None
    mine = MyVAE(input_shape=(1, 4, 4), z_dim=2)
    assert particle_twin(mine.model, mine.guide) is None
    plain = VAE(input_shape=(1, 4, 4), z_dim=2)
    assert particle_twin(plain.model, plain.guide) is not None
    assert particle_twin(plain.model, mine.guide) is None


def test_float64_vaes_work_on_both_producers():
    for vae in (VAE(input_shape=(1, 4, 4), z_dim=2, hidden=(8,)).double(),
                ConditionalVAE((1, 4, 4), num_classes=3, z_dim=2, hidden=(8,), prior="learned").double()):
        args = (torch.bernoulli(torch.rand(5, 1, 4, 4)),) + ((torch.tensor([0, 1, 2, 1, 0]),)
                                                               if isinstance(vae, ConditionalVAE) else ())
        twin = loss_and_grads(vae, IWAEELBO(num_particles=3, estimator="dreg"), vae.model, vae.guide, args)
        assert twin[0].dtype == torch.float64
        assert_same(vae, twin, loss_and_grads(vae, IWAEELBO(num_particles=3, estimator="dreg"), *traced(vae), args))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("family", ["diagonal", "cholesky", "iaf"])
def test_a_formula_that_reads_no_log_weights_lets_the_twin_skip_them(family):
    vae, (x,) = make_vae(family)
    assert AnalyticKLELBO.needs_log_weights is False and MonteCarloELBO.needs_log_weights is True
    draws = {}
    for log_weights in (True, False):
        pyro.set_rng_seed(3)
        draws[log_weights] = draw_particles(vae.model, vae.guide, (x,), {}, num_particles=2, kl=True,
                                            log_weights=log_weights)
    full, lean = draws[True], draws[False]
    torch.testing.assert_close(lean.log_px_given_z, full.log_px_given_z)  # the same noise
    torch.testing.assert_close(lean.kl, full.kl)
    if family == "iaf":  # no closed-form KL: its Monte Carlo estimate needs log q and log p, so they are kept
        torch.testing.assert_close(lean.log_qz, full.log_qz)
        torch.testing.assert_close(lean.kl, lean.log_qz - lean.log_pz)
    else:
        assert lean.log_pz is None and lean.log_qz is None and lean.num_particles == 2
        with pytest.raises(ValueError, match="log_weights=False"):
            lean.log_weights
    pyro.set_rng_seed(3)  # traces always carry every term
    traced_lean = draw_particles(*traced(vae), (x,), {}, num_particles=2, kl=True, log_weights=False)
    torch.testing.assert_close(traced_lean.log_weights, full.log_weights)


@pytest.mark.parametrize("family", ["diagonal", "cholesky", "lowrank", "iaf"])
def test_the_stop_gradient_copy_of_q_carries_no_parameter_gradient(family):
    """log q_sg(z) = log q(z) in value, and with z held fixed it reaches no parameter (encoder, flow): the guide
    may get gradient only through z. The IAF's stable flow binds its inverse to itself in __init__; a copy that
    kept that binding ran the original, undetached network (and biased DReG and STL)."""
    from pyro_vae.particles import detach_distribution

    vae, args = make_vae(family)
    q = vae.encode(*args)
    z = q.rsample().detach()
    log_q_stop = detach_distribution(q).log_prob(z)
    torch.testing.assert_close(log_q_stop, q.log_prob(z), rtol=1e-5, atol=1e-5)
    assert not log_q_stop.requires_grad
