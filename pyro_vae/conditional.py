"""The conditional VAE (Sohn, Lee & Yan, NeurIPS 2015): q(z|x,c), p(x|z,c) and a prior p(z|c).

Conditional ELBO: log p(x|c) >= E_q(z|x,c)[log p(x|z,c)] - KL(q(z|x,c) || p(z|c)).

The condition c is a class label (an integer vector, one-hot encoded inside) or any tensor (flattened), e.g.
the visible quadrants of an image. The prior is N(0, I) (``prior="standard"``) or a network of c
(``prior="learned"``): p(z|c) = N(mu(c), diag sigma(c)^2).

Model, guide and their trace-free twin are :class:`~pyro_vae.vae.VAE`'s (every method takes ``(x, c)``);
this class overrides the building blocks that see c: :meth:`ConditionalVAE.condition`, the networks' inputs,
the prior and, for image completion, the likelihood's mask.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import pyro.distributions as dist
from pyro.infer.util import is_validation_enabled

from .data import as_batch
from .guides import DiagonalNormal
from .networks import MLPDecoder, MLPEncoder
from .vae import VAE

__all__ = ["ConditionalVAE"]


class ConditionalVAE(VAE):
    """A VAE whose model, guide and prior all see a condition c: ``model(x, c)``, ``guide(x, c)``.

    Args:
        input_shape: shape of one data point x.
        num_classes: condition on integer labels in [0, num_classes) (one-hot encoded).
        condition_shape: or condition on floating tensors of this per-point shape.
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
        """Labels -> one-hot (N, num_classes); tensors -> flattened (N, condition_dim), in the model's dtype."""
        if c is None:
            raise ValueError("this VAE is conditional: give the condition c (e.g. class labels)")
        c = torch.as_tensor(c, device=self.prior_loc.device)
        if self.num_classes is not None:
            if c.dim() != 1 or torch.is_floating_point(c):
                raise ValueError(f"expected integer labels of shape (batch,), got {tuple(c.shape)} {c.dtype}")
            if is_validation_enabled() and c.numel() and (int(c.min()) < 0 or int(c.max()) >= self.num_classes):
                raise ValueError(f"labels must be in [0, {self.num_classes}), got {int(c.min())}..{int(c.max())}")
            # one-hot by comparison: no host read of the labels (F.one_hot checks their range on the host, which
            # a captured graph cannot); the range is checked above under Pyro's validation, and by fit's data checks
            classes = torch.arange(self.num_classes, device=c.device)
            return (c.long()[:, None] == classes).to(self.dtype)
        return as_batch(c, self.condition_shape).to(self.dtype).flatten(1)

    def label_condition(self, label: int, n: int) -> torch.Tensor:
        """``n`` copies of class ``label``."""
        if self.num_classes is None:
            raise ValueError("this conditional VAE takes tensor conditions, not labels: pass c=")
        if not 0 <= int(label) < self.num_classes:
            raise ValueError(f"label must be in [0, {self.num_classes}), got {label}")
        return torch.full((int(n),), int(label), dtype=torch.long)

    def grid_conditions(self, per_class: int = 8):
        """Labels 0..num_classes-1, each repeated ``per_class`` times (one figure row per class)."""
        if self.num_classes is None:
            return None
        return torch.arange(self.num_classes).repeat_interleave(per_class)

    def missing_mask(self, c):
        """For image completion: True where the condition marks a pixel as unobserved (else None)."""
        if self.missing_value is None:
            return None
        return as_batch(torch.as_tensor(c), self.input_shape) == self.missing_value

    def likelihood_mask(self, c=None, mask=None):
        """``mask`` if given, else the unobserved pixels of an image-completion condition (else all pixels)."""
        return self.missing_mask(c) if mask is None and c is not None else mask

    # ----------------------------------------------------------------- networks and prior of (x, c)
    def prior(self, cond=None) -> dist.TorchDistribution:
        """p(z|c): N(0, I), or N(mu(c), diag sigma(c)^2) from the prior network."""
        if self.prior_kind == "standard" or cond is None:
            return super().prior()
        return self.prior_family(self.prior_net(cond))

    def standard_prior(self, cond=None) -> bool:
        return self.prior_kind == "standard" or cond is None

    def prior_log_prob(self, z, cond=None):
        if self.prior_kind == "standard" or cond is None:
            return super().prior_log_prob(z, cond)
        return self.prior(cond).log_prob(z)

    def _encode_params(self, x, cond=None):
        lead = x.shape[: x.dim() - len(self.input_shape)]
        h = torch.cat([x.reshape(-1, math.prod(self.input_shape)),
                       cond.expand(*lead, -1).reshape(-1, cond.shape[-1])], -1)
        return self.encoder(h).reshape(*lead, self.posterior.num_params)

    def _decode_params(self, z, cond=None):
        lead = z.shape[:-1]
        h = torch.cat([z.reshape(-1, self.z_dim), cond.expand(*lead, -1).reshape(-1, cond.shape[-1])], -1)
        return self.decoder(h).reshape(*lead, self.likelihood.num_params, *self.input_shape)

    def _model_modules(self) -> dict:
        modules = super()._model_modules()
        if self.prior_kind == "learned":
            modules["prior_net"] = self.prior_net
        return modules
