"""Amortized posterior families q(z|x).

A *posterior family* turns the encoder's output features into a distribution over the latent
vector z with ``event_shape == (z_dim,)``. The encoder network only has to produce
``family.num_params`` features per data point; the family owns the parameterization, so the
guide can be swapped (``VAE(..., guide="cholesky")``) without touching the model.

Interface (every family is an :class:`torch.nn.Module`):

* ``family.z_dim``: the latent dimension.
* ``family.num_params``: how many encoder features it consumes.
* ``family(params)``: a Pyro distribution, ``batch_shape == params.shape[:-1]``,
  ``event_shape == (z_dim,)``, sampled with ``rsample`` (reparameterized).
* ``family.mean(params)``: a point summary (posterior mean, or the flow of the base mean).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import pyro.distributions as dist

__all__ = ["PosteriorFamily", "DiagonalNormal", "make_posterior", "POSTERIORS"]

_MIN_SCALE = 1e-5


def positive(raw: torch.Tensor) -> torch.Tensor:
    """Softplus map to strictly positive scales: sigma = softplus(raw) + 1e-5.

    Softplus grows linearly rather than exponentially, so a large encoder output cannot blow up
    sigma the way ``exp`` can; the floor keeps log sigma finite.
    """
    return F.softplus(raw) + _MIN_SCALE


class PosteriorFamily(nn.Module):
    """Base class: maps encoder features to q(z|x)."""

    num_params: int

    def __init__(self, z_dim: int):
        super().__init__()
        if int(z_dim) < 1:
            raise ValueError(f"z_dim must be a positive integer, got {z_dim!r}")
        self.z_dim = int(z_dim)

    def forward(self, params: torch.Tensor) -> dist.TorchDistribution:  # pragma: no cover
        raise NotImplementedError

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return self(params).mean


class DiagonalNormal(PosteriorFamily):
    """Factorized Gaussian posterior q(z|x) = N(mu(x), diag sigma(x)^2).

    The encoder emits ``2 * z_dim`` features: mu and a raw scale mapped through
    :func:`positive`. Reparameterization: z = mu + sigma * eps, eps ~ N(0, I)
    (Kingma & Welling, 2014).
    """

    def __init__(self, z_dim: int):
        super().__init__(z_dim)
        self.num_params = 2 * self.z_dim

    def forward(self, params):
        loc, raw = params.split(self.z_dim, dim=-1)
        return dist.Normal(loc, positive(raw)).to_event(1)

    def mean(self, params):
        return params[..., : self.z_dim]


POSTERIORS = {"diagonal": DiagonalNormal}


def make_posterior(name, z_dim: int, **kwargs) -> PosteriorFamily:
    """Build a posterior family by name (``diagonal``, ...) or pass a family through."""
    if isinstance(name, PosteriorFamily):
        return name
    try:
        cls = POSTERIORS[name]
    except KeyError:
        raise ValueError(
            f"unknown guide {name!r}; choose one of {', '.join(sorted(POSTERIORS))}"
        ) from None
    return cls(z_dim, **kwargs)
