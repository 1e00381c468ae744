"""The conditional VAE (Sohn, Lee & Yan, NeurIPS 2015): q(z|x,c), p(x|z,c) and a prior p(z|c).

Conditional ELBO: log p(x|c) >= E_q(z|x,c)[log p(x|z,c)] - KL(q(z|x,c) || p(z|c)).

The condition c is a class label (an integer vector, one-hot encoded inside) or any tensor (flattened), e.g.
the visible quadrants of an image. The prior is N(0, I) (``prior="standard"``) or a network of c
(``prior="learned"``): p(z|c) = N(mu(c), diag sigma(c)^2).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import pyro
import pyro.distributions as dist

from .guides import DiagonalNormal
from .networks import MLPDecoder, MLPEncoder
from .vae import VAE, as_batch

__all__ = ["ConditionalVAE"]


class ConditionalVAE(VAE):
    """A VAE whose model, guide and prior all see a condition c: ``model(x, c)``, ``guide(x, c)``.

    Args:
        input_shape: shape of one data point x.
        num_classes: condition on integer labels in [0, num_classes) (one-hot encoded).
        condition_shape: or condition on float tensors of this per-point shape.
        prior: ``"standard"`` for p(z|c) = N(0, I), ``"learned"`` for a prior network of c.
        z_dim: latent dimension.
        likelihood: as for :class:`~pyro_vae.vae.VAE`.
        guide: posterior family name or instance.
        hidden: hidden sizes of the MLPs (encoder, decoder and prior network).
        activation: MLP activation.
        sigma: for the Gaussian likelihood.
        guide_kwargs: for the posterior family.
        missing_value: image completion (Sohn et al.'s quadrant task): the condition is the image itself with
            the unobserved pixels set to this value (e.g. -1), and log p(x|z,c) covers only those pixels.
    """

    conditional = True

    def __init__(self, input_shape=(1, 28, 28), num_classes: int | None = None, condition_shape=None,
                 z_dim: int = 20, prior: str = "standard", likelihood="bernoulli", guide="diagonal",
                 hidden=(400,), activation="relu", sigma=None, guide_kwargs: dict | None = None,
                 missing_value: float | None = None):
        if (num_classes is None) == (condition_shape is None):
            raise ValueError("give exactly one of num_classes= (labels) or condition_shape= (tensors)")
        if prior not in ("standard", "learned"):
            raise ValueError(f"unknown prior {prior!r}; choose 'standard' or 'learned'")
        super().__init__(input_shape=input_shape, z_dim=z_dim, likelihood=likelihood, guide=guide,
                         hidden=hidden, activation=activation, sigma=sigma, guide_kwargs=guide_kwargs,
                         encoder=torch.nn.Identity(), decoder=torch.nn.Identity())
        self.num_classes = None if num_classes is None else int(num_classes)
        self.condition_shape = None if condition_shape is None else tuple(condition_shape)
        self.condition_dim = self.num_classes or math.prod(self.condition_shape)
        data_dim = math.prod(self.input_shape)
        self.encoder = MLPEncoder((data_dim + self.condition_dim,), self.posterior.num_params, hidden, activation)
        self.decoder = MLPDecoder(self.z_dim + self.condition_dim, self.input_shape, self.likelihood.num_params,
                                  hidden, activation)
        self.prior_kind = prior
        if missing_value is not None and self.condition_shape != self.input_shape:
            raise ValueError("missing_value needs condition_shape == input_shape (the condition is the partial image)")
        self.missing_value = missing_value
        if prior == "learned":
            self.prior_family = DiagonalNormal(self.z_dim)
            self.prior_net = MLPEncoder((self.condition_dim,), self.prior_family.num_params, hidden, activation)

    # ----------------------------------------------------------------- the condition
    def condition(self, c) -> torch.Tensor:
        """Labels -> one-hot (N, num_classes); tensors -> flattened float (N, condition_dim)."""
        c = torch.as_tensor(c, device=self.prior_loc.device)
        if self.num_classes is not None:
            if c.dim() != 1 or torch.is_floating_point(c):
                raise ValueError(f"expected integer labels of shape (batch,), got {tuple(c.shape)} {c.dtype}")
            if c.numel() and (int(c.min()) < 0 or int(c.max()) >= self.num_classes):
                raise ValueError(f"labels must be in [0, {self.num_classes}), got {int(c.min())}..{int(c.max())}")
            return F.one_hot(c.long(), self.num_classes).float()
        return as_batch(c, self.condition_shape).float().flatten(1)

    def _encode_params(self, x, c):
        lead = x.shape[: x.dim() - len(self.input_shape)]
        h = torch.cat([x.reshape(-1, math.prod(self.input_shape)), c.expand(*lead, -1).reshape(-1, c.shape[-1])], -1)
        return self.encoder(h).reshape(*lead, self.posterior.num_params)

    def _decode_params(self, z, c):
        lead = z.shape[:-1]
        h = torch.cat([z.reshape(-1, self.z_dim), c.expand(*lead, -1).reshape(-1, c.shape[-1])], -1)
        return self.decoder(h).reshape(*lead, self.likelihood.num_params, *self.input_shape)

    def prior(self, c: torch.Tensor | None = None) -> dist.TorchDistribution:
        """p(z|c): N(0, I), or N(mu(c), diag sigma(c)^2) from the prior network."""
        if self.prior_kind == "standard" or c is None:
            return super().prior()
        return self.prior_family(self.prior_net(c))

    # ----------------------------------------------------------------- the two Pyro programs
    def model(self, x=None, c=None, *, mask=None):
        """p(z|c) p(x|z,c); ``mask`` restricts log p(x|z,c) to some pixels (e.g. the missing quadrants)."""
        if c is None:
            raise ValueError("the conditional model needs a condition c")
        pyro.module("decoder", self.decoder)
        if self.prior_kind == "learned":
            pyro.module("prior_net", self.prior_net)
        mask = self.missing_mask(c) if mask is None else mask
        c = self.condition(c)
        if x is not None:
            x = as_batch(x, self.input_shape)
        with pyro.plate("data", c.shape[0]):
            z = pyro.sample("z", self.prior(c))
            return pyro.sample("x", self.likelihood(self._decode_params(z, c), mask=mask), obs=x)

    def guide(self, x, c=None, *, mask=None):
        """q(z|x,c)."""
        if c is None:
            raise ValueError("the conditional guide needs a condition c")
        pyro.module("encoder", self.encoder)
        x, c = as_batch(x, self.input_shape), self.condition(c)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", self.posterior(self._encode_params(x, c)))

    def missing_mask(self, c):
        """For image completion: True where the condition marks a pixel as unobserved (else None)."""
        if self.missing_value is None:
            return None
        return as_batch(torch.as_tensor(c), self.input_shape) == self.missing_value

    # ----------------------------------------------------------------- helpers
    def encode(self, x, c=None):
        x, c = as_batch(x, self.input_shape), self.condition(c)
        return self.posterior(self._encode_params(x, c))

    def posterior_mean(self, x, c=None):
        x, c = as_batch(x, self.input_shape), self.condition(c)
        return self.posterior.mean(self._encode_params(x, c))

    @torch.no_grad()
    def reconstruct(self, x, c=None, sample_z: bool = False):
        x, cc = as_batch(x, self.input_shape), self.condition(c)
        params = self._encode_params(x, cc)
        z = self.posterior(params).sample() if sample_z else self.posterior.mean(params)
        return self.likelihood.mean(self._decode_params(z, cc))

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True, c=None, label: int | None = None):
        """n draws z ~ p(z|c) decoded; give ``label=k`` for class k, or ``c`` (n conditions)."""
        if c is None:
            if label is None:
                raise ValueError("sampling a conditional VAE needs label= or c=")
            c = torch.full((int(n),), int(label), dtype=torch.long)
        cc = self.condition(c)
        if cc.shape[0] != n:
            raise ValueError(f"sampling {n} points needs {n} conditions, got {cc.shape[0]}")
        z = self.prior(cc).sample() if self.prior_kind == "learned" else self.prior().expand([int(n)]).sample()
        out = self._decode_params(z, cc)
        return self.likelihood.mean(out) if mean else self.likelihood(out).sample()
