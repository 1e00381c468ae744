"""The VAE's trace-free twin is the same program as its traced model/guide under Pyro's handlers.

Under SVI (whose ``poutine.trace(param_only=True)`` collects what to update), ``poutine.scale`` or
``poutine.condition``, every objective must behave as Pyro's own Trace_ELBO would on the traced programs: the
parameters reach the param store with Trace_ELBO's names and SVI updates them, the loss scales, a conditioned
latent is used. Each test here failed while the twin ignored the handler stack.
"""
import math

import pytest
import torch

import pyro
import pyro.poutine as poutine
from pyro.infer import SVI, Trace_ELBO

from pyro_vae import VAE, ConditionalVAE
from pyro_vae.data import load_dataset
from pyro_vae.evaluation import elbo as per_point_elbo
from pyro_vae.objectives import (AnalyticKLELBO, FisherELBO, IWAEELBO, MonteCarloELBO, RenyiBound,
                                 make_objective)
from pyro_vae.particles import handlers_active, particle_twin

OBJECTIVES = {
    "analytic": lambda: AnalyticKLELBO(),
    "elbo": lambda: make_objective("elbo"),
    "montecarlo": lambda: MonteCarloELBO(),
    "iwae": lambda: IWAEELBO(num_particles=3),
    "dreg": lambda: IWAEELBO(num_particles=3, estimator="dreg"),
    "stl": lambda: IWAEELBO(num_particles=3, estimator="stl"),
    "renyi": lambda: RenyiBound(alpha=0.5, num_particles=3),
    "fisher": lambda: FisherELBO(),
}
GUIDES = ("diagonal", "cholesky", "iaf")
#: the combinations the default run trains (each objective once, every guide and both models covered); the
#: full matrix runs with ``-m slow``
QUICK = {("analytic", "diagonal", False), ("elbo", "cholesky", True), ("montecarlo", "iaf", False),
         ("iwae", "diagonal", True), ("dreg", "cholesky", False), ("stl", "diagonal", True),
         ("renyi", "iaf", True), ("fisher", "diagonal", False)}


def svi_matrix():
    """(objective, guide, conditional) for every objective x guide x model, the non-QUICK ones marked slow."""
    return [pytest.param(o, g, c, id=f"{o}-{g}-{'cvae' if c else 'vae'}",
                         marks=() if (o, g, c) in QUICK else pytest.mark.slow)
            for o in OBJECTIVES for g in GUIDES for c in (False, True)]


def digits(n: int, seed: int = 0):
    """n binarized 8x8 digits with their labels (the bundled set: structure a VAE can learn quickly)."""
    data = load_dataset("digits")
    x = torch.bernoulli(data.x_train[:n], generator=torch.Generator().manual_seed(seed))
    return x, data.y_train[:n]


def make_vae(guide: str, conditional: bool):
    if conditional:
        return ConditionalVAE(input_shape=(1, 8, 8), num_classes=10, z_dim=2, hidden=(32,), guide=guide)
    return VAE(input_shape=(1, 8, 8), z_dim=2, hidden=(32,), guide=guide)


def registered_names(vae, args) -> set:
    """The parameter names Pyro's Trace_ELBO registers for this model/guide (on a scratch param store)."""
    saved = pyro.get_param_store().get_state()
    pyro.clear_param_store()
    Trace_ELBO().loss(vae.model, vae.guide, *args)
    names = set(pyro.get_param_store().keys())
    pyro.get_param_store().set_state(saved)
    return names


