"""Priors p(z): modules whose ``forward()`` returns a Distribution with event shape (latent_dim,).

Learnable priors keep their parameters as ordinary module parameters, so they train with
the decoder. Add a prior by subclassing :class:`Prior` and registering it in :data:`PRIORS`.
"""

from __future__ import annotations

import inspect
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from pyro import distributions as dist
from pyro.distributions import transforms as T
from torch import Tensor, nn

from ppl_vae.models.densities import normal_log_prob
from ppl_vae.registry import Registry

PRIORS: Registry = Registry("prior")


class Prior(nn.Module):
    """Base class: ``latent_dim`` is the size of z.

    Capabilities are declared, not probed: ``uses_encoder`` is True for a prior whose density
    evaluates the VAE's encoder (the VampPrior), so methods that train the encoder and the
    generative model separately (wake-sleep) can refuse it.
    """

    uses_encoder: bool = False

    def __init__(self, latent_dim: int):
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        self.latent_dim = latent_dim

    def forward(self) -> dist.Distribution:  # pragma: no cover - abstract
        raise NotImplementedError

    def log_prob(self, z: Tensor) -> Tensor:
        """log p(z) for ``z`` ``(..., latent_dim)`` -> ``(...)``: the distribution's own; a prior
        with a closed form may compute it without building a distribution (the fused ELBO calls
        this every step)."""
        return self().log_prob(z)

    def attach_to(self, encoder: nn.Module, event_shape: Sequence[int], *, num_classes: Optional[int] = None) -> None:
        """Called by :func:`ppl_vae.models.build_vae` once the VAE is assembled, with its encoder,
        the datapoint shape and its class count (None unless conditional). A prior that needs
        them (the VampPrior evaluates the encoder) declares :attr:`uses_encoder` and takes them
        here. Default: nothing."""


@PRIORS.register("standard_normal")
class StandardNormalPrior(Prior):
    """N(0, I), the prior of AEVB."""

    loc: Tensor  # buffers
    scale: Tensor

    def __init__(self, latent_dim: int):
        super().__init__(latent_dim)
        # Buffers, so the prior follows the module to the chosen device.
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)

    def log_prob(self, z: Tensor) -> Tensor:
        return normal_log_prob(z).sum(-1)


@PRIORS.register(
    "mixture_of_gaussians", doc="a learnable mixture of diagonal Gaussians; options num_components (10), init_scale"
)
class MixtureOfGaussiansPrior(Prior):
    """A learnable mixture of ``num_components`` diagonal Gaussians (weights, means, scales)."""

    def __init__(self, latent_dim: int, num_components: int = 10, init_scale: float = 1.0):
        super().__init__(latent_dim)
        if isinstance(num_components, bool) or not isinstance(num_components, int) or num_components < 1:
            raise ValueError(f"num_components must be an integer >= 1, got {num_components!r}")
        if not (init_scale >= 0 and math.isfinite(init_scale)):
            raise ValueError(f"init_scale must be a finite number >= 0, got {init_scale}")
        self.num_components = num_components
        self.logits = nn.Parameter(torch.zeros(num_components))
        self.locs = nn.Parameter(torch.randn(num_components, latent_dim) * init_scale)
        # softplus(0.5413) = 1: components start with unit scale.
        self.raw_scales = nn.Parameter(torch.full((num_components, latent_dim), 0.5413))

    def forward(self) -> dist.Distribution:
        components = dist.Normal(self.locs, F.softplus(self.raw_scales) + 1e-4).to_event(1)
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), components)


