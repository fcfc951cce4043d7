"""Networks: MLP encoders and decoders (AEVB appendix C). All accept extra leading batch dims.

Batch normalisation (``batch_norm=True``, off by default) goes after the linear map of every
hidden layer, before its activation (Ioffe & Szegedy 2015; Sønderby et al. 2016 use it in every
deterministic layer of the ladder VAE); those linear maps then have no bias (the normalisation's
shift replaces it). :class:`BatchNorm` normalises over all leading dims, so particle dims
(K, N, C) are normalised as K * N rows; in eval mode it uses its running statistics.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence, Tuple, cast

import torch
from torch import Tensor, nn


def tanh(x: Tensor) -> Tensor:
    """``torch.tanh``; without autograd on CPU float32, computed as ``2 sigmoid(2x) - 1``.

    torch's CPU tanh costs 2-6 times its sigmoid (1.3-2.5 ns against 0.4 ns per float32 value,
    one AVX-512 thread, torch 2.13), and a tanh MLP spent a tenth of an IW evaluation there: the
    sigmoid form, four in-place passes, takes 0.6 ns. It is within 1.8e-7 of torch.tanh (1.5 ulp
    of 1, absolute: its relative error grows below |x| of about 1e-5, where a hidden unit's value
    is far below the float32 rounding of the next layer's sum). Where a graph is recorded (x
    requires grad) this is torch.tanh: there the form's extra autograd nodes cost what it saves
    (forward and backward, the form against torch.tanh: 88 against 96 us for 128 x 200 values,
    70 against 58 for 128 x 100, 1837 against 1559 for 1000 x 500), so training computes
    exactly what it did. Other dtypes and
    devices (float64, where the form is not faster; CUDA, where tanh is one instruction) call
    torch.tanh."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
        return torch.tanh(x)
    return x.mul(2).sigmoid_().mul_(2).sub_(1)


class Tanh(nn.Tanh):
    """``nn.Tanh`` through :func:`tanh` (the same function, faster on CPU float32)."""

    def forward(self, input: Tensor) -> Tensor:
        return tanh(input)


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": Tanh,
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "identity": nn.Identity,  # linear maps (e.g. a linear-Gaussian model built from the same parts)
}


class BatchNorm(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` over the last dim of an input with any number of leading dims: the
    statistics (and, in training mode, the running-statistics update) are over all of them, as
    if the input were reshaped to ``(-1, C)``. In eval mode the running statistics are used."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return super().forward(x)
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def mlp(sizes: Sequence[int], activation: str = "tanh", *, batch_norm: bool = False) -> nn.Sequential:
    """Linear layers of the given sizes with ``activation`` between them (none after the last).

    ``batch_norm``: a :class:`BatchNorm` after each linear map that an activation follows (every
    one but the last), which then has no bias."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        hidden = i < len(sizes) - 2
        layers.append(nn.Linear(n_in, n_out, bias=not (hidden and batch_norm)))
        if hidden:
            if batch_norm:
                layers.append(BatchNorm(n_out))
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def hidden_body(sizes: Sequence[int], activation: str = "tanh", *, batch_norm: bool = False) -> nn.Sequential:
    """The hidden layers of an encoder: :func:`mlp` of ``sizes`` whose output the caller passes
    through ``activation``; with ``batch_norm`` the last linear map too is normalised (and has no
    bias), so every hidden layer is linear, BatchNorm, activation."""
    if not batch_norm or len(sizes) < 2:
        return mlp(sizes, activation)
    body = mlp(sizes, activation, batch_norm=True)
    last = cast(nn.Linear, body[-1])
    body[-1] = nn.Linear(last.in_features, last.out_features, bias=False)
    body.append(BatchNorm(sizes[-1]))
    return body


class GaussianMLPEncoder(nn.Module):
    """x -> (loc, scale) of a diagonal Gaussian q(z|x); the net outputs log sigma^2 (AEVB C.2).

    Input ``x`` has shape ``(..., *event_shape)``; outputs have shape ``(..., latent_dim)``.
    ``batch_norm``: normalise every hidden layer (:func:`hidden_body`).
    """

    def __init__(
        self,
        event_shape: Sequence[int],
        latent_dim: int,
        hidden_dims: Sequence[int] = (500,),
        activation: str = "tanh",
        *,
        batch_norm: bool = False,
    ):
        super().__init__()
        self.event_shape = tuple(event_shape)
        self.latent_dim = latent_dim
        in_dim = math.prod(self.event_shape)
        self.body = hidden_body([in_dim, *hidden_dims], activation, batch_norm=batch_norm)
        self.act = ACTIVATIONS[activation]()
        self.head = nn.Linear(hidden_dims[-1] if hidden_dims else in_dim, 2 * latent_dim)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        h = x.reshape(*x.shape[: x.dim() - len(self.event_shape)], -1)
        if len(self.body):
            h = self.act(self.body(h))
        loc, log_var = self.head(h).chunk(2, dim=-1)
        # The clamp keeps exp() finite early in training; it is inactive at sane values.
        scale = torch.exp(0.5 * log_var.clamp(-30.0, 20.0))
        return loc, scale


class MLPDecoder(nn.Module):
    """z -> ``num_params`` tensors shaped ``(..., *event_shape)`` for a likelihood;
    ``batch_norm``: normalise every hidden layer (:func:`mlp`)."""

    has_linear_head: bool = True
    """Declares ``forward(z)`` = ``head(features(z))`` split into ``num_params`` parts and reshaped
    to the event, ``head`` an ``nn.Linear``: a likelihood that offers a fused scorer
    (:meth:`ppl_vae.models.likelihoods.Likelihood.linear_head_scorer`) then scores the features
    without materializing every parameter. A subclass that overrides ``forward``, ``features``
    or ``head`` without declaring ``has_linear_head`` itself loses the declaration."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "has_linear_head" not in vars(cls) and any(name in vars(cls) for name in ("forward", "features", "head")):
            cls.has_linear_head = False

    def __init__(
        self,
        latent_dim: int,
        event_shape: Sequence[int],
        num_params: int = 1,
        hidden_dims: Sequence[int] = (500,),
        activation: str = "tanh",
        *,
        batch_norm: bool = False,
    ):
        super().__init__()
        self.event_shape = tuple(event_shape)
        self.num_params = num_params
        out_dim = math.prod(self.event_shape)
        self.net = mlp([latent_dim, *hidden_dims, num_params * out_dim], activation, batch_norm=batch_norm)

    @property
    def head(self) -> nn.Linear:
        """The last layer: the decoder's output is ``head(features(z))``."""
        return cast(nn.Linear, self.net[-1])

    def features(self, z: Tensor) -> Tensor:
        """The last hidden layer's activations (the input of :attr:`head`), ``(..., hidden)``."""
        for layer in list(self.net)[:-1]:
            z = layer(z)
        return z

    def forward(self, z: Tensor) -> Tuple[Tensor, ...]:
        out = self.net(z)
        batch = out.shape[:-1]
        return tuple(p.reshape(*batch, *self.event_shape) for p in out.chunk(self.num_params, -1))
