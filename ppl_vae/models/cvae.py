"""The conditional VAE (model ``cvae``; Doersch 2016, "Tutorial on Variational Autoencoders", sec. 4).

A label y (an integer class, one-hot inside the networks) conditions both the decoder and
the encoder: p(x, z | y) = p(z) p(x | z, y) and q(z | x, y). The prior stays N(0, I) (any
registered prior works); only the networks see y. Generation conditioned on a label decodes
z ~ p(z) with the chosen y; the same z under different labels gives the same "style" in
different classes.

Contract: ``model(x, y)`` and ``guide(x, y)`` keep the sites "z" and "x" in the "data" plate,
so training, the ELBO and the importance-weighted estimates work unchanged with ``y=labels``.
Networks accept extra leading batch dims (a particle dim in front of z); y is broadcast.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union, cast

import pyro
import torch
import torch.nn.functional as F
from pyro import distributions as dist
from pyro import poutine
from torch import Tensor, nn

from ppl_vae.models.likelihoods import Likelihood
from ppl_vae.models.networks import ACTIVATIONS, mlp
from ppl_vae.models.priors import Prior
from ppl_vae.models.vae import VAE, data_plate
from ppl_vae.models.zoo import MODELS, ModelSpec


def conditioned(net: nn.Sequential, h: Tensor, y_onehot: Tensor) -> Tensor:
    """``net(cat([h, y_onehot], -1))`` with the two broadcast against each other, computed without
    building the concatenation: the first linear map is split into its columns for ``h`` and
    for ``y_onehot`` (W [h; y] + b = W_h h + W_y y + b), so ``h`` goes through it once however
    many labels it is paired with (an enumerated site's C values: C times fewer products in
    that layer). The same function as before, to float rounding."""
    first = cast(nn.Linear, net[0])
    width = h.shape[-1]
    out = F.linear(h, first.weight[:, :width], first.bias) + F.linear(y_onehot, first.weight[:, width:])
    return net[1:](out)


class ConditionalGaussianEncoder(nn.Module):
    """(x ``(..., *event_shape)``, one-hot y ``(..., num_classes)``) -> (loc, scale) of q(z|x,y)."""

    def __init__(
        self,
        event_shape: Sequence[int],
        num_classes: int,
        latent_dim: int,
        hidden_dims: Sequence[int] = (500, 500),
        activation: str = "relu",
    ):
        super().__init__()
        self.event_shape = tuple(event_shape)
        self.latent_dim = latent_dim
        self.net = mlp([math.prod(self.event_shape) + num_classes, *hidden_dims], activation)
        self.act = ACTIVATIONS[activation]()
        self.head = nn.Linear(hidden_dims[-1], 2 * latent_dim)

    def forward(self, x: Tensor, y_onehot: Tensor) -> Tuple[Tensor, Tensor]:
        h = x.reshape(*x.shape[: x.dim() - len(self.event_shape)], -1)
        loc, log_var = self.head(self.act(conditioned(self.net, h, y_onehot))).chunk(2, dim=-1)
        # The clamp keeps exp() finite early in training; it is inactive at sane values.
        return loc, torch.exp(0.5 * log_var.clamp(-30.0, 20.0))


class ConditionalDecoder(nn.Module):
    """(z ``(..., latent_dim)``, one-hot y ``(..., num_classes)``) -> ``num_params`` tensors
    shaped ``(..., *event_shape)`` for the likelihood of p(x | z, y)."""

    def __init__(
        self,
        latent_dim: int,
        num_classes: int,
        event_shape: Sequence[int],
        num_params: int = 1,
        hidden_dims: Sequence[int] = (500, 500),
        activation: str = "relu",
    ):
        super().__init__()
        self.event_shape = tuple(event_shape)
        self.num_params = num_params
        self.net = mlp([latent_dim + num_classes, *hidden_dims, num_params * math.prod(self.event_shape)], activation)

    def forward(self, z: Tensor, y_onehot: Tensor) -> Tuple[Tensor, ...]:
        out = conditioned(self.net, z, y_onehot)
        batch = out.shape[:-1]
        return tuple(p.reshape(*batch, *self.event_shape) for p in out.chunk(self.num_params, -1))


class ConditionalVAE(VAE):
    """A VAE whose encoder and decoder also take a class label y (Doersch 2016, sec. 4).

    ``y`` is an integer tensor ``(N,)`` with values in ``[0, num_classes)``, one per datapoint.
    """

    evidence = "log p(x | y)"  # the label is given: the ELBO bounds the conditional evidence

    has_fast_path = False  # model/guide differ from the parts-based VAE's: analysis goes through traces
    encoder_is_guide = True  # its guide is the encoder's Gaussian given (x, y)
    num_classes: int  # always set here (Optional only on the base class)

    def __init__(
        self,
        encoder: ConditionalGaussianEncoder,
        decoder: ConditionalDecoder,
        prior: Prior,
        likelihood: Likelihood,
        event_shape: Sequence[int],
        num_classes: int,
    ):
        super().__init__(encoder, decoder, prior, likelihood, event_shape)
        self.num_classes = int(num_classes)

    def one_hot(self, y: Union[Tensor, int, None], batch_size: Optional[int] = None) -> Tensor:
        """Labels as a float one-hot tensor ``(N, num_classes)``; bad labels raise ValueError."""
        if y is None:
            raise ValueError("the conditional model 'cvae' needs labels: pass y, an integer tensor of shape (N,)")
        param = next(self.parameters())
        y = torch.as_tensor(y, device=param.device)
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"labels y must be integers, got dtype {y.dtype}")
        if y.dim() == 0:
            y = y.expand(batch_size if batch_size is not None else 1)
        if y.dim() != 1 or (batch_size is not None and y.shape[0] != batch_size):
            raise ValueError(
                f"labels y must have shape ({batch_size if batch_size is not None else 'N'},), got {tuple(y.shape)}"
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(
                f"labels y must lie in [0, {self.num_classes - 1}] for this model, got values in "
                f"[{int(y.min())}, {int(y.max())}]"
            )
        return F.one_hot(y.long(), self.num_classes).to(param.dtype)

    def model(  # type: ignore[override]
        self, x: Tensor, y: Optional[Tensor] = None, *, num_data: Optional[int] = None, kl_weight: float = 1.0
    ) -> Tensor:
        """p(x, z | y) = p(z) p(x | z, y), with ``x`` observed; returns z."""
        y_onehot = self.one_hot(y, x.shape[0])
        with data_plate(x, num_data):
            with poutine.scale(scale=kl_weight):
                z = pyro.sample("z", self.prior())
            pyro.sample("x", self.likelihood(*self.decoder(z, y_onehot)), obs=x)
        return z

    def guide(  # type: ignore[override]
        self, x: Tensor, y: Optional[Tensor] = None, *, num_data: Optional[int] = None, kl_weight: float = 1.0
    ) -> Tensor:
        """q(z | x, y) = N(z; encoder(x, y)), the amortized conditional guide."""
        y_onehot = self.one_hot(y, x.shape[0])
        with data_plate(x, num_data):
            loc, scale = self.encoder(x, y_onehot)
            with poutine.scale(scale=kl_weight):
                return pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # Conveniences that bypass tracing; each needs the labels.

    def encode(self, x: Tensor, y: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:  # type: ignore[override]
        """(loc, scale) of q(z|x,y), each ``(N, latent_dim)``."""
        return self.encoder(x, self.one_hot(y, x.shape[0]))

    def decode_params(self, z: Tensor, y: Union[Tensor, int, None]) -> Tuple[Tensor, ...]:
        """Raw decoder outputs for p(x | z, y); ``y`` is ``(N,)`` or one int, z ``(..., N, latent_dim)``."""
        return self.decoder(z, self.one_hot(y, z.shape[-2] if z.dim() >= 2 else None))

    def decode(self, z: Tensor, y: Union[Tensor, int, None] = None) -> Tensor:  # type: ignore[override]
        """E[x | z, y] under the likelihood, shape ``(..., *event_shape)``."""
        return self.likelihood.mean(*self.decode_params(z, y))

    def reconstruct(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:  # type: ignore[override]
        """E[x | z = E_q[z|x,y], y]."""
        return self.decode(self.encode(x, y)[0], y)

    def sample(self, num_samples: int, y: Union[Tensor, int, None] = None) -> Tensor:  # type: ignore[override]
        """E[x | z, y] for ``num_samples`` draws z ~ p(z); ``y`` one label, ``(num_samples,)``
        labels, or None for labels drawn uniformly."""
        z = self.prior().sample((num_samples,))
        if y is None:
            y = torch.randint(self.num_classes, (num_samples,), device=z.device)
        return self.decode(z, y)


def build_cvae(
    event_shape: Sequence[int],
    latent_dim: int,
    hidden_dim: int,
    prior: Prior,
    likelihood: Likelihood,
    num_classes: Optional[int] = None,
    **data_info,
) -> ConditionalVAE:
    """The ``cvae`` model: ReLU MLPs with two hidden layers of ``hidden_dim`` units each."""
    if num_classes is None:
        raise ValueError(
            "model 'cvae' is conditional and needs labelled data (data_info must give num_classes); "
            "choose a dataset with labels (digits, mnist, fashion-mnist, or an .npz with labels)"
        )
    if int(num_classes) < 2:
        raise ValueError(f"model 'cvae' needs num_classes >= 2, got {num_classes}")
    hidden = (hidden_dim, hidden_dim)
    encoder = ConditionalGaussianEncoder(event_shape, int(num_classes), latent_dim, hidden)
    decoder = ConditionalDecoder(latent_dim, int(num_classes), event_shape, likelihood.num_params, hidden)
    return ConditionalVAE(encoder, decoder, prior, likelihood, event_shape, int(num_classes))


MODELS.register("cvae", doc="Doersch 2016: conditional VAE, p(x|z,y) and q(z|x,y) given a class label y")(
    ModelSpec(
        build_cvae,
        "Doersch 2016 (sec. 4): conditional VAE, ReLU MLP encoder q(z|x,y) and Bernoulli "
        "decoder p(x|z,y), y a one-hot class label; needs labelled data",
        likelihood="bernoulli",
        latent_dim=10,
        hidden_dim=500,
    )
)