@pytest.mark.parametrize("objective, guide, conditional", svi_matrix())
def test_svi_with_every_objective_trains_the_vae(objective, guide, conditional):
    """SVI(vae.model, vae.guide, Adam, objective): the param store holds Trace_ELBO's names, every parameter
    moves, and the held-out ELBO improves by more than 4 standard errors of the paired per-point difference."""
    x, y = digits(384)
    train, held_out = ((x[:256], y[:256]), (x[256:], y[256:])) if conditional else ((x[:256],), (x[256:],))
    vae = make_vae(guide, conditional)
    before = {n: p.detach().clone() for n, p in vae.named_parameters()}
    torch.manual_seed(1)
    elbo_before = per_point_elbo(vae.model, vae.guide, held_out, num_particles=8)

    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), OBJECTIVES[objective]())
    for step in range(30):
        idx = torch.arange(64) + 64 * (step % 4)
        svi.step(*(t[idx] for t in train))

    assert set(pyro.get_param_store().keys()) == registered_names(vae, train)
    unchanged = [n for n, p in vae.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"SVI left these parameters untouched: {unchanged}"
    torch.manual_seed(1)
    gain = per_point_elbo(vae.model, vae.guide, held_out, num_particles=8) - elbo_before
    stderr = gain.std() / math.sqrt(len(gain))
    assert gain.mean() > 4 * stderr, f"held-out ELBO gain {gain.mean():.2f} +- {stderr:.2f} nats"


def _loss_at(objective, vae, args, seed: int, scale: float | None = None) -> float:
    torch.manual_seed(seed)
    if scale is None:
        return objective.loss(vae.model, vae.guide, *args)
    with poutine.scale(scale=scale):
        return objective.loss(vae.model, vae.guide, *args)


@pytest.mark.parametrize("conditional", [False, True], ids=["vae", "cvae"])
@pytest.mark.parametrize("guide", GUIDES)
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_poutine_scale_halves_the_loss(objective, guide, conditional):
    """``with poutine.scale(scale=0.5)`` halves the loss for the same draw, on the twin's pair (which then
    traces) and on the traced pair, and both equal Pyro's traced value."""
    x, y = digits(16)
    args = (x, y) if conditional else (x,)
    vae, obj = make_vae(guide, conditional), OBJECTIVES[objective]()
    full = _loss_at(obj, vae, args, seed=3)
    half = _loss_at(obj, vae, args, seed=3, scale=0.5)
    assert half == pytest.approx(0.5 * full, rel=1e-5)
    # the same through differentiable_loss (what torch-style training loops call)
    torch.manual_seed(3)
    with poutine.scale(scale=0.5):
        loss = obj.differentiable_loss(vae.model, vae.guide, *args)
    assert float(loss) == pytest.approx(half, rel=1e-5)


@pytest.mark.parametrize("conditional", [False, True], ids=["vae", "cvae"])
@pytest.mark.parametrize("guide", GUIDES)
@pytest.mark.parametrize("objective", [o for o in OBJECTIVES if o != "fisher"])  # (Fisher: traced only, always)
def test_poutine_condition_on_z_behaves_as_in_pyros_trace_elbo(objective, guide, conditional):
    """``with poutine.condition(data={"z": z0}):`` around the objective conditions model *and* guide; Pyro's
    Trace_ELBO then refuses to replay the guide's observed z, and every objective refuses the same way (the
    twin used to ignore the handler and return a loss of fresh, unconditioned draws)."""
    x, y = digits(8)
    args = (x, y) if conditional else (x,)
    vae, obj = make_vae(guide, conditional), OBJECTIVES[objective]()
    with poutine.condition(data={"z": torch.randn(8, 2)}):
        with pytest.raises(RuntimeError, match="site z must be sampled in trace"):
            Trace_ELBO().loss(vae.model, vae.guide, *args)
        with pytest.raises(RuntimeError, match="site z must be sampled in trace"):
            obj.loss(vae.model, vae.guide, *args)


@pytest.mark.parametrize("conditional", [False, True], ids=["vae", "cvae"])
@pytest.mark.parametrize("guide", GUIDES)
@pytest.mark.parametrize("objective", ["analytic", "montecarlo", "iwae", "dreg", "renyi"])
def test_poutine_condition_on_the_model_gives_the_traced_value(objective, guide, conditional):
    """The model conditioned on z = z0 (a guide-free evaluation of log p(x, z0)): with an empty guide every
    bound is the deterministic sum_n [log p(x_n | z0_n) + log p(z0_n)], computed here from the distributions;
    the conditioned model is no longer the VAE's own program, so nothing may stand in for it."""
    x, y = digits(8)
    args = (x, y) if conditional else (x,)
    vae, obj = make_vae(guide, conditional), OBJECTIVES[objective]()
    z0 = torch.randn(8, 2)
    cond = vae.condition(y) if conditional else None
    with torch.no_grad():
        expected = (vae.decode(z0, *args[1:]).log_prob(vae._data(x)) + vae.prior(cond).log_prob(z0)).sum()

    def empty_guide(*args):
        with pyro.plate("data", 8):
            pass

    conditioned = poutine.condition(vae.model, data={"z": z0})
    losses = [obj.loss(conditioned, empty_guide, *args) for _ in range(2)]
    assert losses[0] == losses[1] == pytest.approx(-float(expected), rel=1e-5)


def test_poutine_block_hides_the_sites_and_the_twin_steps_aside():
    """Inside a handler the dispatcher offers no twin; ``poutine.block`` around the objective hides every site
    from an outer trace, exactly as for Pyro's Trace_ELBO."""
    vae = make_vae("diagonal", False)
    assert particle_twin(vae.model, vae.guide) is not None and not handlers_active()
    x, _ = digits(8)
    with poutine.trace() as tr:
        with poutine.block():
            assert handlers_active() and particle_twin(vae.model, vae.guide) is None
            AnalyticKLELBO().loss(vae.model, vae.guide, x)
    assert not tr.trace.nodes


def test_a_user_trace_sees_the_sites_of_every_objective():
    """A user's poutine.trace around the objective records the model's and guide's sites and parameters."""
    vae = make_vae("cholesky", False)
    x, _ = digits(8)
    for obj in (AnalyticKLELBO(), IWAEELBO(num_particles=2, estimator="dreg")):
        with poutine.trace(param_only=True) as tr:
            obj.differentiable_loss(vae.model, vae.guide, x)
        assert {n for n in tr.trace.nodes} == registered_names(vae, (x,))


def test_the_twin_registers_the_parameters_trace_elbo_registers():
    """With no handler active the twin runs, and its one observable effect matches pyro.module's: the param
    store holds the same names as after Trace_ELBO, and again after the store is cleared."""
    vae = make_vae("iaf", False)
    x, _ = digits(8)
    for _ in range(2):
        pyro.clear_param_store()
        AnalyticKLELBO().loss(vae.model, vae.guide, x)
        assert set(pyro.get_param_store().keys()) == registered_names(vae, (x,))


def test_a_bound_trainer_loss_traces_under_a_handler():
    """``objective.bind`` chooses the twin once, but a call made inside a handler traces: scale applies."""
    vae = make_vae("diagonal", False)
    x, _ = digits(16)
    loss = IWAEELBO(num_particles=3).bind(vae.model, vae.guide)
    torch.manual_seed(5)
    full = float(loss(x))
    torch.manual_seed(5)
    with poutine.scale(scale=0.25):
        quarter = float(loss(x))
    assert quarter == pytest.approx(0.25 * full, rel=1e-5)
