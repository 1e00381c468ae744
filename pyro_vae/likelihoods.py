"""Observation models p(x|z): decoder output -> a Pyro distribution over one data point.

The decoder emits ``likelihood.num_params`` tensors of the data's shape per data point, stacked in
dimension ``-(event_dim + 1)``: a decoder output of shape ``(..., num_params, *input_shape)``. The
likelihood turns it into a distribution with ``event_shape == input_shape`` (pixels folded into the
event with ``to_event``), so ``log p(x|z)`` is one number per data point.

Names: ``bernoulli`` (logits), ``gaussian`` (sigma fixed, learned globally, or produced per pixel by the
decoder: p(x|z) = N(mu(z), diag sigma(z)^2)), ``continuous-bernoulli`` (Loaiza-Ganem & Cunningham, 2019)
and ``laplace``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import pyro.distributions as dist

__all__ = [
    "Likelihood",
    "Bernoulli",
    "Gaussian",
    "ContinuousBernoulli",
    "Laplace",
    "make_likelihood",
    "LIKELIHOODS",
]

_MIN_SCALE = 1e-3


class Likelihood(nn.Module):
    """Base class. Subclasses set ``num_params`` and implement ``pixelwise`` (and ``mean`` if not the
    distribution's)."""

    num_params: int = 1
    #: the data must lie in [0, 1] (checked once on the data, not per step)
    unit_interval: bool = False
    #: the data must be exactly 0 or 1 (grayscale data is binarized by the trainer)
    binary: bool = False

    def __init__(self, input_shape):
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.event_dim = len(self.input_shape)

    def split(self, out: torch.Tensor):
        """Split a decoder output (..., num_params, *input_shape) into its parameter tensors."""
        dim = -(self.event_dim + 1)
        if self.num_params == 1:  # a view with a cheap backward (unbind's backward stacks a copy)
            return (out.squeeze(dim),)
        return out.unbind(dim=dim)

    def log_prob(self, out: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x|z) per data point, the same value as ``self(out, mask).log_prob(x)``."""
        return self(out, mask).log_prob(x)

    def pixelwise(self, out: torch.Tensor) -> dist.TorchDistribution:  # pragma: no cover
        """The per-pixel distribution (batch_shape ends with input_shape)."""
        raise NotImplementedError

    def forward(self, out: torch.Tensor, mask: torch.Tensor | None = None) -> dist.TorchDistribution:
        """p(x|z) with the pixels folded into the event; ``mask`` (bool, broadcastable to the data) keeps only
        the selected pixels in log p(x|z) (e.g. the missing quadrants of an image completion task)."""
        d = self.pixelwise(out)
        if mask is not None:
            d = d.mask(mask)
        return d.to_event(self.event_dim)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """E[x|z]: what reconstructions and samples show."""
        return self.pixelwise(out).mean

    #: the decoder output whose mean is a given image: "logit" (Bernoulli-type) or "identity" (location)
    output_link = "identity"

    def output_for_mean(self, mean: torch.Tensor) -> torch.Tensor:
        """A decoder output (num_params, *input_shape) whose mean E[x|z] is about ``mean``: the link applied to
        it for the first parameter (logit, clamped to [1e-3, 1 - 1e-3], for Bernoulli-type likelihoods), 0 for
        the others (e.g. a decoder's raw scale). Used to start a decoder's output bias at the data mean."""
        first = torch.logit(mean.clamp(1e-3, 1 - 1e-3)) if self.output_link == "logit" else mean
        rest = torch.zeros((self.num_params - 1, *first.shape), dtype=first.dtype, device=first.device)
        return torch.cat([first.unsqueeze(0), rest])

    def check_data(self, x: torch.Tensor) -> None:
        """Raise ValueError if ``x`` is outside this likelihood's support."""
        if self.binary and not bool(((x == 0) | (x == 1)).all()):
            raise ValueError(
                f"the {self.name} likelihood needs binary data (0 or 1); got values in "
                f"[{x.min().item():.3g}, {x.max().item():.3g}]: binarize them or choose another likelihood"
            )
        if self.unit_interval and not bool(((x >= 0) & (x <= 1)).all()):
            raise ValueError(
                f"the {self.name} likelihood needs data in [0, 1]; got values in "
                f"[{x.min().item():.3g}, {x.max().item():.3g}]"
            )

    @property
    def name(self) -> str:
        return next(k for k, v in LIKELIHOODS.items() if isinstance(self, v))


def _check_binary(x: torch.Tensor) -> None:
    if not bool(((x == 0) | (x == 1)).all()):
        raise ValueError(
            f"the bernoulli likelihood needs binary data (0 or 1); got values in [{x.min().item():.3g}, "
            f"{x.max().item():.3g}]: binarize them (pyro_vae.data.binarize) or choose another likelihood"
        )


class _BinaryBernoulli(dist.Bernoulli):
    """Bernoulli (parameters unchecked) whose values are checked while validation is on (``pyro.enable_validation``),
    with a one-line message instead of torch's printout of the tensor."""

    def log_prob(self, value):
        if torch.distributions.Distribution._validate_args:
            _check_binary(value)
        return super().log_prob(value)


class Bernoulli(Likelihood):
    """p(x|z) = prod_i Bernoulli(x_i; sigmoid(l_i(z))), parameterized by logits l(z).

    log p(x|z) = sum_i x_i l_i - softplus(l_i). Needs binary x; grayscale images are binarized
    dynamically by the trainer (Salakhutdinov & Murray, 2008). Non-binary x is a ValueError while validation
    is on (``pyro.enable_validation``, on by default); the trainer checks its data once and trains with
    validation off, so the training step pays nothing for the check.
    """

    binary = True
    output_link = "logit"

    def pixelwise(self, out):
        (logits,) = self.split(out)
        return _BinaryBernoulli(logits=logits, validate_args=False)

    def log_prob(self, out, x, mask=None):
        """sum_i x_i l_i - softplus(l_i), on flattened pixels (the trainer's hot path)."""
        if mask is not None:
            return super().log_prob(out, x, mask)
        if torch.distributions.Distribution._validate_args:
            _check_binary(x)
        dims = tuple(range(-(self.event_dim + 1), 0))  # the parameter dim (size 1) and the pixels
        target = x.unsqueeze(dims[0]).expand_as(out)  # views of the data: nothing in the backward
        return -F.binary_cross_entropy_with_logits(out, target, reduction="none").sum(dims)

    def mean(self, out):
        return torch.sigmoid(self.split(out)[0])


class Gaussian(Likelihood):
    """p(x|z) = N(x; mu(z), diag sigma^2).

    ``sigma`` selects where sigma comes from:

    * ``"decoder"`` (default): per pixel from the decoder, sigma(z) = softplus(s(z)) + 1e-3, the
      heteroscedastic p(x|z) = N(mu(z), diag sigma(z)^2);
    * ``"learned"``: one global log sigma, learned with the networks;
    * a positive float: fixed sigma.
    """

    def __init__(self, input_shape, sigma="decoder"):
        super().__init__(input_shape)
        if sigma == "decoder":
            self.num_params = 2
            self.log_sigma = None
        elif sigma == "learned":
            self.num_params = 1
            self.log_sigma = nn.Parameter(torch.zeros(()))
        else:
            try:
                value = float(sigma)
            except (TypeError, ValueError):
                value = float("nan")
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"sigma must be 'decoder', 'learned' or a positive number, got {sigma!r}")
            self.num_params = 1
            self.log_sigma = None
            self.register_buffer("fixed_sigma", torch.tensor(value))
        self.sigma_mode = sigma

    def scale(self, out):
        if self.num_params == 2:
            return F.softplus(self.split(out)[1]) + _MIN_SCALE
        if self.log_sigma is not None:
            return self.log_sigma.exp()
        return self.fixed_sigma

    def pixelwise(self, out):
        loc = self.split(out)[0]
        scale = self.scale(out)
        if scale.dim() == 0:
            scale = scale.expand(loc.shape)
        return dist.Normal(loc, scale)

    def mean(self, out):
        return self.split(out)[0]


class ContinuousBernoulli(Likelihood):
    """p(x|z) = prod_i CB(x_i; lambda_i(z)), the normalized continuous Bernoulli on [0, 1].

    log p(x|z) = sum_i x_i l_i - softplus(l_i) + log C(lambda_i), with the normalizing constant
    C fixing the Bernoulli likelihood's mis-specification on grayscale data
    (Loaiza-Ganem & Cunningham, NeurIPS 2019). Its mean is not sigmoid(l).
    """

    unit_interval = True
    output_link = "logit"  # approximately: the CB mean is not sigmoid(l)

    def pixelwise(self, out):
        (logits,) = self.split(out)
        return dist.ContinuousBernoulli(logits=logits, validate_args=False)


class Laplace(Likelihood):
    """p(x|z) = prod_i Laplace(x_i; mu_i(z), b_i(z)), b = softplus(s(z)) + 1e-3: an L1 reconstruction."""

    num_params = 2

    def pixelwise(self, out):
        loc, raw = self.split(out)
        return dist.Laplace(loc, F.softplus(raw) + _MIN_SCALE)

    def mean(self, out):
        return self.split(out)[0]


LIKELIHOODS = {
    "bernoulli": Bernoulli,
    "gaussian": Gaussian,
    "continuous-bernoulli": ContinuousBernoulli,
    "laplace": Laplace,
}


def make_likelihood(name, input_shape, **kwargs) -> Likelihood:
    """Build a likelihood by name, or pass a :class:`Likelihood` instance through."""
    if isinstance(name, Likelihood):
        return name
    try:
        cls = LIKELIHOODS[name]
    except KeyError:
        raise ValueError(
            f"unknown likelihood {name!r}; choose one of {', '.join(LIKELIHOODS)}"
        ) from None
    if kwargs.get("sigma") is not None and cls is not Gaussian:
        raise ValueError(f"sigma applies to the gaussian likelihood only, not {name!r}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return cls(input_shape, **kwargs)
