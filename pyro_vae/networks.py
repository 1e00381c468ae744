"""Encoder and decoder networks.

Encoders map a batch of data ``(B, *input_shape)`` to ``(B, out_features)`` (the posterior family's
parameters); decoders map ``(B, z_dim)`` to ``(B, out_channels, *input_shape)`` (the likelihood's
parameters, ``out_channels = likelihood.num_params``). The VAE flattens any extra leading dimensions
(vectorized particles) before calling them, so user-supplied ``nn.Module`` networks only ever see
plain batches.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["MLPEncoder", "MLPDecoder", "ConvEncoder", "ConvDecoder", "make_networks", "mlp", "ACTIVATIONS"]

ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "leaky-relu": nn.LeakyReLU,
}


def _activation(name: str) -> type[nn.Module]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}") from None


def _mlp(sizes, activation: str, final_activation: bool = False) -> nn.Sequential:
    act = _activation(activation)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if final_activation or i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def mlp(sizes, activation: str = "relu", final_activation: bool = False) -> nn.Sequential:
    """Linear layers of ``sizes`` (input first) with ``activation`` between them (and after the last one with
    ``final_activation``: a feature extractor); works on any leading dimensions. ``sizes`` of one entry gives
    an empty Sequential (the identity)."""
    return _mlp(list(sizes), activation, final_activation)


class MLPEncoder(nn.Module):
    """x -> flatten -> [Linear -> activation] * len(hidden) -> Linear(out_features)."""

    def __init__(self, input_shape, out_features: int, hidden=(400,), activation="relu"):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.net = _mlp([math.prod(self.input_shape), *hidden, out_features], activation)

    def forward(self, x):
        return self.net(x.flatten(start_dim=1))


class MLPDecoder(nn.Module):
    """z -> [Linear -> activation] * len(hidden) -> Linear -> reshape (out_channels, *input_shape).

    ``hidden`` is given encoder-side first (e.g. ``(400, 200)``) and used in reverse, mirroring the encoder.
    """

    def __init__(self, z_dim: int, input_shape, out_channels: int = 1, hidden=(400,), activation="relu"):
        super().__init__()
        self.out_shape = (out_channels, *input_shape)
        self.net = _mlp([z_dim, *reversed(tuple(hidden)), math.prod(self.out_shape)], activation)

    def forward(self, z):
        return self.net(z).reshape(-1, *self.out_shape)

    @torch.no_grad()
    def set_output_bias(self, bias: torch.Tensor) -> None:
        """Set the last layer's bias to ``bias`` of shape (out_channels, *input_shape)."""
        self.net[-1].bias.copy_(bias.reshape(-1))


def _conv_check(input_shape):
    if len(input_shape) != 3 or input_shape[1] % 4 or input_shape[2] % 4:
        raise ValueError(
            f"the convolutional networks need (channels, height, width) with height and width divisible by 4 "
            f"(e.g. (1, 28, 28), (3, 32, 32), (1, 8, 8)); got input_shape={tuple(input_shape)}"
        )


class ConvEncoder(nn.Module):
    """Two stride-2 4x4 convolutions (32, 64 channels) -> Linear(hidden) -> Linear(out_features).

    Works for any (C, H, W) with H, W divisible by 4: 28x28 -> 7x7, 32x32 -> 8x8 feature maps.
    """

    def __init__(self, input_shape, out_features: int, hidden=(256,), activation="relu", channels=(32, 64)):
        super().__init__()
        _conv_check(input_shape)
        c, h, w = input_shape
        act = _activation(activation)
        self.features = nn.Sequential(
            nn.Conv2d(c, channels[0], 4, stride=2, padding=1), act(),
            nn.Conv2d(channels[0], channels[1], 4, stride=2, padding=1), act(),
            nn.Flatten(),
        )
        self.head = _mlp([channels[1] * (h // 4) * (w // 4), *hidden, out_features], activation)
        self.head_act = act()

    def forward(self, x):
        return self.head(self.head_act(self.features(x)))


class ConvDecoder(nn.Module):
    """Mirror of :class:`ConvEncoder`: Linear layers -> (64, H/4, W/4) -> two stride-2 transposed convolutions."""

    def __init__(self, z_dim: int, input_shape, out_channels: int = 1, hidden=(256,), activation="relu",
                 channels=(32, 64)):
        super().__init__()
        _conv_check(input_shape)
        c, h, w = input_shape
        act = _activation(activation)
        self.out_shape = (out_channels, c, h, w)
        self.grid = (channels[1], h // 4, w // 4)
        self.head = nn.Sequential(_mlp([z_dim, *reversed(tuple(hidden)), math.prod(self.grid)], activation), act())
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(channels[1], channels[0], 4, stride=2, padding=1), act(),
            nn.ConvTranspose2d(channels[0], out_channels * c, 4, stride=2, padding=1),
        )

    def forward(self, z):
        out = self.deconv(self.head(z).reshape(-1, *self.grid))
        return out.reshape(-1, *self.out_shape)

    @torch.no_grad()
    def set_output_bias(self, bias: torch.Tensor) -> None:
        """Set the last convolution's bias (one per output channel) to ``bias`` (out_channels, C, H, W) averaged
        over the pixels."""
        self.deconv[-1].bias.copy_(bias.reshape(self.deconv[-1].bias.shape[0], -1).mean(-1))


def make_networks(kind: str, input_shape, z_dim: int, encoder_out: int, decoder_out_channels: int,
                  hidden=(400,), activation="relu"):
    """Build an (encoder, decoder) pair of ``kind`` ``"mlp"`` or ``"conv"``."""
    if kind == "mlp":
        return (MLPEncoder(input_shape, encoder_out, hidden, activation),
                MLPDecoder(z_dim, input_shape, decoder_out_channels, hidden, activation))
    if kind == "conv":
        return (ConvEncoder(input_shape, encoder_out, hidden, activation),
                ConvDecoder(z_dim, input_shape, decoder_out_channels, hidden, activation))
    raise ValueError(f"unknown network {kind!r}; choose 'mlp' or 'conv'")
