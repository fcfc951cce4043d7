"""Hierarchical VAEs: several stochastic layers z1 ... zL, each a named site in the data plate.

Models ``two_layer`` (Burda, Grosse & Salakhutdinov 2015, sec. 5), ``ladder`` (Sønderby,
Raiko, Maaløe, Sønderby & Winther 2016) and Burda's one-stochastic-layer baseline
``one_layer`` (a plain :class:`~ppl_vae.models.vae.VAE` with two hidden layers).

Generative path, shared by both hierarchical models (top-down, z_L first):
p(z_L) is the prior (N(0, I) by default), p(z_l | z_{l+1}) = N(mu_l(z_{l+1}), diag sigma_l(z_{l+1})^2)
from an MLP, and p(x | z_1) is the likelihood of an MLP decoder. Inference:

- :class:`HierarchicalVAE` (``two_layer``): bottom-up, q(z_1 | x) q(z_2 | z_1) ... q(z_L | z_{L-1}),
  each a diagonal Gaussian from an MLP (Burda et al.'s architecture).
- :class:`LadderVAE` (``ladder``): a deterministic bottom-up pass d_l = MLP_l(d_{l-1}) (d_0 = x)
  with Gaussian heads N(mu^_l, sigma^_l^2); then top-down, q(z_L | x) = N(mu^_L, sigma^_L^2) and
  q(z_l | z_{l+1}, x) is the precision-weighted product of N(mu^_l, sigma^_l^2) with the generative
  p(z_l | z_{l+1}) (Sønderby et al. 2016, sec. 2.2, eqs. 18-19: :func:`precision_weighted`). The
  guide shares the generative networks with the model, as in the paper.

Sites are named ``"z1"`` (bottom) ... ``"zL"`` (top); the model samples them top-down, so the
estimators' flat latent vector is [z_L, ..., z_1]. Both models declare the fast-path protocol
(:class:`ppl_vae.inference.latents.FastPair`) over every site; ``check_fast_path`` compares it
with the traced model and guide (the tests do).

**Per-layer KL warm-up.** ``kl_weight`` (the training loop's warm-up weight beta in [0, 1]) is
turned into one weight per layer, w_l = min(1, beta / f_l) for the fractions
``kl_warmup_fractions`` = (f_1, ..., f_L) in (0, 1]: layer l reaches weight 1 after the share
f_l of the warm-up (the KL term of layer l, log p(z_l | ...) - log q(z_l | ...), is scaled by
w_l in both model and guide). The default, every f_l = 1, is Sønderby et al.'s single linear
warm-up. Above 1 (after warm-up or a beta > 1 schedule) the loop's weight applies to every
layer. With non-uniform fractions the model declares ``kl_weight_per_site``, so training goes
through Pyro's traces (the fused ELBO scales all latent terms by one weight).

**Batch normalisation** (``batch_norm``; on by default for ``ladder``, off for ``two_layer``):
every hidden layer of every network (the inference or bottom-up MLPs, the generative
conditionals, the decoder) is linear, batch normalisation, activation, as Sønderby et al. train
the ladder; without it the ladder sits on the mean-image plateau (the decoder ignores z).
:class:`ppl_vae.models.networks.BatchNorm` normalises over all leading dims (particles and
datapoints alike), identically in the Pyro program and the fast path. In training mode a
datapoint's terms depend on its minibatch; the estimators score in eval mode (running
statistics, ``ppl_vae.inference.modes``), and the statistics are buffers of the state dict, so
checkpoints keep them and a resume continues exactly.

Sizes from the command line: ``--latent-dim`` is the top layer's size (z_L, the prior's) and
``--hidden-dim`` the first layer's hidden units; the second layer has twice the latent size
and half the hidden units, so the defaults 50 and 200 give Burda et al.'s 784-200-200-100
(z1) - 100-100-50 (z2). The model options ``z1_dim``, ``hidden_dims`` (one list per layer),
``activation``, ``kl_warmup_fractions``, ``latent_dims`` (any number of layers, bottom to top,
e.g. Sønderby et al.'s ``[64, 32, 16, 8, 4]``; layer l then has two hidden layers of
``hidden_dim // 2^(l-1)`` units unless ``hidden_dims`` says otherwise) and ``batch_norm`` set
them one by one.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Annotated, Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, Union, cast

import pyro
import torch
from pyro import distributions as dist
from pyro import poutine
from torch import Tensor, nn

from ppl_vae.models.densities import normal_draw, normal_log_prob
from ppl_vae.models.likelihoods import Likelihood
from ppl_vae.models.networks import ACTIVATIONS, GaussianMLPEncoder, MLPDecoder, hidden_body
from ppl_vae.models.priors import Prior, StandardNormalPrior, make_prior
from ppl_vae.models.vae import VAE, data_plate
from ppl_vae.models.zoo import MODELS, Choice, ModelSpec, PositiveInt, UnitFraction

Params = Tuple[Tensor, Tensor]

# the type of the model option `activation`, read by ppl_vae.models.zoo.check_model_options
Activation = Annotated[str, Choice(ACTIVATIONS)]


def site_names(num_layers: int) -> Tuple[str, ...]:
    """``("z1", ..., "zL")``, bottom to top."""
    return tuple(f"z{layer}" for layer in range(1, num_layers + 1))


def precision_weighted(loc_a: Tensor, scale_a: Tensor, loc_b: Tensor, scale_b: Tensor) -> Params:
    """(loc, scale) of the Gaussian proportional to N(loc_a, scale_a^2) N(loc_b, scale_b^2),
    element-wise (broadcast): precision 1/scale^2 = 1/scale_a^2 + 1/scale_b^2 and loc the
    precision-weighted mean (Sønderby et al. 2016, eqs. 18-19), in the form that avoids
    inverting small variances."""
    var_a, var_b = scale_a**2, scale_b**2
    total = var_a + var_b
    return (loc_a * var_b + loc_b * var_a) / total, (var_a * var_b / total).sqrt()


def _scaled(weight: float):
    return nullcontext() if weight == 1.0 else poutine.scale(scale=weight)


def _positive_ints(name: str, values) -> List[int]:
    values = list(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be a non-empty list of positive integers (one per layer), got {values!r}")
    return values


def _check_hidden(hidden_dims, num_layers: int) -> List[List[int]]:
    hidden = list(hidden_dims)
    if len(hidden) != num_layers:
        raise ValueError(
            f"hidden_dims must give one list of hidden sizes per stochastic layer ({num_layers}), got {hidden_dims!r}"
        )
    out = []
    for h in hidden:
        h = [h] if isinstance(h, int) and not isinstance(h, bool) else list(h)
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in h):
            raise ValueError(f"hidden_dims must hold lists of positive integers, got {hidden_dims!r}")
        out.append(h)
    return out


def _check_fractions(fractions, num_layers: int) -> Tuple[float, ...]:
    if fractions is None:
        return (1.0,) * num_layers
    values = list(fractions)
    if len(values) != num_layers or any(
        isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1 for f in values
    ):
        raise ValueError(
            f"kl_warmup_fractions must be {num_layers} numbers in (0, 1], one per layer (z1 first), got {fractions!r}"
        )
    return tuple(float(f) for f in values)


class HierarchicalVAE(VAE):
    """L stochastic layers with bottom-up inference (Burda et al. 2015): see the module docstring.

    ``latent_dims``: sizes of z_1 ... z_L (bottom to top; ``prior`` is over z_L).
    ``hidden_dims``: one list per layer (an integer: a list of one); layer l's list gives the hidden sizes of the networks
    into z_l (from x or z_{l-1}) and, mirrored, out of it (to x or z_{l-1}). ``activation``:
    a name from :data:`ppl_vae.models.networks.ACTIVATIONS` ("identity" makes every map linear).
    ``batch_norm``: batch normalisation in every hidden layer of every network (inference,
    generative, decoder; :class:`ppl_vae.models.networks.BatchNorm`, over all leading dims;
    None: the class's ``batch_norm_default``, False here). In training mode a datapoint's terms
    then depend on its minibatch; the estimators score in eval mode (running statistics).

    Parts: ``encoder`` (one Gaussian network per layer: q(z_1|x), q(z_2|z_1), ...),
    ``generative`` (p(z_l | z_{l+1}) for l = 1 .. L-1), ``decoder`` (p(x | z_1)), ``prior``
    (p(z_L)), ``likelihood``. ``latent_dim`` is the top layer's size (what the prior draws).
    """

    has_fast_path = True
    encoder_is_guide = False  # the guide is a chain of Gaussians, not the encoder's one Gaussian
    batch_norm_default = False
    """``batch_norm`` when the constructor is given None (the ladder's is True, as published)."""

    def __init__(
        self,
        event_shape: Sequence[int],
        latent_dims: Sequence[int],
        prior: Prior,
        likelihood: Likelihood,
        *,
        hidden_dims: Optional[Sequence[Union[int, Sequence[int]]]] = None,
        activation: str = "tanh",
        kl_warmup_fractions: Optional[Sequence[float]] = None,
        batch_norm: Optional[bool] = None,
    ):
        latent_dims = _positive_ints("latent_dims", latent_dims)
        batch_norm = self.batch_norm_default if batch_norm is None else bool(batch_norm)
        num_layers = len(latent_dims)
        hidden = _check_hidden([[200, 200]] * num_layers if hidden_dims is None else hidden_dims, num_layers)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if prior.latent_dim != latent_dims[-1]:
            raise ValueError(
                f"the prior is over {prior.latent_dim} dims but the top layer z{num_layers} has "
                f"{latent_dims[-1]} (latent_dims={latent_dims})"
            )
        if prior.uses_encoder:
            raise ValueError(
                f"a hierarchical model needs a prior that does not evaluate an encoder ({type(prior).__name__} does)"
            )
        event_shape = tuple(int(s) for s in event_shape)
        encoder = self._inference_networks(event_shape, latent_dims, hidden, activation, batch_norm)
        decoder = MLPDecoder(
            latent_dims[0],
            event_shape,
            likelihood.num_params,
            tuple(reversed(hidden[0])),
            activation,
            batch_norm=batch_norm,
        )
        super().__init__(encoder, decoder, prior, likelihood, event_shape)
        # p(z_l | z_{l+1}), l = 1 .. L-1: its hidden sizes mirror layer l+1's inference network
        self.generative = nn.ModuleList(
            GaussianMLPEncoder(
                (latent_dims[layer],),
                latent_dims[layer - 1],
                tuple(reversed(hidden[layer])),
                activation,
                batch_norm=batch_norm,
            )
            for layer in range(1, num_layers)
        )
        self.batch_norm = batch_norm
        """Whether every hidden layer of every network (inference, generative, decoder) is batch-normalised."""
        self.latent_dims = tuple(latent_dims)
        self.hidden_dims = tuple(tuple(h) for h in hidden)
        self.activation = activation
        self.kl_warmup_fractions = _check_fractions(kl_warmup_fractions, num_layers)
        self.kl_weight_per_site = any(f != 1.0 for f in self.kl_warmup_fractions)
        """True when layers get different KL weights: the fused ELBO (one weight) cannot serve it."""

    @staticmethod
    def _inference_networks(event_shape, latent_dims, hidden, activation, batch_norm: bool) -> nn.ModuleList:
        sizes = [None, *latent_dims]
        return nn.ModuleList(
            GaussianMLPEncoder(
                event_shape if layer == 0 else (sizes[layer],),
                latent_dims[layer],
                hidden[layer],
                activation,
                batch_norm=batch_norm,
            )
            for layer in range(len(latent_dims))
        )

    @property
    def inference_steps(self) -> nn.ModuleList:
        """``encoder`` as the list of its per-layer networks, bottom first."""
        return cast(nn.ModuleList, self.encoder)

    @property
    def num_layers(self) -> int:
        return len(self.latent_dims)

    @property
    def sites(self) -> Tuple[str, ...]:
        """The latent sites, bottom (``"z1"``) to top."""
        return site_names(self.num_layers)

    def kl_weights(self, kl_weight: float = 1.0) -> Tuple[float, ...]:
        """The KL weight of each layer (z1 first) for the training loop's ``kl_weight``."""
        if kl_weight >= 1.0:
            return (float(kl_weight),) * self.num_layers
        return tuple(min(1.0, float(kl_weight) / f) for f in self.kl_warmup_fractions)

    # Pyro model and guide

    def model(
        self, x: Tensor, y: Optional[Tensor] = None, *, num_data: Optional[int] = None, kl_weight: float = 1.0
    ) -> Tensor:
        """p(x, z_1..z_L) = p(z_L) prod_l p(z_l | z_{l+1}) p(x | z_1), top-down; returns z_1. ``y`` is ignored."""
        weights = self.kl_weights(kl_weight)
        top = self.num_layers
        with data_plate(x, num_data):
            with _scaled(weights[top - 1]):
                z = pyro.sample(f"z{top}", self.prior())
            for layer in range(top - 1, 0, -1):
                loc, scale = self.generative[layer - 1](z)
                with _scaled(weights[layer - 1]):
                    z = pyro.sample(f"z{layer}", dist.Normal(loc, scale).to_event(1))
            pyro.sample("x", self.likelihood(*self.decoder(z)), obs=x)
        return z

    def guide(
        self, x: Tensor, y: Optional[Tensor] = None, *, num_data: Optional[int] = None, kl_weight: float = 1.0
    ) -> Tensor:
        """q(z_1 | x) prod_l q(z_l | z_{l-1}), bottom-up; returns z_L. ``y`` is ignored."""
        weights = self.kl_weights(kl_weight)
        with data_plate(x, num_data):
            h = x
            for layer, net in enumerate(self.inference_steps, start=1):
                loc, scale = net(h)
                with _scaled(weights[layer - 1]):
                    h = pyro.sample(f"z{layer}", dist.Normal(loc, scale).to_event(1))
        return h

    # The fast-path protocol

    def latent_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """``{site: event_shape}`` in the model's (top-down) order."""
        return {f"z{layer}": (self.latent_dims[layer - 1],) for layer in range(self.num_layers, 0, -1)}

    def log_prior(self, x: Tensor, latents, y: Optional[Tensor] = None) -> Tensor:
        """log p(z_L) + sum_l log p(z_l | z_{l+1}), ``(*draws, N)``."""
        top = self.num_layers
        total = self.prior.log_prob(latents[f"z{top}"])
        for layer in range(top - 1, 0, -1):
            loc, scale = self.generative[layer - 1](latents[f"z{layer + 1}"])
            total = total + normal_log_prob(latents[f"z{layer}"], loc, scale).sum(-1)
        return total

    def log_likelihood(self, x: Tensor, latents, y: Optional[Tensor] = None) -> Tensor:
        """log p(x | z_1), ``(*draws, N)``."""
        return self.likelihood.log_prob(x, *self.decoder(latents["z1"]))

    def sample_guide(self, x: Tensor, num_particles: Optional[int] = None, y: Optional[Tensor] = None):
        """(``{site: draws}``, log q), the draws Pyro's guide makes (same calls, same order)."""
        latents: Dict[str, Tensor] = {}
        log_q: Any = 0.0
        h = x
        for layer, net in enumerate(self.inference_steps, start=1):
            loc, scale = net(h)
            h, log_q_layer = normal_draw(loc, scale, num_particles if layer == 1 else None)  # layers above inherit it
            latents[f"z{layer}"] = h
            log_q = log_q + log_q_layer
        return latents, log_q

    # Conveniences that bypass tracing

    def guide_means(self, x: Tensor) -> Dict[str, Params]:
        """{site: (loc, scale)} of the guide's Gaussians along its mean path (each z_l at its
        conditional mean given the layers the guide drew before it), ``(N, d_l)`` each."""
        out, h = {}, x
        for layer, net in enumerate(self.inference_steps, start=1):
            loc, scale = net(h)
            out[f"z{layer}"] = (loc, scale)
            h = loc
        return out

    def encode(self, x: Tensor) -> Params:
        """(loc, scale) of the top layer's q(z_L | ...) along the guide's mean path, ``(N, d_L)``."""
        return self.guide_means(x)[f"z{self.num_layers}"]

    def decode(self, z: Tensor) -> Tensor:
        """E[x | z_1] with z_1 ... z_{L-1} set to their conditional means given the top ``z`` ``(..., d_L)``."""
        for layer in range(self.num_layers - 1, 0, -1):
            z = self.generative[layer - 1](z)[0]
        return self.likelihood.mean(*self.decoder(z))

    def reconstruct(self, x: Tensor) -> Tensor:
        """E[x | z_1] at the guide's mean of z_1."""
        return self.likelihood.mean(*self.decoder(self.guide_means(x)["z1"][0]))


class _BottomUpStep(nn.Module):
    """d_l = act(MLP(d_{l-1})) and the Gaussian head (mu^_l, sigma^_l) on it; inputs may have
    leading batch dims. With no hidden sizes, d_l = d_{l-1}. ``batch_norm``: every hidden layer
    is linear, batch normalisation, activation (Sønderby et al. 2016)."""

    def __init__(
        self, in_dim: int, latent_dim: int, hidden_dims: Sequence[int], activation: str, batch_norm: bool = False
    ):
        super().__init__()
        self.body = hidden_body([in_dim, *hidden_dims], activation, batch_norm=batch_norm)
        self.act = ACTIVATIONS[activation]()
        self.out_dim = hidden_dims[-1] if hidden_dims else in_dim
        self.head = nn.Linear(self.out_dim, 2 * latent_dim)

    def forward(self, h: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        if len(self.body):
            h = self.act(self.body(h))
        loc, log_var = self.head(h).chunk(2, dim=-1)
        # The clamp keeps exp() finite early in training; it is inactive at sane values.
        return h, loc, torch.exp(0.5 * log_var.clamp(-30.0, 20.0))


class LadderVAE(HierarchicalVAE):
    """The ladder VAE (Sønderby et al. 2016): the generative path of :class:`HierarchicalVAE`,
    top-down inference that merges bottom-up and generative Gaussians by precision weighting.

    ``encoder`` holds the bottom-up steps (layer l's ``hidden_dims`` list is its deterministic
    MLP); the guide calls ``generative`` too, so those networks get gradients from both terms
    of the ELBO (as in the paper; for reweighted wake-sleep it means the guide's wake phase
    also moves them). ``batch_norm`` defaults to True here: the bottom-up MLPs, the generative
    conditionals and the decoder normalise every hidden layer, as in the paper.
    """

    has_fast_path = True  # its guide and sample_guide run the same bottom-up pass (tests compare them)
    batch_norm_default = True  # as Sønderby et al. train it: without it the ladder sits on the mean-image plateau

    @staticmethod
    def _inference_networks(event_shape, latent_dims, hidden, activation, batch_norm: bool) -> nn.ModuleList:
        steps, in_dim = [], math.prod(event_shape)
        for layer, d in enumerate(latent_dims):
            step = _BottomUpStep(in_dim, d, hidden[layer], activation, batch_norm)
            steps.append(step)
            in_dim = step.out_dim
        return nn.ModuleList(steps)

    def bottom_up(self, x: Tensor) -> List[Params]:
        """[(mu^_l, sigma^_l) for l = 1 .. L], each ``(N, d_l)``."""
        h = x.reshape(*x.shape[: x.dim() - len(self.event_shape)], -1)
        out = []
        for step in self.inference_steps:
            h, loc, scale = step(h)
            out.append((loc, scale))
        return out

    def _posterior(self, up: List[Params], layer: int, z_above: Optional[Tensor]) -> Params:
        """(loc, scale) of q(z_l | z_{l+1}, x): the top layer's bottom-up Gaussian, below it the
        precision-weighted merge with p(z_l | z_{l+1})."""
        if z_above is None:
            return up[layer - 1]
        p_loc, p_scale = self.generative[layer - 1](z_above)
        return precision_weighted(up[layer - 1][0], up[layer - 1][1], p_loc, p_scale)

    def guide(
        self, x: Tensor, y: Optional[Tensor] = None, *, num_data: Optional[int] = None, kl_weight: float = 1.0
    ) -> Tensor:
        """q(z_L | x) prod_l q(z_l | z_{l+1}, x), top-down; returns z_1. ``y`` is ignored."""
        weights = self.kl_weights(kl_weight)
        with data_plate(x, num_data):
            up = self.bottom_up(x)
            z = None
            for layer in range(self.num_layers, 0, -1):
                loc, scale = self._posterior(up, layer, z)
                with _scaled(weights[layer - 1]):
                    z = pyro.sample(f"z{layer}", dist.Normal(loc, scale).to_event(1))
        return cast(Tensor, z)

    def sample_guide(self, x: Tensor, num_particles: Optional[int] = None, y: Optional[Tensor] = None):
        """(``{site: draws}``, log q), top-down, the draws Pyro's guide makes."""
        up = self.bottom_up(x)
        latents: Dict[str, Tensor] = {}
        log_q: Any = 0.0
        z: Optional[Tensor] = None
        for layer in range(self.num_layers, 0, -1):
            loc, scale = self._posterior(up, layer, z)
            z, log_q_layer = normal_draw(loc, scale, num_particles if z is None else None)  # lower layers inherit it
            latents[f"z{layer}"] = z
            log_q = log_q + log_q_layer
        return latents, log_q

    def guide_and_prior(self, x: Tensor, num_particles: Optional[int] = None, y: Optional[Tensor] = None):
        """(latents, log q, log p(latents)) from one top-down pass: p(z_l | z_{l+1}) is computed
        once, for the precision-weighted q(z_l | z_{l+1}, x) and for log p (sample_guide then
        log_prior computes it twice; in training mode that also moved batch normalisation's running
        statistics twice per step). The same draws (the same standard-normal calls in the same
        order) and the same numbers. A subclass that changes ``log_prior`` or ``sample_guide``
        gets the two-pass composition of what it wrote."""
        if (
            type(self).log_prior is not HierarchicalVAE.log_prior
            or type(self).sample_guide is not LadderVAE.sample_guide
        ):
            return super().guide_and_prior(x, num_particles, y)
        up = self.bottom_up(x)
        latents: Dict[str, Tensor] = {}
        log_q: Any = 0.0
        log_p: Any = 0.0
        z: Optional[Tensor] = None
        for layer in range(self.num_layers, 0, -1):
            if z is None:
                loc, scale = up[layer - 1]
                z, log_q_layer = normal_draw(loc, scale, num_particles)
                log_p = self.prior.log_prob(z)
            else:
                p_loc, p_scale = self.generative[layer - 1](z)
                loc, scale = precision_weighted(up[layer - 1][0], up[layer - 1][1], p_loc, p_scale)
                z, log_q_layer = normal_draw(loc, scale)
                log_p = log_p + normal_log_prob(z, p_loc, p_scale).sum(-1)
            latents[f"z{layer}"] = z
            log_q = log_q + log_q_layer
        return latents, log_q, log_p

    def guide_means(self, x: Tensor) -> Dict[str, Params]:
        """{site: (loc, scale)} of q along its mean path (top-down, each z_l at its mean)."""
        up = self.bottom_up(x)
        out, z = {}, None
        for layer in range(self.num_layers, 0, -1):
            loc, scale = self._posterior(up, layer, z)
            out[f"z{layer}"] = (loc, scale)
            z = loc
        return out


# ---------------------------------------------------------------------------------------------
# The registry entries


DEFAULT_LATENT_DIM = 50  # the registry's latent_dim of two_layer and ladder (the top layer's size)


def _layer_sizes(
    latent_dim: int,
    hidden_dim: int,
    z1_dim: Optional[int],
    hidden_dims: Optional[Sequence[Union[int, Sequence[int]]]],
    latent_dims: Optional[Sequence[int]],
) -> Tuple[List[int], Sequence[Union[int, Sequence[int]]]]:
    """(latent sizes bottom to top, hidden sizes per layer) from the builder's arguments.

    Without ``latent_dims``: two layers, z1 = ``z1_dim`` (default 2 x ``latent_dim``), z2 =
    ``latent_dim``. With it: its sizes; the top must be ``latent_dim`` unless ``latent_dim`` is the
    model's default (then the top decides). Hidden sizes by default: layer l (from 1) has two
    layers of ``hidden_dim // 2^(l-1)`` units (Burda et al.'s 200-200, 100-100 for two layers;
    with ``--hidden-dim 512`` and five layers Sønderby et al.'s 512, 256, 128, 64, 32)."""
    if latent_dims is None:
        z1 = 2 * latent_dim if z1_dim is None else z1_dim
        if isinstance(z1, bool) or not isinstance(z1, int) or z1 < 1:
            raise ValueError(f"z1_dim must be a positive integer, got {z1_dim!r}")
        dims = [z1, latent_dim]
    else:
        if z1_dim is not None:
            raise ValueError(
                f"give z1_dim or latent_dims, not both (latent_dims={list(latent_dims)} sets z1 to its first entry)"
            )
        dims = _positive_ints("latent_dims", latent_dims)
        if latent_dim not in (dims[-1], DEFAULT_LATENT_DIM):
            raise ValueError(
                f"latent_dims={dims} puts {dims[-1]} units in the top layer but latent_dim is {latent_dim}: "
                f"leave latent_dim out or set it to {dims[-1]}"
            )
    hidden: Sequence[Union[int, Sequence[int]]] = (
        [[max(1, hidden_dim // 2**layer)] * 2 for layer in range(len(dims))] if hidden_dims is None else hidden_dims
    )
    return dims, hidden


def _top_prior(prior: Prior, top: int) -> Prior:
    """``prior``, or a standard normal over ``top`` dims where the builder was given one over the
    default size and ``latent_dims`` asks for another top layer."""
    if prior.latent_dim == top:
        return prior
    if type(prior) is StandardNormalPrior:
        return make_prior("standard_normal", top)
    raise ValueError(
        f"latent_dims puts {top} units in the top layer but the prior ({type(prior).__name__}) is over "
        f"{prior.latent_dim}: give --latent-dim {top}"
    )


def _hierarchy_builder(
    cls: Type[HierarchicalVAE], doc: str, batch_norm_default: bool
) -> Callable[..., HierarchicalVAE]:
    """The registry's builder of ``cls`` (sizes from :func:`_layer_sizes`)."""

    def build(
        event_shape: Sequence[int],
        latent_dim: int,
        hidden_dim: int,
        prior: Prior,
        likelihood: Likelihood,
        *,
        z1_dim: Optional[PositiveInt] = None,
        hidden_dims: Optional[Sequence[Union[PositiveInt, Sequence[PositiveInt]]]] = None,
        activation: Activation = "tanh",
        kl_warmup_fractions: Optional[Sequence[UnitFraction]] = None,
        latent_dims: Optional[Sequence[PositiveInt]] = None,
        batch_norm: bool = batch_norm_default,
        **data_info: Any,
    ) -> HierarchicalVAE:
        dims, hidden = _layer_sizes(latent_dim, hidden_dim, z1_dim, hidden_dims, latent_dims)
        return cls(
            event_shape,
            dims,
            _top_prior(prior, dims[-1]),
            likelihood,
            hidden_dims=hidden,
            activation=activation,
            kl_warmup_fractions=kl_warmup_fractions,
            batch_norm=batch_norm,
        )

    build.__doc__ = doc
    return build


build_two_layer = _hierarchy_builder(
    HierarchicalVAE,
    "The ``two_layer`` model: z2 has ``latent_dim`` units, z1 ``z1_dim`` (default twice that); "
    "``latent_dims`` gives any number of layers; ``batch_norm`` off by default.",
    batch_norm_default=False,
)
build_ladder = _hierarchy_builder(
    LadderVAE,
    "The ``ladder`` model, with the sizes of ``two_layer``; ``batch_norm`` on by default (Sønderby et al.).",
    batch_norm_default=True,
)


def build_one_layer(
    event_shape: Sequence[int],
    latent_dim: int,
    hidden_dim: int,
    prior: Prior,
    likelihood: Likelihood,
    *,
    activation: Activation = "tanh",
    **data_info,
) -> VAE:
    """Burda et al.'s one-stochastic-layer model: two hidden layers of ``hidden_dim`` each way."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    hidden = (hidden_dim, hidden_dim)
    encoder = GaussianMLPEncoder(event_shape, latent_dim, hidden, activation)
    decoder = MLPDecoder(latent_dim, event_shape, likelihood.num_params, hidden, activation)
    return VAE(encoder, decoder, prior, likelihood, event_shape)


MODELS.register("one_layer", doc="Burda et al. 2015, one stochastic layer: x-200-200-z(50), tanh, Bernoulli")(
    ModelSpec(
        build_one_layer,
        "Burda et al. 2015 (sec. 5), one stochastic layer: tanh MLPs x-200-200-z (50) and back, "
        "Bernoulli likelihood; latent site 'z'",
        likelihood="bernoulli",
        latent_dim=50,
        hidden_dim=200,
    )
)
MODELS.register("two_layer", doc="Burda et al. 2015, two stochastic layers z1 (100), z2 (50); bottom-up inference")(
    ModelSpec(
        build_two_layer,
        "Burda et al. 2015 (sec. 5), two stochastic layers: x-200-200-z1 (100)-100-100-z2 (50), tanh, "
        "generative path mirrored, Bernoulli likelihood; sites 'z1', 'z2'",
        likelihood="bernoulli",
        latent_dim=50,
        hidden_dim=200,
    )
)
MODELS.register("ladder", doc="Sønderby et al. 2016 ladder VAE: top-down precision-weighted inference, z1, z2")(
    ModelSpec(
        build_ladder,
        "Sønderby et al. 2016 ladder VAE with the two_layer sizes: bottom-up deterministic pass, top-down "
        "inference merging bottom-up and generative Gaussians by precision; per-layer KL warm-up "
        "(option kl_warmup_fractions); sites 'z1', 'z2'",
        likelihood="bernoulli",
        latent_dim=50,
        hidden_dim=200,
    )
)


__all__ = [
    "HierarchicalVAE",
    "LadderVAE",
    "build_ladder",
    "build_one_layer",
    "build_two_layer",
    "precision_weighted",
    "site_names",
]
