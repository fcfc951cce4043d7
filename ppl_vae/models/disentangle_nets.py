"""The published architectures of disentanglement studies on 64x64 images (dSprites): models
``chen_mlp`` and ``conv64``.

``chen_mlp``, Chen et al. (2018), "Isolating sources of disentanglement in VAEs" (beta-TC-VAE),
their dSprites MLP as in the authors' code (``vae_quant.py``, ``MLPEncoder``/``MLPDecoder``):
encoder 4096-1200-1200-(2 x 10) with ReLU, decoder 10-1200-1200-1200-4096 with tanh, Bernoulli
logits, z of 10 dimensions. ``hidden_dim`` (1,200) is the width of every hidden layer. The
authors' encoder outputs (mean, log sigma) per dimension; here, as every encoder of this library,
(mean, log sigma^2): the same family of q(z|x), another parameterisation of its last layer.
Their training (code defaults): Adam 1e-3, batches of 2,048, 50 epochs of the 737,280 images.

``conv64``, the convolutional architecture of Locatello et al. (2019), "Challenging common
assumptions in the unsupervised learning of disentangled representations", Table 1, as
disentanglement_lib's ``conv_encoder``/``deconv_decoder`` (the code behind the published
numbers) builds it: encoder conv 32 4x4 stride 2, conv 32 4x4 s2, conv 64 **2x2** s2, conv 64
2x2 s2 (ReLU; "same" padding: 64 -> 32 -> 16 -> 8 -> 4), FC 256 ReLU, FC 2 x 10; decoder FC 256
ReLU, FC 4x4x64 ReLU, transposed conv 64 4x4 s2, 32 4x4 s2, 32 4x4 s2 (ReLU), then channels 4x4
s2 (64x64 Bernoulli logits). ``hidden_dim`` (256) is the width of the FC layer of each side; the
channel counts are the paper's. Their training: Adam 1e-4 (beta1 0.9, beta2 0.999, eps 1e-8),
batches of 64, 300,000 steps.

Both are plain ``VAE(encoder, decoder, prior, likelihood, event_shape)`` assemblies, so they have
the parts-based VAE's fast path (the fused ELBO, importance weights without tracing). Their
networks accept extra leading batch dims (the importance-weighted estimator puts a particle dim
in front of z): ``conv64`` flattens them before its convolutions and restores them after, the
MLPs map the last dim. ``chen_mlp``'s decoder is a :class:`~ppl_vae.models.networks.MLPDecoder`,
whose last layer is linear (``has_linear_head``: the Bernoulli scorer fuses it); ``conv64``'s
ends in a transposed convolution and declares no linear head.
"""

from __future__ import annotations

from typing import Sequence, Tuple

from torch import nn

from ppl_vae.models.conv import ImageDecoder, ImageEncoder, image_vae_builder
from ppl_vae.models.likelihoods import Likelihood
from ppl_vae.models.networks import GaussianMLPEncoder, MLPDecoder
from ppl_vae.models.priors import Prior
from ppl_vae.models.vae import VAE
from ppl_vae.models.zoo import MODELS, ModelSpec

IMAGE_SIZE = (64, 64)


def check_image_shape_64(event_shape: Sequence[int], model: str, channels: bool = True) -> Tuple[int, int, int]:
    """``(C, 64, 64)`` (``C`` = 1 unless ``channels``) or a one-line ValueError naming the
    expected shape."""
    shape = tuple(int(s) for s in event_shape)
    ok = len(shape) == 3 and shape[1:] == IMAGE_SIZE and (shape[0] >= 1 if channels else shape[0] == 1)
    if not ok:
        expected = "(channels, 64, 64), e.g. (1, 64, 64)" if channels else "(1, 64, 64)"
        raise ValueError(f"model {model!r} needs 64x64 images with event shape {expected} for dSprites; got {shape}")
    return shape  # type: ignore[return-value]


# -- chen_mlp ---------------------------------------------------------------------------------


