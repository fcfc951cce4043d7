"""Networks: MLP encoders and decoders (AEVB appendix C). All accept extra leading batch dims."""

from __future__ import annotations

import math
from typing import Callable, Sequence, Tuple

import torch
from torch import Tensor, nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "identity": nn.Identity,  # linear maps (e.g. a linear-Gaussian model built from the same parts)
}


def mlp(sizes: Sequence[int], activation: str = "tanh") -> nn.Sequential:
    """Linear layers of the given sizes with ``activation`` between them (none after the last)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class GaussianMLPEncoder(nn.Module):
    """x -> (loc, scale) of a diagonal Gaussian q(z|x); the net outputs log sigma^2 (AEVB C.2).

    Input ``x`` has shape ``(..., *event_shape)``; outputs have shape ``(..., latent_dim)``.
    """

    def __init__(
        self,
        event_shape: Sequence[int],
        latent_dim: int,
        hidden_dims: Sequence[int] = (500,),
        activation: str = "tanh",
    ):
        super().__init__()
        self.event_shape = tuple(event_shape)
        self.latent_dim = latent_dim
        in_dim = math.prod(self.event_shape)
        self.body = mlp([in_dim, *hidden_dims], activation)
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
    """z -> ``num_params`` tensors shaped ``(..., *event_shape)`` for a likelihood."""

    def __init__(
        self,
        latent_dim: int,
        event_shape: Sequence[int],
        num_params: int = 1,
        hidden_dims: Sequence[int] = (500,),
        activation: str = "tanh",
    ):
        super().__init__()
        self.event_shape = tuple(event_shape)
        self.num_params = num_params
        out_dim = math.prod(self.event_shape)
        self.net = mlp([latent_dim, *hidden_dims, num_params * out_dim], activation)

    def forward(self, z: Tensor) -> Tuple[Tensor, ...]:
        out = self.net(z)
        batch = out.shape[:-1]
        return tuple(p.reshape(*batch, *self.event_shape) for p in out.chunk(self.num_params, -1))
