import math

import pytest
import torch
import torch.distributions as td
import torch.nn.functional as F
from torch import nn

import pyro
import pyro.poutine as poutine
from pyro.infer import SVI, Trace_ELBO

from pyro_vae import VAE, fit, load_dataset
from pyro_vae.likelihoods import make_likelihood


def test_model_and_guide_sites_and_shapes():
    vae = VAE(input_shape=(1, 28, 28), z_dim=20)
    x = torch.bernoulli(torch.rand(5, 1, 28, 28))
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    z = guide_tr.nodes["z"]
    assert z["fn"].batch_shape == (5,) and z["fn"].event_shape == (20,)
    assert z["value"].shape == (5, 20) and z["fn"].has_rsample
    mz, mx = model_tr.nodes["z"], model_tr.nodes["x"]
    assert mz["fn"].event_shape == (20,) and mz["fn"].batch_shape == (5,)
    assert torch.equal(mz["fn"].base_dist.loc, torch.zeros(5, 20))
    assert torch.equal(mz["fn"].base_dist.scale, torch.ones(5, 20))
    assert mx["is_observed"] and mx["fn"].event_shape == (1, 28, 28) and mx["fn"].batch_shape == (5,)
    for tr in (guide_tr, model_tr):
        plates = {f.name for site in ("z",) for f in tr.nodes[site]["cond_indep_stack"]}
        assert plates == {"data"}
    # pyro.module registered the decoder in the model and the encoder in the guide
    params = [n for n, s in model_tr.nodes.items() if s["type"] == "param"]
    assert params and all(n.startswith("decoder$$$") for n in params)
    assert all(n.startswith("encoder$$$") for n, s in guide_tr.nodes.items() if s["type"] == "param")


def test_flat_input_is_accepted_and_wrong_shape_is_an_error():
    vae = VAE(input_shape=(1, 8, 8), z_dim=2, hidden=(16,))
    x = torch.bernoulli(torch.rand(4, 64))
    Trace_ELBO().loss(vae.model, vae.guide, x)  # (N, 64) is reshaped
    with pytest.raises(ValueError, match=r"expected data of shape \(batch, 1, 8, 8\).*got \(4, 63\)"):
        vae.guide(torch.rand(4, 63))


def _hand_written_elbo(vae, x, z):
    """log p(z) + log p(x|z) - log q(z|x) per data point, in plain PyTorch, for the MLP/Bernoulli VAE."""
    h = vae.encoder.net(x.flatten(1))
    mu, raw = h.split(vae.z_dim, -1)
    sigma = F.softplus(raw) + 1e-5
    log_q = (-0.5 * ((z - mu) / sigma) ** 2 - sigma.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    log_pz = (-0.5 * z ** 2 - 0.5 * math.log(2 * math.pi)).sum(-1)
    logits = vae.decoder.net(z).reshape(x.shape)
    log_px = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(-1)
    return log_px + log_pz - log_q


def test_trace_elbo_equals_hand_written_pytorch_elbo_with_the_same_noise():
    vae = VAE(input_shape=(1, 8, 8), z_dim=3, hidden=(32, 16))
    x = torch.bernoulli(torch.rand(7, 1, 8, 8))
    pyro.set_rng_seed(123)
    z = poutine.trace(vae.guide).get_trace(x).nodes["z"]["value"]
    pyro.set_rng_seed(123)  # Trace_ELBO runs the guide first: the same draw of eps
    loss = Trace_ELBO().loss(vae.model, vae.guide, x)
    expected = -_hand_written_elbo(vae, x, z).sum()
    assert loss == pytest.approx(expected.item(), rel=1e-6, abs=1e-4)


@pytest.mark.parametrize(
    "name, kwargs, reference",
    [
        ("bernoulli", {}, lambda o: td.Bernoulli(logits=o[:, 0])),
        ("continuous-bernoulli", {}, lambda o: td.ContinuousBernoulli(logits=o[:, 0])),
        ("laplace", {}, lambda o: td.Laplace(o[:, 0], F.softplus(o[:, 1]) + 1e-3)),
        ("gaussian", {"sigma": "decoder"}, lambda o: td.Normal(o[:, 0], F.softplus(o[:, 1]) + 1e-3)),
        ("gaussian", {"sigma": 0.3}, lambda o: td.Normal(o[:, 0], 0.3)),
        ("gaussian", {"sigma": "learned"}, lambda o: td.Normal(o[:, 0], 1.0)),  # log sigma starts at 0
    ],
)
def test_likelihood_log_prob_matches_torch_distributions(name, kwargs, reference):
    shape = (2, 4, 4)
    lik = make_likelihood(name, shape, **kwargs)
    out = torch.randn(6, lik.num_params, *shape)
    x = torch.bernoulli(torch.rand(6, *shape)) if name == "bernoulli" else torch.rand(6, *shape)
    got = lik(out).log_prob(x)
    want = reference(out).log_prob(x).sum((1, 2, 3))
    assert got.shape == (6,)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(lik.mean(out), reference(out).mean)


def test_learned_gaussian_sigma_is_a_parameter_that_trains():
    vae = VAE(input_shape=(1, 8, 8), z_dim=2, likelihood="gaussian", sigma="learned", hidden=(16,))
    assert any(n == "likelihood.log_sigma" for n, _ in vae.named_parameters())
    x = torch.rand(64, 1, 8, 8) * 0.1
    fit(vae, x, objective=Trace_ELBO(), epochs=200, batch_size=64, lr=1e-2, progress=False)
    # the data's spread is ~0.03, so the maximum-likelihood sigma is far below the initial sigma = 1;
    # 200 Adam steps of size ~1e-2 can move log sigma by up to ~2
    assert vae.likelihood.log_sigma.item() < -1.0


def test_bad_likelihood_and_guide_names():
    with pytest.raises(ValueError, match="unknown likelihood 'poisson'"):
        VAE(input_shape=(1, 8, 8), likelihood="poisson")
    with pytest.raises(ValueError, match="unknown guide 'wishart'"):
        VAE(input_shape=(1, 8, 8), guide="wishart")
    with pytest.raises(ValueError, match="sigma must be"):
        VAE(input_shape=(1, 8, 8), likelihood="gaussian", sigma=-1)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8)])
