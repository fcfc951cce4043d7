"""Squeezed convolutional VAE (Kim et al. 2017, "Squeezed Convolutional Variational
AutoEncoder for Unsupervised Anomaly Detection in Edge Device Industrial Internet of Things").

Fire modules (Iandola et al. 2016, SqueezeNet): a 1x1 "squeeze" convolution to few channels,
then 1x1 and 3x3 "expand" convolutions whose outputs are concatenated. ``scvae`` puts them in
a convolutional VAE; ``scvae_plain`` is the same network with every Fire module replaced by
one 3x3 convolution with the same input and output channels (same depth, same shapes), the
baseline for the parameter-count and latency comparison.

The spatial dimensionality follows the data:

- multivariate time-series windows ``(sensors, time)``: **Conv1d over time, channels =
  sensors** (every sensor is an input channel of the first layer);
- images ``(channels, height, width)``: Conv2d (e.g. 28x28 Fashion-MNIST).

Every spatial size must be divisible by 4 (two halvings in the encoder, two doublings in the
decoder). All networks accept extra leading batch dims (the particle dim of IW estimates).
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import Tensor, nn

from ppl_vae.models.likelihoods import Likelihood
from ppl_vae.models.priors import Prior
from ppl_vae.models.vae import VAE
from ppl_vae.models.zoo import MODELS, ModelSpec

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_DECONV = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}
_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d}
HEAD_CHANNELS = 16  # channels of the 1x1 bottleneck before the dense layer to (loc, scale)


class Fire(nn.Module):
    """SqueezeNet's Fire module: ReLU(1x1 squeeze) -> [ReLU(1x1 expand), ReLU(3x3 expand)].

    ``(B, in_channels, *spatial) -> (B, 2 * expand_channels, *spatial)``.
    """

    def __init__(self, in_channels: int, squeeze_channels: int, expand_channels: int, spatial_dims: int = 2):
        super().__init__()
        conv = _CONV[spatial_dims]
        self.squeeze = conv(in_channels, squeeze_channels, 1)
        self.expand1 = conv(squeeze_channels, expand_channels, 1)
        self.expand3 = conv(squeeze_channels, expand_channels, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        s = self.act(self.squeeze(x))
        return torch.cat([self.act(self.expand1(s)), self.act(self.expand3(s))], dim=1)


def _block(in_ch: int, out_ch: int, spatial_dims: int, fire: bool) -> nn.Module:
    """A Fire module (squeeze to out/8 channels) or the plain 3x3 convolution it replaces."""
    if fire:
        return Fire(in_ch, max(4, out_ch // 8), out_ch // 2, spatial_dims)
    return nn.Sequential(_CONV[spatial_dims](in_ch, out_ch, 3, padding=1), nn.ReLU())


def _he_init(module: nn.Module) -> None:
    """He (Kaiming) normal init of every convolution: PyTorch's default shrinks the signal
    about threefold per ReLU layer, which in a network this deep leaves the decoder blind
    to z at the start and the posterior collapses before it can learn."""
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            assert m.bias is not None  # every convolution here has a bias
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):  # unit-variance outputs: z's location spread like the prior's
            nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
            nn.init.zeros_(m.bias)


def check_conv_event_shape(event_shape: Sequence[int], model: str) -> Tuple[int, Tuple[int, ...]]:
    """(spatial_dims, spatial sizes) of ``(channels, *spatial)``; ValueError if unusable."""
    event_shape = tuple(event_shape)
    if len(event_shape) not in (2, 3):
        raise ValueError(
            f"model {model!r} needs datapoints shaped (sensors, time) or (channels, height, width), "
            f"got shape {event_shape}"
        )
    spatial = event_shape[1:]
    if any(s % 4 or s < 4 for s in spatial):
        raise ValueError(
            f"model {model!r} needs every spatial size divisible by 4 (e.g. 28x28 images, windows of "
            f"32 steps), got datapoint shape {event_shape}"
        )
    return len(spatial), spatial


class ConvEncoder(nn.Module):
    """x -> (loc, scale) of q(z|x): conv/2, block, block, maxpool/2, block, block, 1x1, dense.

    ``x``: ``(..., channels, *spatial)``; outputs ``(..., latent_dim)``.
    """

    def __init__(self, event_shape: Sequence[int], latent_dim: int, width: int = 32, fire: bool = True):
        super().__init__()
        self.event_shape = tuple(event_shape)
        d, spatial = check_conv_event_shape(event_shape, "scvae" if fire else "scvae_plain")
        conv = _CONV[d]
        c = width
        self.features = nn.Sequential(
            conv(self.event_shape[0], c, 3, stride=2, padding=1),
            nn.ReLU(),
            _block(c, 2 * c, d, fire),
            _block(2 * c, 2 * c, d, fire),
            _POOL[d](2),
            _block(2 * c, 4 * c, d, fire),
            _block(4 * c, 4 * c, d, fire),
            conv(4 * c, HEAD_CHANNELS, 1),
            nn.ReLU(),
        )
        flat = HEAD_CHANNELS * math.prod(s // 4 for s in spatial)
        self.head = nn.Linear(flat, 2 * latent_dim)
        _he_init(self)
        # q(z|x) starts narrow (scale e^-2): with unit scale the decoder first sees only noise
        # in z, and the KL term collapses the posterior before the features can differ.
        with torch.no_grad():
            self.head.bias[latent_dim:].fill_(-4.0)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        batch = x.shape[: x.dim() - len(self.event_shape)]
        h = self.features(x.reshape(-1, *self.event_shape)).flatten(1)
        loc, log_var = self.head(h).chunk(2, dim=-1)
        scale = torch.exp(0.5 * log_var.clamp(-30.0, 20.0))
        return loc.reshape(*batch, -1), scale.reshape(*batch, -1)


class ConvDecoder(nn.Module):
    """z -> ``num_params`` tensors ``(..., channels, *spatial)``: the encoder mirrored with
    transposed convolutions (kernel 4, stride 2) for the two doublings."""

    def __init__(
        self, latent_dim: int, event_shape: Sequence[int], num_params: int = 1, width: int = 32, fire: bool = True
    ):
        super().__init__()
        self.event_shape = tuple(event_shape)
        self.num_params = num_params
        d, spatial = check_conv_event_shape(event_shape, "scvae" if fire else "scvae_plain")
        self.start_shape = (HEAD_CHANNELS, *(s // 4 for s in spatial))
        conv, deconv = _CONV[d], _DECONV[d]
        c = width
        self.dense = nn.Linear(latent_dim, math.prod(self.start_shape))
        self.features = nn.Sequential(
            nn.ReLU(),
            conv(HEAD_CHANNELS, 4 * c, 1),
            nn.ReLU(),
            _block(4 * c, 4 * c, d, fire),
            _block(4 * c, 2 * c, d, fire),
            deconv(2 * c, 2 * c, 4, stride=2, padding=1),
            nn.ReLU(),
            _block(2 * c, 2 * c, d, fire),
            _block(2 * c, c, d, fire),
            deconv(c, c, 4, stride=2, padding=1),
            nn.ReLU(),
            conv(c, num_params * self.event_shape[0], 3, padding=1),
        )
        _he_init(self)

    def forward(self, z: Tensor) -> Tuple[Tensor, ...]:
        batch = z.shape[:-1]
        h = self.dense(z.reshape(-1, z.shape[-1])).reshape(-1, *self.start_shape)
        out = self.features(h)
        return tuple(p.reshape(*batch, *self.event_shape) for p in out.chunk(self.num_params, dim=1))


def _conv_vae(fire: bool):
    def build(
        event_shape: Sequence[int],
        latent_dim: int,
        hidden_dim: int,
        prior: Prior,
        likelihood: Likelihood,
        **data_info,
    ) -> VAE:
        encoder = ConvEncoder(event_shape, latent_dim, hidden_dim, fire)
        decoder = ConvDecoder(latent_dim, event_shape, likelihood.num_params, hidden_dim, fire)
        return VAE(encoder, decoder, prior, likelihood, event_shape)

    return build


MODELS.register(
    "scvae",
    doc="Kim et al. 2017: squeezed conv VAE (Fire modules) for anomaly detection; Conv1d over sensor windows or Conv2d over images",
)(
    ModelSpec(
        _conv_vae(fire=True),
        "Squeezed convolutional VAE (Kim et al. 2017): Fire modules in encoder and decoder; "
        "hidden_dim is the base channel width; use --likelihood bernoulli for images in [0, 1]",
        likelihood="gaussian",
        latent_dim=16,
        hidden_dim=32,
    )
)
MODELS.register(
    "scvae_plain",
    doc="scvae with each Fire module replaced by one 3x3 convolution (same depth): the baseline",
)(
    ModelSpec(
        _conv_vae(fire=False),
        "Plain convolutional VAE of the same depth as scvae (each Fire module -> one 3x3 conv)",
        likelihood="gaussian",
        latent_dim=16,
        hidden_dim=32,
    )
)