def build_chen_mlp(
    event_shape: Sequence[int],
    latent_dim: int,
    hidden_dim: int,
    prior: Prior,
    likelihood: Likelihood,
    **data_info,
) -> VAE:
    """The ``chen_mlp`` model: ``hidden_dim`` units in each of the encoder's two ReLU layers and
    the decoder's three tanh layers."""
    event_shape = check_image_shape_64(event_shape, "chen_mlp", channels=False)
    encoder = GaussianMLPEncoder(event_shape, latent_dim, (hidden_dim, hidden_dim), activation="relu")
    decoder = MLPDecoder(latent_dim, event_shape, likelihood.num_params, (hidden_dim,) * 3, "tanh")
    return VAE(encoder, decoder, prior, likelihood, event_shape)


# -- conv64 -----------------------------------------------------------------------------------


class Conv64Encoder(ImageEncoder):
    """x ``(..., C, 64, 64)`` -> (loc, scale) of a diagonal Gaussian, each ``(..., latent_dim)``."""

    def __init__(self, event_shape: Sequence[int], latent_dim: int, hidden_dim: int = 256):
        super().__init__()
        channels, _, _ = check_image_shape_64(event_shape, "conv64")
        self.event_shape = (channels, *IMAGE_SIZE)
        self.latent_dim = latent_dim
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 4, stride=2, padding=1),  # 64 -> 32 (TF "same")
            nn.ReLU(),
            nn.Conv2d(32, 32, 4, stride=2, padding=1),  # 32 -> 16
            nn.ReLU(),
            nn.Conv2d(32, 64, 2, stride=2),  # 16 -> 8 ("same" pads nothing for 2x2, stride 2)
            nn.ReLU(),
            nn.Conv2d(64, 64, 2, stride=2),  # 8 -> 4
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, hidden_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(hidden_dim, 2 * latent_dim)


class Conv64Decoder(ImageDecoder):
    """z ``(..., latent_dim)`` -> ``num_params`` tensors shaped ``(..., C, 64, 64)``."""

    def __init__(self, latent_dim: int, event_shape: Sequence[int], num_params: int = 1, hidden_dim: int = 256):
        super().__init__()
        channels, _, _ = check_image_shape_64(event_shape, "conv64")
        self.event_shape = (channels, *IMAGE_SIZE)
        self.num_params = num_params
        self.map_shape = (64, 4, 4)
        self.project = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 64 * 4 * 4), nn.ReLU()
        )
        self.body = nn.Sequential(
            nn.ConvTranspose2d(64, 64, 4, stride=2, padding=1),  # 4 -> 8 (TF "same")
            nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1),  # 8 -> 16
            nn.ReLU(),
            nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1),  # 16 -> 32
            nn.ReLU(),
            nn.ConvTranspose2d(32, num_params * channels, 4, stride=2, padding=1),  # 32 -> 64
        )


build_conv64 = image_vae_builder(
    lambda event_shape: check_image_shape_64(event_shape, "conv64"),
    Conv64Encoder,
    Conv64Decoder,
    "The ``conv64`` model; ``hidden_dim`` is the width of the FC layer of each side (256).",
)


MODELS.register("chen_mlp", doc="Chen et al. 2018's dSprites MLP (4096-1200-1200 ReLU / 1200x3 tanh), 64x64 images")(
    ModelSpec(
        build_chen_mlp,
        "Chen et al. 2018 (beta-TC-VAE), dSprites MLP: encoder 4096-1200-1200 ReLU, decoder "
        "10-1200-1200-1200 tanh to 4096 Bernoulli logits, 64x64 images",
        likelihood="bernoulli",
        latent_dim=10,
        hidden_dim=1200,
    )
)
MODELS.register("conv64", doc="Locatello et al. 2019's convolutional VAE (disentanglement_lib), 64x64 images")(
    ModelSpec(
        build_conv64,
        "Locatello et al. 2019, Table 1 (disentanglement_lib): four stride-2 convolutions, FC 256 and "
        "the transposed mirror, Bernoulli likelihood, 64x64 images",
        likelihood="bernoulli",
        latent_dim=10,
        hidden_dim=256,
    )
)
