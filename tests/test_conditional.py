import pytest
import torch
from sklearn.linear_model import LogisticRegression

import pyro.poutine as poutine
from pyro.infer import Trace_ELBO

from pyro_vae import VAE, fit, load_dataset
from pyro_vae.conditional import ConditionalVAE


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    vae = ConditionalVAE(digits.input_shape, num_classes=10, z_dim=4, hidden=(256,))
    fit(vae, (digits.x_train, digits.y_train), (digits.x_val, digits.y_val), objective=Trace_ELBO(),
        epochs=60, batch_size=64, lr=3e-3, progress=False, seed=0)
    return vae


def test_conditional_generation_obeys_the_label(digits, trained):
    """Samples for label k, classified by a logistic regression fit on the data, are class k >= 80% of the time."""
    clf = LogisticRegression(max_iter=2000).fit(digits.x_train.flatten(1).numpy(), digits.y_train.numpy())
    assert clf.score(digits.x_test.flatten(1).numpy(), digits.y_test.numpy()) > 0.9  # the judge itself is good
    torch.manual_seed(1)
    for k in range(10):
        x = trained.sample(100, label=k)
        agree = (clf.predict(x.flatten(1).numpy()) == k).mean()
        assert agree >= 0.8, (k, agree)


def test_sites_and_learned_prior(digits):
    vae = ConditionalVAE(digits.input_shape, num_classes=10, z_dim=3, hidden=(16,), prior="learned")
    x, c = torch.bernoulli(digits.x_train[:6]), digits.y_train[:6]
    tr = poutine.trace(poutine.replay(vae.model, trace=poutine.trace(vae.guide).get_trace(x, c))).get_trace(x, c)
    prior = tr.nodes["z"]["fn"]
    assert prior.event_shape == (3,) and prior.batch_shape == (6,)
    # the learned prior depends on c: two labels give two different priors
    p0, p1 = vae.prior(vae.condition(torch.tensor([0]))), vae.prior(vae.condition(torch.tensor([1])))
    assert not torch.allclose(p0.base_dist.loc, p1.base_dist.loc)
    assert {n for n in tr.nodes if tr.nodes[n]["type"] == "param"} >= {"prior_net$$$net.0.weight"}


def test_image_completion_likelihood_covers_only_the_missing_pixels(digits):
    vae = ConditionalVAE(digits.input_shape, condition_shape=digits.input_shape, z_dim=2, hidden=(16,),
                         prior="learned", missing_value=-1.0)
    x = torch.bernoulli(digits.x_train[:4])
    c = x.clone()
    c[..., 4:, :] = -1.0  # the bottom half is missing
    tr = poutine.trace(poutine.replay(vae.model, trace=poutine.trace(vae.guide).get_trace(x, c))).get_trace(x, c)
    site = tr.nodes["x"]
    full = vae.decode(tr.nodes["z"]["value"], c).base_dist
    want = full.log_prob(x)[..., 4:, :].sum((-3, -2, -1))
    torch.testing.assert_close(site["fn"].log_prob(x), want)


def test_bad_conditions(digits):
    vae = ConditionalVAE(digits.input_shape, num_classes=10, z_dim=2, hidden=(8,))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        vae.condition(torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="exactly one of"):
        ConditionalVAE(digits.input_shape, z_dim=2)
    with pytest.raises(ValueError, match="give the condition c"):
        vae.sample(3)
    with pytest.raises(ValueError, match="not conditional"):
        VAE(digits.input_shape, z_dim=2).sample(3, label=1)


def test_a_plain_vae_ignores_the_condition(digits):
    """One interface: every method takes (x, c=None) and a plain VAE ignores c."""
    vae = VAE(digits.input_shape, z_dim=2, hidden=(8,))
    x, y = torch.bernoulli(digits.x_test[:5]), digits.y_test[:5]
    torch.testing.assert_close(vae.posterior_mean(x, y), vae.posterior_mean(x))
    torch.testing.assert_close(vae.reconstruct(x, y), vae.reconstruct(x))
    assert vae.sample(4, c=y[:4]).shape == (4, *digits.input_shape)
