"""The convolutional VAE of TensorFlow's CVAE tutorial, for 28x28 images (model ``conv``).

Encoder: two 3x3 convolutions with stride 2 (``hidden_dim`` and ``2 * hidden_dim`` filters,
ReLU, no padding: 28 -> 13 -> 6), then a linear layer to the loc and log-variance of q(z|x).
Decoder: a linear layer to a 7x7 map of ``hidden_dim`` channels, two 3x3 transposed
convolutions with stride 2 (``2 * hidden_dim`` then ``hidden_dim`` filters, ReLU: 7 -> 14 -> 28),
then a 3x3 transposed convolution with stride 1 to the likelihood's parameters (Bernoulli
logits by default). The tutorial uses ``hidden_dim=32`` and ``latent_dim=2``; so do the
defaults here. Reference: https://www.tensorflow.org/tutorials/generative/cvae, built on
Kingma & Welling (2013).

Both networks accept extra leading batch dims (the importance-weighted estimator puts a
particle dim in front of z): the leading dims are flattened before the convolutions and
restored after.
"""

from __future__ import annotations

from typing import Callable, Sequence, Tuple

import torch
from torch import Tensor, nn

from ppl_vae.models.likelihoods import Likelihood
from ppl_vae.models.priors import Prior
from ppl_vae.models.vae import VAE
from ppl_vae.models.zoo import MODELS, ModelSpec

IMAGE_SIZE = (28, 28)


def check_image_shape(event_shape: Sequence[int], model: str = "conv") -> Tuple[int, int, int]:
    """``(channels, 28, 28)`` or a one-line ValueError naming the expected shape."""
    shape = tuple(int(s) for s in event_shape)
    if len(shape) != 3 or shape[1:] != IMAGE_SIZE or shape[0] < 1:
        raise ValueError(
            f"model {model!r} needs 28x28 images with event shape (channels, 28, 28), e.g. (1, 28, 28) "
            f"for MNIST or Fashion-MNIST; got {shape}"
        )
    return shape  # type: ignore[return-value]


def _flatten_batch(t: Tensor, event_dims: int) -> Tuple[Tensor, Tuple[int, ...]]:
    batch = tuple(t.shape[: t.dim() - event_dims])
    return t.reshape(-1, *t.shape[t.dim() - event_dims :]), batch


class ImageEncoder(nn.Module):
    """The forward pass of the convolutional encoders: images ``(..., C, H, W)`` through ``body``
    (to features ``(B, F)``) and ``head`` (to loc and log-variance), leading dims restored.
    A subclass builds ``body``, ``head`` and ``latent_dim``."""

    body: nn.Module
    head: nn.Module
    latent_dim: int

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        flat, batch = _flatten_batch(x, 3)
        loc, log_var = self.head(self.body(flat)).chunk(2, dim=-1)
        # The clamp keeps exp() finite early in training; it is inactive at sane values.
        scale = torch.exp(0.5 * log_var.clamp(-30.0, 20.0))
        return loc.reshape(*batch, self.latent_dim), scale.reshape(*batch, self.latent_dim)


class ImageDecoder(nn.Module):
    """The forward pass of the convolutional decoders: z ``(..., latent_dim)`` through ``project``
    to a ``map_shape`` feature map, then ``body`` to ``num_params`` maps of ``event_shape``,
    leading dims restored. A subclass builds ``project``, ``body``, ``map_shape``,
    ``event_shape`` and ``num_params``."""

    project: nn.Module
    body: nn.Module
    map_shape: Tuple[int, int, int]
    event_shape: Tuple[int, ...]
    num_params: int

    def forward(self, z: Tensor) -> Tuple[Tensor, ...]:
        flat, batch = _flatten_batch(z, 1)
        h = self.project(flat).reshape(-1, *self.map_shape)
        out = self.body(h).reshape(*batch, self.num_params, *self.event_shape)
        return tuple(out.unbind(dim=len(batch)))


class ConvEncoder(ImageEncoder):
    """x ``(..., C, 28, 28)`` -> (loc, scale) of a diagonal Gaussian, each ``(..., latent_dim)``."""

    def __init__(self, event_shape: Sequence[int], latent_dim: int, hidden_dim: int = 32):
        super().__init__()
        channels, _, _ = check_image_shape(event_shape)
        self.event_shape = (channels, *IMAGE_SIZE)
        self.latent_dim = latent_dim
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden_dim, 3, stride=2),  # 28 -> 13
            nn.ReLU(),
            nn.Conv2d(hidden_dim, 2 * hidden_dim, 3, stride=2),  # 13 -> 6
            nn.ReLU(),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * hidden_dim * 6 * 6, 2 * latent_dim)


class ConvDecoder(ImageDecoder):
    """z ``(..., latent_dim)`` -> ``num_params`` tensors shaped ``(..., C, 28, 28)``."""

    def __init__(self, latent_dim: int, event_shape: Sequence[int], num_params: int = 1, hidden_dim: int = 32):
        super().__init__()
        channels, _, _ = check_image_shape(event_shape)
        self.event_shape = (channels, *IMAGE_SIZE)
        self.num_params = num_params
        self.hidden_dim = hidden_dim
        self.map_shape = (hidden_dim, 7, 7)
        self.project = nn.Sequential(nn.Linear(latent_dim, 7 * 7 * hidden_dim), nn.ReLU())
        self.body = nn.Sequential(
            nn.ConvTranspose2d(hidden_dim, 2 * hidden_dim, 3, stride=2, padding=1, output_padding=1),  # 7 -> 14
            nn.ReLU(),
            nn.ConvTranspose2d(2 * hidden_dim, hidden_dim, 3, stride=2, padding=1, output_padding=1),  # 14 -> 28
            nn.ReLU(),
            nn.ConvTranspose2d(hidden_dim, num_params * channels, 3, stride=1, padding=1),  # 28 -> 28
        )


def image_vae_builder(
    check: Callable[[Sequence[int]], Tuple[int, int, int]], encoder: type, decoder: type, doc: str
) -> Callable[..., VAE]:
    """The registry's builder of a VAE from an image encoder and decoder class: ``check`` refuses
    another image shape in one line; ``hidden_dim`` goes to both networks."""

    def build(
        event_shape: Sequence[int],
        latent_dim: int,
        hidden_dim: int,
        prior: Prior,
        likelihood: Likelihood,
        **data_info,
    ) -> VAE:
        event_shape = check(event_shape)
        return VAE(
            encoder(event_shape, latent_dim, hidden_dim),
            decoder(latent_dim, event_shape, likelihood.num_params, hidden_dim),
            prior,
            likelihood,
            event_shape,
        )

    build.__doc__ = doc
    return build


build_conv_vae = image_vae_builder(
    check_image_shape,
    ConvEncoder,
    ConvDecoder,
    "The ``conv`` model; ``hidden_dim`` is the number of filters of the first convolution.",
)


MODELS.register("conv", doc="TensorFlow's CVAE tutorial: strided conv encoder, transposed-conv decoder, 28x28 images")(
    ModelSpec(
        build_conv_vae,
        "TensorFlow's CVAE tutorial: two stride-2 convolutions in the encoder, transposed "
        "convolutions in the decoder, Bernoulli likelihood, 28x28 images",
        likelihood="bernoulli",
        latent_dim=2,
        hidden_dim=32,
    )
)
