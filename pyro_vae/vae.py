"""The VAE as two Pyro programs over one latent site ``"z"``.

* **model** p(z) p_theta(x|z): z ~ N(0, I) (``.to_event(1)``), the decoder turns z into the parameters of
  the likelihood, and ``"x"`` is observed under it.
* **guide** q_phi(z|x): the encoder turns x into the parameters of a posterior family and ``"z"`` is sampled
  from it with the reparameterization z = mu + sigma * eps (Kingma & Welling, 2014).

Training maximizes ELBO = E_q[log p(x|z)] - KL(q(z|x) || p(z)) with any Pyro objective, e.g.
``pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO())``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

import pyro
import pyro.distributions as dist

from .guides import make_posterior
from .likelihoods import make_likelihood
from .networks import make_networks

__all__ = ["VAE", "as_batch"]


def as_batch(x, input_shape) -> torch.Tensor:
    """Return ``x`` as a float tensor of shape (N, *input_shape); flat (N, prod(input_shape)) is reshaped.

    Raises ValueError naming the expected and the received shape otherwise.
    """
    x = torch.as_tensor(x)
    if not torch.is_floating_point(x):
        x = x.float()
    shape = tuple(input_shape)
    if x.dim() >= 1 and tuple(x.shape[1:]) == shape:
        return x
    if x.dim() == 2 and x.shape[1] == math.prod(shape):
        return x.reshape(-1, *shape)
    raise ValueError(
        f"expected data of shape (batch, {', '.join(map(str, shape))}) or (batch, {math.prod(shape)}), "
        f"got {tuple(x.shape)}"
    )


class VAE(nn.Module):
    """A variational autoencoder: decoder = Pyro model, encoder = Pyro guide.

    Args:
        input_shape: shape of one data point, e.g. ``(1, 28, 28)``.
        z_dim: latent dimension d; the prior is p(z) = N(0, I_d).
        likelihood: ``"bernoulli"``, ``"gaussian"``, ``"continuous-bernoulli"``, ``"laplace"`` or a
            :class:`~pyro_vae.likelihoods.Likelihood`.
        guide: posterior family name (``"diagonal"``, ...) or a
            :class:`~pyro_vae.guides.PosteriorFamily`.
        hidden: hidden layer sizes of the encoder (the decoder mirrors them).
        activation: ``"relu"``, ``"tanh"``, ...
        network: ``"mlp"`` or ``"conv"``.
        encoder: your own ``nn.Module`` mapping (B, *input_shape) to (B, posterior.num_params).
        decoder: your own ``nn.Module`` mapping (B, z_dim) to (B, likelihood.num_params, *input_shape)
            (or anything with that many elements per row).
        sigma: for the Gaussian likelihood: ``"decoder"``, ``"learned"`` or a fixed float.
        guide_kwargs: passed to the posterior family (e.g. ``rank=``, ``flow_steps=``).
    """

    #: whether model/guide take a condition c besides x (see :class:`~pyro_vae.conditional.ConditionalVAE`)
    conditional = False

    def __init__(self, input_shape=(1, 28, 28), z_dim: int = 20, likelihood="bernoulli", guide="diagonal",
                 hidden=(400,), activation="relu", network="mlp", encoder: nn.Module | None = None,
                 decoder: nn.Module | None = None, sigma=None, guide_kwargs: dict | None = None):
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        if not self.input_shape or min(self.input_shape) < 1:
            raise ValueError(f"input_shape must be a non-empty tuple of positive sizes, got {input_shape!r}")
        self.z_dim = int(z_dim)
        self.likelihood = make_likelihood(likelihood, self.input_shape, sigma=sigma)
        self.posterior = make_posterior(guide, self.z_dim, **(guide_kwargs or {}))
        enc, dec = (None, None)
        if encoder is None or decoder is None:
            enc, dec = make_networks(network, self.input_shape, self.z_dim, self.posterior.num_params,
                                     self.likelihood.num_params, tuple(hidden), activation)
        self.encoder = encoder if encoder is not None else enc
        self.decoder = decoder if decoder is not None else dec
        self.register_buffer("prior_loc", torch.zeros(self.z_dim), persistent=False)
        self.register_buffer("prior_scale", torch.ones(self.z_dim), persistent=False)

    # ----------------------------------------------------------------- networks with any leading dims
    def _encode_params(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features for x of shape (..., *input_shape) -> (..., posterior.num_params)."""
        lead = x.shape[: x.dim() - len(self.input_shape)]
        out = self.encoder(x.reshape(-1, *self.input_shape))
        return out.reshape(*lead, self.posterior.num_params)

    def _decode_params(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder output for z of shape (..., z_dim) -> (..., likelihood.num_params, *input_shape)."""
        lead = z.shape[:-1]
        out = self.decoder(z.reshape(-1, self.z_dim))
        return out.reshape(*lead, self.likelihood.num_params, *self.input_shape)

    def prior(self) -> dist.TorchDistribution:
        """p(z) = N(0, I_d)."""
        return dist.Normal(self.prior_loc, self.prior_scale).to_event(1)

    # ----------------------------------------------------------------- the two Pyro programs
    def model(self, x: torch.Tensor | None = None, *, batch_size: int | None = None):
        """p(z) p(x|z): ``pyro.module`` for the decoder, a plate over the batch, ``"z"`` then ``"x"``.

        With ``x=None`` it generates ``batch_size`` data points (e.g. under ``pyro.infer.Predictive``).
        """
        pyro.module("decoder", self.decoder)
        if any(p.requires_grad for p in self.likelihood.parameters()):
            pyro.module("likelihood", self.likelihood)
        if x is not None:
            x = as_batch(x, self.input_shape)
            batch_size = x.shape[0]
        elif batch_size is None:
            raise ValueError("model(x=None) needs batch_size= to know how many data points to generate")
        with pyro.plate("data", batch_size):
            z = pyro.sample("z", self.prior())
            return pyro.sample("x", self.likelihood(self._decode_params(z)), obs=x)

    def guide(self, x: torch.Tensor, *, batch_size: int | None = None):
        """q(z|x): the encoder's posterior family, ``"z"`` sampled inside the same batch plate."""
        pyro.module("encoder", self.encoder)
        if any(p.requires_grad for p in self.posterior.parameters()):
            pyro.module("posterior", self.posterior)
        x = as_batch(x, self.input_shape)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", self.posterior(self._encode_params(x)))

    # ----------------------------------------------------------------- helpers
    def encode(self, x) -> dist.TorchDistribution:
        """The posterior q(z|x) as a distribution with batch_shape (N,) and event_shape (z_dim,)."""
        return self.posterior(self._encode_params(as_batch(x, self.input_shape)))

    def posterior_mean(self, x) -> torch.Tensor:
        """A point summary of q(z|x), shape (N, z_dim)."""
        return self.posterior.mean(self._encode_params(as_batch(x, self.input_shape)))

    def decode(self, z: torch.Tensor) -> dist.TorchDistribution:
        """p(x|z) for z of shape (..., z_dim)."""
        return self.likelihood(self._decode_params(z))

    @torch.no_grad()
    def reconstruct(self, x, sample_z: bool = False) -> torch.Tensor:
        """E[x|z] at z = the posterior's point summary (or a posterior sample with ``sample_z=True``)."""
        x = as_batch(x, self.input_shape)
        z = self.encode(x).sample() if sample_z else self.posterior_mean(x)
        return self.likelihood.mean(self._decode_params(z))

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True) -> torch.Tensor:
        """n draws z ~ p(z), returned as E[x|z] (``mean=True``) or as draws x ~ p(x|z)."""
        z = self.prior().expand([int(n)]).sample()
        out = self._decode_params(z)
        return self.likelihood.mean(out) if mean else self.likelihood(out).sample()
