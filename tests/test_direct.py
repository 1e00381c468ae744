"""The trainer's trace-free path computes the same loss and gradients as Pyro's traced objectives."""
import pytest
import torch

import pyro
from pyro.infer import Trace_ELBO

from pyro_vae import VAE
from pyro_vae.conditional import ConditionalVAE
from pyro_vae.objectives import AnalyticKLELBO, IWAEELBO
from pyro_vae.training import _ObjectiveLoss

OBJECTIVES = {
    "trace_elbo_k1": lambda: Trace_ELBO(),
    "trace_elbo_k4": lambda: Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1),
    "analytic_k1": lambda: AnalyticKLELBO(),
    "analytic_k3_beta": lambda: AnalyticKLELBO(num_particles=3, beta=0.5),
    "iwae_k1": lambda: IWAEELBO(num_particles=1),
    "iwae_k5": lambda: IWAEELBO(num_particles=5),
    "dreg_k5": lambda: IWAEELBO(num_particles=5, estimator="dreg"),
    "stl_k5": lambda: IWAEELBO(num_particles=5, estimator="stl"),
    "dreg_k1": lambda: IWAEELBO(num_particles=1, estimator="dreg"),
}


def _compare(vae, objective, *args):
    params = [p for p in vae.parameters() if p.requires_grad]
    direct = _ObjectiveLoss(vae, objective)
    assert direct.direct is not None
    pyro.set_rng_seed(11)
    a = direct(*args)
    ga = torch.autograd.grad(a, params, allow_unused=True)
    pyro.set_rng_seed(11)
    b = objective.differentiable_loss(vae.model, vae.guide, *args)
    gb = torch.autograd.grad(b, params, allow_unused=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    for (name, _), u, v in zip(vae.named_parameters(), ga, gb):
        u = torch.zeros_like(_) if u is None else u
        v = torch.zeros_like(_) if v is None else v
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("name", list(OBJECTIVES))
@pytest.mark.parametrize("guide, likelihood", [("diagonal", "bernoulli"), ("cholesky", "bernoulli"),
                                               ("lowrank", "gaussian"), ("laplace", "continuous-bernoulli")])
def test_direct_equals_traced(name, guide, likelihood):
    torch.manual_seed(0)
    vae = VAE(input_shape=(1, 4, 4), z_dim=3, hidden=(12,), guide=guide, likelihood=likelihood)
    x = torch.rand(6, 1, 4, 4)
    if likelihood == "bernoulli":
        x = torch.bernoulli(x)
    _compare(vae, OBJECTIVES[name](), x)


@pytest.mark.parametrize("name", ["trace_elbo_k4", "analytic_k1", "iwae_k5", "dreg_k5"])
def test_direct_equals_traced_for_a_conditional_vae_with_learned_prior(name):
    torch.manual_seed(0)
    vae = ConditionalVAE((1, 4, 4), num_classes=3, z_dim=2, hidden=(8,), prior="learned")
    _compare(vae, OBJECTIVES[name](), torch.bernoulli(torch.rand(5, 1, 4, 4)), torch.tensor([0, 1, 2, 1, 0]))


def test_user_models_and_flows_take_the_traced_path():
    class MyVAE(VAE):
        def model(self, x):
            return super().model(x)

    assert _ObjectiveLoss(MyVAE(input_shape=(1, 4, 4), z_dim=2), Trace_ELBO()).direct is None
    iaf = VAE(input_shape=(1, 4, 4), z_dim=2, guide="iaf")
    assert _ObjectiveLoss(iaf, IWAEELBO(num_particles=3, estimator="dreg")).direct is None
    assert _ObjectiveLoss(iaf, IWAEELBO(num_particles=3)).direct is not None
    assert _ObjectiveLoss(VAE(input_shape=(1, 4, 4), z_dim=2), Trace_ELBO(num_particles=3)).direct is None


@pytest.mark.parametrize("conditional", [False, True])
def test_log_likelihood_takes_the_direct_path_with_the_same_result(conditional):
    from pyro_vae.evaluation import log_likelihood

    torch.manual_seed(0)
    if conditional:
        vae = ConditionalVAE((1, 4, 4), condition_shape=(1, 4, 4), z_dim=2, hidden=(8,), prior="learned",
                             missing_value=-1.0)
        x = torch.bernoulli(torch.rand(7, 1, 4, 4))
        c = x.clone()
        c[..., 2:, :] = -1
        data = (x, c)
        model, guide = (lambda x, c: vae.model(x, c)), (lambda x, c: vae.guide(x, c))
    else:
        vae = VAE(input_shape=(1, 4, 4), z_dim=2, hidden=(8,))
        data = torch.bernoulli(torch.rand(7, 1, 4, 4))
        model, guide = (lambda x: vae.model(x)), (lambda x: vae.guide(x))
    pyro.set_rng_seed(3)
    direct = log_likelihood(vae.model, vae.guide, data, num_samples=50, chunk_size=20, progress=False)
    pyro.set_rng_seed(3)
    traced = log_likelihood(model, guide, data, num_samples=50, chunk_size=20, progress=False)
    torch.testing.assert_close(direct, traced, rtol=1e-5, atol=1e-4)
