"""A hand-written Pyro VAE in the style of Pyro's examples/vae/vae.py, for tests of objectives and estimators
that must work on any model/guide pair, not only on pyro_vae.VAE."""
import torch.nn as nn

import pyro
import pyro.distributions as dist


class TinyVAE(nn.Module):
    """Bernoulli decoder on 8x8 inputs, z_dim 2, diagonal-Gaussian encoder."""

    def __init__(self, x_dim=64, z_dim=2, hidden=16, linear_encoder=False):
        super().__init__()
        self.z_dim = z_dim
        self.encoder = (nn.Linear(x_dim, 2 * z_dim) if linear_encoder else
                        nn.Sequential(nn.Linear(x_dim, hidden), nn.Tanh(), nn.Linear(hidden, 2 * z_dim)))
        self.decoder = nn.Sequential(nn.Linear(z_dim, hidden), nn.Tanh(), nn.Linear(hidden, x_dim))

    def model(self, x):
        pyro.module("decoder", self.decoder)
        x = x.reshape(x.shape[0], -1)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        loc, s = self.encoder(x.reshape(x.shape[0], -1)).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(s) + 1e-3).to_event(1))
