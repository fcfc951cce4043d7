"""Plain PyTorch versions of four ppl_vae models, written the way a careful user would write them
by hand: no ppl_vae import, no Pyro, one function per training loss.

- :class:`PlainHierarchical` is ``two_layer`` (Burda et al. 2015: bottom-up inference
  q(z_1|x) q(z_2|z_1) ..., top-down generation p(z_L) p(z_{L-1}|z_L) ... p(x|z_1)).
- :class:`PlainLadder` is ``ladder`` (Sønderby et al. 2016: a deterministic bottom-up pass, then
  top-down inference merging each bottom-up Gaussian with p(z_l | z_{l+1}) by precision;
  batch normalisation in every hidden layer, as the library's default).
- :class:`PlainM2` is ``m2`` (Kingma et al. 2014, semi-supervised): y summed out exactly for the
  unlabelled points, q(y|x) a point mass at the label for the labelled ones, plus the classifier
  term (alpha / num_labelled) log q(y|x) of each labelled point in training mode.
- :class:`PlainGMVAE` is ``gmvae``: c ~ Cat(pi), z | c ~ N(mu_c, sigma_c^2), x | z; q(c|x) q(z|x,c),
  c summed out exactly.

Each has the library model's architecture and parameter names, so :func:`load_from_library`
copies a library model's ``state_dict`` (and which parameters train) into it, and
:func:`from_library` builds the twin of a library model (duck-typed: it reads the sizes off the
model's attributes). ``loss(x, y=None, *, num_data)`` is the library's training objective: the
negative ELBO summed over the minibatch and scaled by ``num_data / batch_size``, one
reparameterized draw per latent (per enumerated value for m2 and gmvae, all values at once as a
``(C, N, ...)`` batch), drawn with the same ``torch.randn`` calls in the same order as the
library, so at the same RNG state the two give the same number.

Written for speed the way one would by hand: Bernoulli log-likelihood with
``binary_cross_entropy_with_logits``; Gaussian densities from their formula, with log q at its own
draw z = loc + eps * scale written as -eps^2/2 - log scale (the same value and the same gradient),
and the 1/2 log 2 pi constants left out (each latent has one in log p and one in log q: they
cancel); each network evaluated once per step (the library's ladder runs p(z_l | z_{l+1}) twice,
in its guide and in its model, and M2's classifier twice); for m2 and gmvae the first layer of
q(z | x, c), a linear map of [x, onehot(c)], is split into W_x x (once per datapoint) plus the
column W_c (once per value) instead of a (C, N, D + C) concatenated input, and likewise for M2's
decoder input [z, onehot(y)].
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "softplus": nn.Softplus, "elu": nn.ELU, "identity": nn.Identity}


def hidden_layers(sizes: Sequence[int], activation: str, batch_norm: bool) -> List[nn.Module]:
    """Linear, [BatchNorm1d], activation for each consecutive pair of ``sizes``; under batch
    normalisation the linear maps have no bias (the normalisation's shift replaces it)."""
    layers: List[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers.append(nn.Linear(n_in, n_out, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(n_out))
        layers.append(ACTIVATIONS[activation]())
    return layers


class GaussianNet(nn.Module):
    """h -> (features, loc, log scale): hidden layers, then a linear head to (loc, log variance),
    the log variance clamped to [-30, 20] (as the library's, inactive at sane values)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: Sequence[int], activation: str, batch_norm: bool):
        super().__init__()
        self.body = nn.Sequential(*hidden_layers([in_dim, *hidden], activation, batch_norm))
        self.head = nn.Linear(hidden[-1], 2 * out_dim)

    def forward(self, h: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        h = self.body(h)
        loc, log_var = self.head(h).chunk(2, dim=-1)
        return h, loc, 0.5 * log_var.clamp(-30.0, 20.0)


class Decoder(nn.Module):
    """z -> Bernoulli logits: hidden layers and a linear output layer."""

    def __init__(self, in_dim: int, out_dim: int, hidden: Sequence[int], activation: str, batch_norm: bool = False):
        super().__init__()
        self.net = nn.Sequential(
            *hidden_layers([in_dim, *hidden], activation, batch_norm), nn.Linear(hidden[-1], out_dim)
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


def bernoulli_log_lik(logits: Tensor, x: Tensor) -> Tensor:
    """log p(x | logits) summed over the last dim; ``x`` ``(N, D)`` broadcast to ``logits`` ``(..., N, D)``."""
    return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)


def scaled(neg_elbo: Tensor, batch_size: int, num_data: Optional[int]) -> Tensor:
    return neg_elbo if num_data is None else neg_elbo * (num_data / batch_size)


class PlainHierarchical(nn.Module):
    """``two_layer``: L diagonal-Gaussian layers, inference bottom-up, generation top-down."""

    batch_norm_default = False  # batch_norm=None: the class's default (the ladder's is True)

    def __init__(
        self,
        x_dim: int,
        latent_dims: Sequence[int],
        hidden_dims: Sequence[Sequence[int]],
        activation: str = "tanh",
        batch_norm: Optional[bool] = None,
    ):
        super().__init__()
        batch_norm = self.batch_norm_default if batch_norm is None else batch_norm
        num_layers = len(latent_dims)
        self.encoder = self.inference_networks(x_dim, latent_dims, hidden_dims, activation, batch_norm)
        self.decoder = Decoder(latent_dims[0], x_dim, list(reversed(hidden_dims[0])), activation, batch_norm)
        # p(z_l | z_{l+1}) for l = 1 .. L-1 (index l - 1)
        self.generative = nn.ModuleList(
            GaussianNet(latent_dims[i], latent_dims[i - 1], list(reversed(hidden_dims[i])), activation, batch_norm)
            for i in range(1, num_layers)
        )

    @staticmethod
    def inference_networks(x_dim, latent_dims, hidden_dims, activation, batch_norm) -> nn.ModuleList:
        """q(z_1 | x), q(z_2 | z_1), ...: layer l reads z_{l-1}."""
        inputs = [x_dim, *latent_dims[:-1]]
        return nn.ModuleList(
            GaussianNet(inputs[i], latent_dims[i], hidden_dims[i], activation, batch_norm)
            for i in range(len(latent_dims))
        )

    def loss(self, x: Tensor, y: Optional[Tensor] = None, *, num_data: Optional[int] = None) -> Tensor:
        """-ELBO of the minibatch scaled by ``num_data / len(x)``; ``y`` is ignored."""
        x = x.flatten(1)
        zs: List[Tensor] = []
        elbo: Any = 0.0
        h = x
        for net in self.encoder:  # z_1 first: the library's draw order
            _, loc, log_scale = net(h)
            eps = torch.randn_like(loc)
            h = loc + eps * log_scale.exp()
            zs.append(h)
            elbo = elbo + (0.5 * eps.square() + log_scale).sum(-1)  # -log q(z_l | ...)
        elbo = elbo - 0.5 * zs[-1].square().sum(-1)  # log p(z_L)
        for layer in range(len(zs) - 1, 0, -1):
            _, loc, log_scale = self.generative[layer - 1](zs[layer])
            elbo = elbo - (0.5 * ((zs[layer - 1] - loc) / log_scale.exp()).square() + log_scale).sum(-1)
        elbo = elbo + bernoulli_log_lik(self.decoder(zs[0]), x)
        return scaled(-elbo.sum(), x.shape[0], num_data)


class PlainLadder(PlainHierarchical):
    """``ladder``: the generative path of :class:`PlainHierarchical`; a deterministic bottom-up
    pass d_l = MLP_l(d_{l-1}) with Gaussian heads, then top-down q(z_L|x) = the top head and
    q(z_l | z_{l+1}, x) the precision-weighted product of the head with p(z_l | z_{l+1})."""

    batch_norm_default = True

    @staticmethod
    def inference_networks(x_dim, latent_dims, hidden_dims, activation, batch_norm) -> nn.ModuleList:
        """The bottom-up steps: step l reads step l-1's features (x for the first)."""
        inputs = [x_dim, *(h[-1] for h in hidden_dims[:-1])]
        return nn.ModuleList(
            GaussianNet(inputs[i], latent_dims[i], hidden_dims[i], activation, batch_norm)
            for i in range(len(latent_dims))
        )

    def loss(self, x: Tensor, y: Optional[Tensor] = None, *, num_data: Optional[int] = None) -> Tensor:
        """-ELBO of the minibatch scaled by ``num_data / len(x)``; ``y`` is ignored."""
        x = x.flatten(1)
        up: List[Tuple[Tensor, Tensor]] = []
        h = x
        for step in self.encoder:
            h, loc, log_scale = step(h)
            up.append((loc, log_scale))
        loc, log_scale = up[-1]  # q(z_L | x)
        eps = torch.randn_like(loc)
        z = loc + eps * log_scale.exp()
        elbo = (0.5 * eps.square() + log_scale - 0.5 * z.square()).sum(-1)  # log p(z_L) - log q(z_L | x)
        for layer in range(len(up) - 1, 0, -1):
            _, p_loc, p_log_scale = self.generative[layer - 1](z)  # p(z_l | z_{l+1}), once for q and p
            p_scale = p_log_scale.exp()
            d_loc, d_log_scale = up[layer - 1]
            var_d, var_p = d_log_scale.exp().square(), p_scale.square()
            total = var_d + var_p
            q_loc = (d_loc * var_p + p_loc * var_d) / total
            q_scale = (var_d * var_p / total).sqrt()
            eps = torch.randn_like(q_loc)
            z = q_loc + eps * q_scale
            log_p = -(0.5 * ((z - p_loc) / p_scale).square() + p_log_scale)
            elbo = elbo + (log_p + 0.5 * eps.square() + q_scale.log()).sum(-1)
        elbo = elbo + bernoulli_log_lik(self.decoder(z), x)
        return scaled(-elbo.sum(), x.shape[0], num_data)


class Classifier(nn.Module):
    """x -> log q(c | x): a ReLU MLP and a log-softmax."""

    def __init__(self, x_dim: int, num_values: int, hidden_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(x_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, num_values))

    def forward(self, x: Tensor) -> Tensor:
        return torch.log_softmax(self.net(x), -1)


def concat_onehot_linear(layer: nn.Linear, v: Tensor, num_values: int) -> Tensor:
    """``layer([v, onehot(c)])`` for every value c at once, ``(C, N, out)``: W_v v + b plus
    W_c's column c, without building the concatenated input. ``v`` is ``(N, in)`` (the same for
    every c) or ``(C, N, in)`` (row c goes with value c)."""
    width = layer.in_features - num_values
    columns = layer.weight[:, width:].t()  # (C, out): the one-hot's contribution of each value
    return F.linear(v, layer.weight[:, :width], layer.bias) + columns.unsqueeze(1)


class ConditionalEncoder(nn.Module):
    """(x, c) -> (loc, log scale) of q(z | x, c) for every value c: ``(C, N, latent)`` each."""

    def __init__(self, x_dim: int, num_values: int, latent_dim: int, hidden_dim: int):
        super().__init__()
        self.num_values = num_values
        self.net = nn.Sequential(nn.Linear(x_dim + num_values, hidden_dim))
        self.head = nn.Linear(hidden_dim, 2 * latent_dim)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        h = torch.relu(concat_onehot_linear(self.net[0], x, self.num_values))
        loc, log_var = self.head(h).chunk(2, dim=-1)
        return loc, 0.5 * log_var.clamp(-30.0, 20.0)


class ConditionalDecoder(nn.Module):
    """z ``(C, N, latent)``, row c drawn given value c -> Bernoulli logits of p(x | z, c), ``(C, N, D)``."""

    def __init__(self, latent_dim: int, num_values: int, x_dim: int, hidden_dim: int):
        super().__init__()
        self.num_values = num_values
        self.net = nn.Sequential(
            nn.Linear(latent_dim + num_values, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, x_dim)
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.net[2](torch.relu(concat_onehot_linear(self.net[0], z, self.num_values)))


def enumerated_elbo(log_q: Tensor, terms: Tensor) -> Tensor:
    """sum_c q(c|x) [terms_c - log q(c|x)] per datapoint: ``log_q`` ``(N, C)``, ``terms`` ``(C, N)``."""
    log_q = log_q.t()
    return (log_q.exp() * (terms - log_q)).sum(0)


class PlainM2(nn.Module):
    """``m2``: p(y) uniform, p(z) = N(0, I), p(x | y, z); q(y | x) q(z | x, y), ReLU MLPs."""

    def __init__(self, x_dim: int, num_classes: int, latent_dim: int, hidden_dim: int, alpha: float, num_labelled: int):
        super().__init__()
        self.num_classes = num_classes
        self.classifier_weight = alpha / num_labelled
        self.classifier = Classifier(x_dim, num_classes, hidden_dim)
        self.encoder = ConditionalEncoder(x_dim, num_classes, latent_dim, hidden_dim)
        self.decoder = ConditionalDecoder(latent_dim, num_classes, x_dim, hidden_dim)

    def loss(self, x: Tensor, y: Optional[Tensor] = None, *, num_data: Optional[int] = None) -> Tensor:
        """-ELBO scaled by ``num_data / len(x)``: labels ``y`` ``(N,)``, -1 for unlabelled (None: all unlabelled)."""
        x = x.flatten(1)
        num_classes = self.num_classes
        log_q_y = self.classifier(x)  # (N, C)
        loc, log_scale = self.encoder(x)  # (C, N, d): q(z | x, y) for every y
        eps = torch.randn_like(loc)
        z = loc + eps * log_scale.exp()
        logits = self.decoder(z)  # (C, N, D): p(x | z_y, y) for every y
        # log p(x|z,y) + log p(y) + log p(z) - log q(z|x,y), one row per class
        terms = bernoulli_log_lik(logits, x) + (0.5 * (eps.square() - z.square()) + log_scale).sum(-1)
        terms = terms - math.log(num_classes)
        unlabelled = enumerated_elbo(log_q_y, terms)
        if y is None:
            return scaled(-unlabelled.sum(), x.shape[0], num_data)
        labelled = y >= 0
        label = y.clamp_min(0)
        elbo = torch.where(labelled, terms.gather(0, label.unsqueeze(0)).squeeze(0), unlabelled).sum()
        if self.training and self.classifier_weight != 0:
            log_q_label = log_q_y.gather(1, label.unsqueeze(1)).squeeze(1)
            elbo = elbo + self.classifier_weight * torch.where(labelled, log_q_label, 0.0).sum()
        return scaled(-elbo, x.shape[0], num_data)


class MixturePrior(nn.Module):
    """The mixture's weights (logits), means and scales (softplus(raw) + 1e-4)."""

    def __init__(self, num_components: int, latent_dim: int, learn_weights: bool = False):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_components), requires_grad=learn_weights)
        self.locs = nn.Parameter(torch.randn(num_components, latent_dim))
        self.raw_scales = nn.Parameter(torch.full((num_components, latent_dim), 0.5413))


class PlainGMVAE(nn.Module):
    """``gmvae``: c ~ Cat(softmax(logits)), z | c ~ N(mu_c, sigma_c^2), p(x | z); q(c | x) q(z | x, c)."""

    def __init__(self, x_dim: int, num_components: int, latent_dim: int, hidden_dim: int, learn_weights: bool = False):
        super().__init__()
        self.num_components = num_components
        self.classifier = Classifier(x_dim, num_components, hidden_dim)
        self.encoder = ConditionalEncoder(x_dim, num_components, latent_dim, hidden_dim)
        self.decoder = Decoder(latent_dim, x_dim, [hidden_dim], "relu")
        self.prior = MixturePrior(num_components, latent_dim, learn_weights)

    def loss(self, x: Tensor, y: Optional[Tensor] = None, *, num_data: Optional[int] = None) -> Tensor:
        """-ELBO of the minibatch scaled by ``num_data / len(x)``; ``y`` is ignored."""
        x = x.flatten(1)
        log_q_c = self.classifier(x)  # (N, C)
        loc, log_scale = self.encoder(x)  # (C, N, d)
        eps = torch.randn_like(loc)
        z = loc + eps * log_scale.exp()
        prior = self.prior
        scales = F.softplus(prior.raw_scales) + 1e-4  # (C, d)
        log_pz = -(0.5 * ((z - prior.locs.unsqueeze(1)) / scales.unsqueeze(1)).square()).sum(-1)
        log_pz = log_pz - scales.log().sum(-1, keepdim=True)  # (C, N)
        terms = bernoulli_log_lik(self.decoder(z), x) + log_pz + (0.5 * eps.square() + log_scale).sum(-1)
        terms = terms + torch.log_softmax(prior.logits, -1).unsqueeze(1)  # + log p(c)
        return scaled(-enumerated_elbo(log_q_c, terms).sum(), x.shape[0], num_data)


def load_from_library(plain: nn.Module, vae: nn.Module) -> nn.Module:
    """Copy ``vae``'s weights and buffers (the library model's ``state_dict``, whose names the
    plain model shares), which parameters train, and its train/eval mode into ``plain``; entries
    the plain model has no use for (the standard-normal prior's constant buffers, the GMVAE's step
    counter) are skipped. Raises ValueError when a plain entry is missing or has another shape."""
    source = vae.state_dict()
    target = plain.state_dict()
    missing = [k for k in target if k not in source]
    wrong = [
        f"{k}: {tuple(source[k].shape)} vs {tuple(t.shape)}"
        for k, t in target.items()
        if k in source and source[k].shape != t.shape
    ]
    if missing or wrong:
        raise ValueError(f"the library model does not match the plain one: missing {missing}, shapes {wrong}")
    plain.load_state_dict({k: source[k] for k in target})
    trains = dict(vae.named_parameters())
    for name, p in plain.named_parameters():
        p.requires_grad_(trains[name].requires_grad)
    plain.train(vae.training)
    return plain.to(next(vae.parameters()).device)


def from_library(name: str, vae: Any) -> nn.Module:
    """The plain twin of the library model ``vae`` (``two_layer``, ``ladder``, ``m2`` or ``gmvae``,
    Bernoulli likelihood), with its weights (:func:`load_from_library`)."""
    if type(vae.likelihood).__name__ != "BernoulliLikelihood":
        raise ValueError(f"the plain models have a Bernoulli likelihood; {name} has {type(vae.likelihood).__name__}")
    x_dim = math.prod(vae.event_shape)
    plain: nn.Module
    if name in ("two_layer", "ladder"):
        if type(vae.prior).__name__ != "StandardNormalPrior":
            raise ValueError(f"the plain {name} has p(z_L) = N(0, I); the library model has {type(vae.prior).__name__}")
        cls = PlainLadder if name == "ladder" else PlainHierarchical
        plain = cls(x_dim, vae.latent_dims, vae.hidden_dims, vae.activation, vae.batch_norm)
    elif name == "m2":
        hidden = vae.encoder.head.in_features
        plain = PlainM2(x_dim, vae.num_values, vae.latent_dim, hidden, vae.alpha, vae.num_labelled)
    elif name == "gmvae":
        if getattr(vae, "relaxed", False):
            raise ValueError("the plain GMVAE is the discrete (enumerated) model, not the relaxed one")
        hidden = vae.encoder.head.in_features
        plain = PlainGMVAE(x_dim, vae.num_values, vae.latent_dim, hidden)
    else:
        raise ValueError(f"no plain version of {name!r}; one of two_layer, ladder, m2, gmvae")
    return load_from_library(plain, vae)


PLAIN_MODELS: Dict[str, type] = {
    "two_layer": PlainHierarchical,
    "ladder": PlainLadder,
    "m2": PlainM2,
    "gmvae": PlainGMVAE,
}