@PRIORS.register(
    "vamp",
    doc="VampPrior (Tomczak & Welling 2018): mixture of the encoder's q(z|u_k) at learned "
    "pseudo-inputs u_k; options num_components (50), init_loc, init_scale",
)
class VampPrior(Prior):
    """VampPrior: p(z) = (1/K) sum_k q(z | u_k), the encoder at K learned pseudo-inputs (Tomczak & Welling 2018).

    ``num_components`` K pseudo-inputs u_k, each of the datapoint's shape, start at
    ``init_loc + init_scale * N(0, 1)`` (0.5 and 0.1 suit data in [0, 1]). The encoder is the
    VAE's own (shared, not copied), attached by :meth:`attach_to` when ``build_vae`` assembles
    the model; it is held without registering it as a submodule, so its parameters appear once,
    under ``encoder.``. Needs an encoder of x alone that returns (loc, scale).
    """

    def __init__(self, latent_dim: int, num_components: int = 50, init_loc: float = 0.5, init_scale: float = 0.1):
        super().__init__(latent_dim)
        if isinstance(num_components, bool) or not isinstance(num_components, int) or num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components!r}")
        if not (init_scale >= 0 and math.isfinite(init_scale)):
            raise ValueError(f"init_scale must be a finite number >= 0, got {init_scale}")
        if not math.isfinite(init_loc):
            raise ValueError(f"init_loc must be a finite number, got {init_loc}")
        self.num_components = num_components
        self.init_loc, self.init_scale = float(init_loc), float(init_scale)
        self.register_parameter("pseudo_inputs", None)  # created by attach_to: it needs the datapoint shape
        self._encoder: tuple = ()  # (encoder,): a tuple so nn.Module does not register it

    def log_prob(self, z: Tensor) -> Tensor:
        """log p(z) for ``z`` ``(..., latent_dim)`` -> ``(...)``: the distribution's own; a prior
        with a closed form may compute it without building a distribution (the fused ELBO calls
        this every step)."""
        return self().log_prob(z)

    uses_encoder = True

    def attach_to(self, encoder: nn.Module, event_shape: Sequence[int], *, num_classes: Optional[int] = None) -> None:
        if num_classes is not None:
            raise ValueError("prior 'vamp' needs an encoder of x alone; this model conditions on labels")
        shape = (self.num_components, *event_shape)
        pseudo = self.init_loc + self.init_scale * torch.randn(shape)
        device = next(iter(encoder.parameters()), torch.empty(0)).device
        self.pseudo_inputs = nn.Parameter(pseudo.to(device))
        self._encoder = (encoder,)
        probe = self.pseudo_inputs.detach().clone().requires_grad_(True)
        try:
            with torch.enable_grad():
                loc, _ = encoder(probe)
        except Exception as exc:  # e.g. an encoder of token ids
            raise ValueError(
                f"prior 'vamp' needs an encoder of real-valued x; {type(encoder).__name__} failed on "
                f"pseudo-inputs of shape {tuple(shape)}: {exc}"
            ) from None
        # an encoder that rounds its input to token ids runs, but its pseudo-inputs would never train
        grad = torch.autograd.grad(loc.sum(), probe, allow_unused=True)[0] if loc.requires_grad else None
        if grad is None or not bool(grad.abs().sum() > 0):  # none, or zero everywhere (torch.round)
            raise ValueError(
                f"prior 'vamp' needs an encoder differentiable in real-valued x; {type(encoder).__name__} "
                "passes no gradient to its input (it reads token ids, or rounds its input), so the pseudo-inputs "
                "could not train"
            )
        if tuple(loc.shape) != (self.num_components, self.latent_dim):
            raise ValueError(
                f"prior 'vamp': the encoder returned loc of shape {tuple(loc.shape)}, "
                f"expected {(self.num_components, self.latent_dim)}"
            )

    def forward(self) -> dist.Distribution:
        if not self._encoder or self.pseudo_inputs is None:
            raise ValueError(
                "the VampPrior has no encoder: build the VAE with build_vae, or call prior.attach_to(vae.encoder, vae.event_shape)"
            )
        loc, scale = self._encoder[0](self.pseudo_inputs)
        components = dist.Normal(loc, scale).to_event(1)
        logits = loc.new_zeros(self.num_components)  # equal weights 1/K
        return dist.MixtureSameFamily(dist.Categorical(logits=logits), components)


@PRIORS.register(
    "flow",
    doc="N(0, I) through learned affine autoregressive transforms (a MAF prior); options num_flows (2), hidden_dims",
)
class FlowPrior(Prior):
    """N(0, I) pushed through ``num_flows`` learned affine autoregressive transforms (a MAF prior).

    Each transform is Pyro's :class:`~pyro.distributions.transforms.AffineAutoregressive`, used
    in the inverse direction (Papamakarios et al. 2017), so log p(z) of the guide's draws takes
    one network pass per transform; sampling takes latent_dim passes. ``hidden_dims``: the
    autoregressive networks' hidden sizes (default ``[3 * latent_dim + 1]``, Pyro's). Needs
    latent_dim >= 2.
    """

    loc: Tensor  # buffers
    scale: Tensor

    def __init__(self, latent_dim: int, num_flows: int = 2, hidden_dims: Optional[Sequence[int]] = None):
        super().__init__(latent_dim)
        if latent_dim < 2:
            raise ValueError(f"prior 'flow' needs latent_dim >= 2 (autoregressive transforms), got {latent_dim}")
        if isinstance(num_flows, bool) or not isinstance(num_flows, int) or num_flows < 1:
            raise ValueError(f"num_flows must be >= 1, got {num_flows!r}")
        hidden = _hidden_dims(hidden_dims, 3 * latent_dim + 1)
        self.transforms = nn.ModuleList(T.affine_autoregressive(latent_dim, hidden) for _ in range(num_flows))
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self) -> dist.Distribution:
        base = dist.Normal(self.loc, self.scale).to_event(1)
        for t in self.transforms:  # each distribution starts with an empty cache of (x, y) pairs: a z
            t._cached_x_y = None, None  # type: ignore[assignment]  # scored again after a backward (MCEM): freed graph
        return dist.TransformedDistribution(base, [t.inv for t in self.transforms])


def _hidden_dims(hidden_dims: Optional[Sequence[int]], default: int) -> list:
    """``hidden_dims`` as a list of positive ints (``[default]`` when None)."""
    if hidden_dims is None:
        return [default]
    if isinstance(hidden_dims, int) and not isinstance(hidden_dims, bool):
        hidden_dims = [hidden_dims]
    dims = list(hidden_dims)
    if not dims or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in dims):
        raise ValueError(f"hidden_dims must be a non-empty list of positive integers, got {hidden_dims!r}")
    return dims


def check_options(kind: str, name: str, factory, options: dict, skip: int) -> None:
    """Raise a one-line ValueError when ``options`` has a key ``factory`` does not take.

    ``skip``: how many leading positional parameters are not options (e.g. latent_dim).
    """
    params = list(inspect.signature(factory).parameters.values())[skip:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    allowed = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in options if k not in allowed]
    if unknown:
        takes = f"it takes {', '.join(allowed)}" if allowed else "it takes no options"
        raise ValueError(f"{kind} {name!r} has no option {unknown[0]!r}; {takes}")


def make_prior(name: str, latent_dim: int, **options) -> Prior:
    """Build a registered prior by name; options go to its constructor (unknown ones: ValueError)."""
    cls = PRIORS.get(name)
    check_options("prior", name, cls, options, skip=1)
    return cls(latent_dim, **options)
