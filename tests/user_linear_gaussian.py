r"""The linear-Gaussian model of tests/linear_gaussian.py written as a user's own module file (self-contained: a
run stores this one file), for the closed-form tests of the inference-gap analysis on a model pyro-vae did not
write:

    z ~ N(0, I_d),   x | z ~ N(W z + b, sigma^2 I_D);   posterior p(z|x) = N(m(x), S),
    S = (I + W^T W / sigma^2)^-1,  m(x) = S W^T (x - b) / sigma^2.

The guide is a linear encoder to a diagonal Gaussian, N(m(x) + shift s, diag (widen s)^2), s = sqrt(diag S):
the exact posterior's marginals, shifted and widened (a suboptimal amortized q).
"""
import torch
from torch import nn

import pyro
import pyro.distributions as dist

W = [[1.0, 0.9], [0.8, 1.0], [1.0, 1.1], [0.5, 0.6]]
B = [0.1, -0.2, 0.3, 0.0]


class LinearGaussianVAE(nn.Module):
    def __init__(self, W=W, b=B, sigma=0.7, shift=0.3, widen=1.5, input_shape=None):
        super().__init__()
        self.W = nn.Parameter(torch.tensor(W, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(b, dtype=torch.float64))
        self.sigma = float(sigma)
        D, d = self.W.shape
        with torch.no_grad():
            S = torch.linalg.inv(torch.eye(d, dtype=torch.float64) + self.W.T @ self.W / self.sigma ** 2)
            A = S @ self.W.T / self.sigma ** 2
            sd = S.diagonal().sqrt()
        self.encoder = nn.Linear(D, 2 * d).double()
        with torch.no_grad():
            self.encoder.weight.zero_()
            self.encoder.weight[:d] = A
            self.encoder.bias[:d] = -(A @ self.b) + shift * sd
            self.encoder.bias[d:] = (widen * sd).log()

    def model(self, x=None, batch_size=None):
        pyro.module("linear_gaussian", self)
        n = x.shape[0] if x is not None else batch_size
        d = self.W.shape[1]
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(self.W.new_zeros(d), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.sigma).to_event(1),
                        obs=None if x is None else x.reshape(n, -1))

    def guide(self, x):
        pyro.module("linear_gaussian", self)
        loc, log_scale = self.encoder(x.reshape(x.shape[0], -1)).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))