def test_conv_networks_shapes_and_particles(shape):
    vae = VAE(input_shape=shape, z_dim=4, network="conv", hidden=(32,), likelihood="gaussian")
    x = torch.rand(3, *shape)
    assert vae.encode(x).batch_shape == (3,)
    assert vae.reconstruct(x).shape == (3, *shape)
    assert vae.sample(2).shape == (2, *shape)
    loss = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1).loss(vae.model, vae.guide, x)
    assert math.isfinite(loss)


def test_user_supplied_encoder_and_decoder():
    enc = nn.Sequential(nn.Flatten(), nn.Linear(64, 2 * 3))
    dec = nn.Sequential(nn.Linear(3, 64))  # 64 = 1 * 1 * 8 * 8 elements per row; the VAE reshapes
    vae = VAE(input_shape=(1, 8, 8), z_dim=3, encoder=enc, decoder=dec)
    x = torch.bernoulli(torch.rand(5, 1, 8, 8))
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}),
              Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1))
    losses = [svi.step(x) for _ in range(50)]
    assert losses[-1] < losses[0]


def test_svi_with_pyro_optim_as_in_the_readme():
    vae = VAE(input_shape=(1, 28, 28), z_dim=20, likelihood="bernoulli")
    x = torch.bernoulli(torch.rand(16, 1, 28, 28) * 0.3)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    losses = [svi.step(x) for _ in range(20)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_model_generates_without_data():
    vae = VAE(input_shape=(1, 8, 8), z_dim=2, hidden=(8,))
    x = vae.model(batch_size=6)
    assert x.shape == (6, 1, 8, 8) and set(x.unique().tolist()) <= {0.0, 1.0}
    pred = pyro.infer.Predictive(vae.model, num_samples=3)(batch_size=4)
    assert pred["x"].shape == (3, 4, 1, 8, 8)


def test_training_lowers_the_validation_loss_on_digits():
    d = load_dataset("digits")
    vae = VAE(input_shape=d.input_shape, z_dim=8, hidden=(128,))
    hist = fit(vae, d.x_train, d.x_val, objective=Trace_ELBO(), epochs=8, batch_size=64, progress=False,
               init_output_bias="default")
    first, last = hist[0]["val_elbo"], hist[-1]["val_elbo"]
    # the validation ELBO estimate has a standard error well below 1 nat on 144 points; the gain is several nats
    assert last > first + 3, (first, last)
    assert all(math.isfinite(m["train_loss"]) for m in hist)
