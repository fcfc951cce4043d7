"""The estimator core: latents as named sites, and the one place that picks the fast path.

Every estimator (ELBO, importance weighting, the MIS gap decomposition, mean-field q*, local
flows, AIS/BDMC, the appendix-D HMC estimator) sees a model through three questions:

1. Which latent sites does it have? :func:`model_layout` traces the model once and returns a
   :class:`Layout`: every continuous latent site in the ``"data"`` plate with its event shape
   (flattened, in the model's order, into one vector of ``layout.size`` numbers per datapoint
   for estimators that move a point in latent space), plus the discrete sites the model marks
   for enumeration (``infer={"enumerate": "parallel"}``), which are summed out exactly. A
   discrete site that is not marked is refused with a one-line error naming it.
2. What is log p(x, latents) per datapoint? :func:`log_joint` / :func:`log_prior_and_likelihood`.
3. What are the guide's draws and their log q? :func:`sample_guide`.

**The fast path is an explicit protocol** (:class:`FastPair`): an object whose ``model`` and
``guide`` are the callables given, that declares ``has_fast_path = True`` and offers
``log_prior(x, latents)``, ``log_likelihood(x, latents)`` and ``sample_guide(x, num_particles)``
(per-datapoint log densities, no tracing). :class:`ppl_vae.models.VAE` is one; a subclass
keeps the fast path whatever it overrides, and one whose ``model`` or ``guide`` changes the
numbers declares ``has_fast_path = False`` (or overrides the protocol's methods to match).
Any other pair goes through Pyro traces and gives the same numbers (tests check both paths
on the same models). :func:`check_fast_path` compares the two for a user's own pair.
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Tuple, cast, runtime_checkable

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions.constraints import MixtureSameFamilyConstraint

from ppl_vae.inference.traces import PARTICLE_PLATE, LogProbs, log_probs, trace_pair

Latents = Dict[str, Tensor]


@runtime_checkable
class FastPair(Protocol):
    """A model/guide pair that scores latents without tracing (see the module docstring).

    ``latents`` maps site names to tensors ``(*sample_shape, N, *event_shape)``; every method
    returns per-datapoint values ``(*sample_shape, N)``. ``y`` carries the dataset's labels.
    """

    has_fast_path: bool

    def model(self, x: Tensor, y: Optional[Tensor] = None, **kwargs: Any) -> Any: ...

    def guide(self, x: Tensor, y: Optional[Tensor] = None, **kwargs: Any) -> Any: ...

    def log_prior(self, x: Tensor, latents: Mapping[str, Tensor], y: Optional[Tensor] = None) -> Tensor: ...

    def log_likelihood(self, x: Tensor, latents: Mapping[str, Tensor], y: Optional[Tensor] = None) -> Tensor: ...

    def sample_guide(
        self, x: Tensor, num_particles: Optional[int] = None, y: Optional[Tensor] = None
    ) -> Tuple[Latents, Tensor]: ...


FAST_PATH_KWARGS = frozenset({"y"})
"""Keyword arguments the protocol's methods take; a call with others goes through traces."""


def declares_fast_path(pair: Any) -> bool:
    """Whether ``pair`` offers the protocol: it declares ``has_fast_path`` and has its members.
    The declaration is its class's, so a member set on the instance (``vae.model = ...``, one of
    ``model``, ``guide`` and the class's ``fast_path_members``) is a program it does not cover."""
    if not getattr(pair, "has_fast_path", False) or not isinstance(pair, FastPair):
        return False
    members = {"model", "guide", *getattr(type(pair), "fast_path_members", ())}
    return not any(name in vars(pair) for name in members)


def fast_pair(
    model: Callable, guide: Optional[Callable] = None, kwargs: Mapping[str, Any] = {}, x: Optional[Tensor] = None
) -> Optional[Any]:
    """The object whose protocol serves ``model`` (and ``guide``), or None for the traced path.

    ``model`` (and ``guide``, when given) must be that object's own ``model``/``guide`` (bound
    methods compare equal when they are the same object's), the object must declare
    ``has_fast_path``, and ``kwargs`` must be ones the protocol takes. With the data ``x`` about
    to be scored, a class from outside the library is checked against its Pyro program the
    first time (:func:`verify_declared_fast_path`): a declaration the class does not keep is a
    ValueError, not the base class's numbers.
    """
    owner = getattr(model, "__self__", None)
    if owner is None or not declares_fast_path(owner):
        return None
    if model != owner.model or (guide is not None and guide != owner.guide):
        return None
    if set(kwargs) - FAST_PATH_KWARGS:
        return None
    if x is not None:
        verify_declared_fast_path(owner, x, **kwargs)
    return owner


# ---------------------------------------------------------------------------------------------
# Sites


@dataclass(frozen=True)
class Site:
    """A continuous latent site: its name and event shape."""

    name: str
    event_shape: Tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.event_shape)) if self.event_shape else 1


@dataclass(frozen=True)
class Layout:
    """The model's latent sites: continuous ones flattened into one vector per datapoint.

    ``sites``: the continuous latent sites in the order the model samples them; a point of
    the latent space is a tensor ``(..., size)`` whose columns ``offsets[i]:offsets[i] +
    sites[i].size`` hold site i. ``enumerated``: discrete sites the model sums out.
    """

    sites: Tuple[Site, ...]
    enumerated: Tuple[str, ...] = ()

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(s.name for s in self.sites)

    @property
    def size(self) -> int:
        return sum(s.size for s in self.sites)

    @property
    def offsets(self) -> Tuple[int, ...]:
        out, total = [], 0
        for s in self.sites:
            out.append(total)
            total += s.size
        return tuple(out)

    def split(self, flat: Tensor) -> Latents:
        """``(..., size)`` -> ``{site: (..., *event_shape)}``."""
        out = {}
        for site, start in zip(self.sites, self.offsets):
            out[site.name] = flat[..., start : start + site.size].reshape(flat.shape[:-1] + site.event_shape)
        return out

    def join(self, latents: Mapping[str, Tensor], batch_dims: int) -> Tensor:
        """``{site: (*batch, *event_shape)}`` -> ``(*batch, size)``; ``batch_dims`` = len(batch)."""
        missing = [n for n in self.names if n not in latents]
        if missing:
            raise ValueError(f"latents lack site(s) {', '.join(map(repr, missing))}")
        parts = [latents[s.name].reshape(latents[s.name].shape[:batch_dims] + (s.size,)) for s in self.sites]
        return torch.cat(parts, -1)

    def column_sites(self) -> np.ndarray:
        """The site name of each column of the flat vector, ``(size,)``."""
        return (
            np.concatenate([np.full(s.size, s.name, dtype=object) for s in self.sites])
            if self.sites
            else np.empty(0, dtype=object)
        )

    def column_index(self) -> np.ndarray:
        """Each column's index within its own site (flattened), ``(size,)``."""
        return np.concatenate([np.arange(s.size) for s in self.sites]) if self.sites else np.empty(0, dtype=int)

    def single(self) -> Site:
        """The one continuous site (a ValueError naming the sites when there are several)."""
        if len(self.sites) != 1:
            raise ValueError(f"this needs a model with one latent site; it has {', '.join(self.names) or 'none'}")
        return self.sites[0]


def _is_real(support: constraints.Constraint) -> bool:
    # a mixture's support is its components' (torch wraps it in MixtureSameFamilyConstraint)
    while isinstance(support, (constraints.independent, MixtureSameFamilyConstraint)):
        support = support.base_constraint
    return (
        support is constraints.real or isinstance(support, type(constraints.real_vector)) or support == constraints.real
    )


def _infer(site: Any) -> Dict[str, Any]:
    return site.get("infer") or {}


def _enumerated(site: Any) -> bool:
    return _infer(site).get("enumerate") == "parallel"


def _fn(site: Any) -> Any:
    """A sample site's distribution."""
    return site["fn"]


def _latent_sample_sites(trace: poutine.Trace):
    for name, site in trace.nodes.items():
        if (
            site["type"] == "sample"
            and not site["is_observed"]
            and not _infer(site).get("is_auxiliary")
            and not site_is_subsample(site)
        ):
            yield name, site


@torch.no_grad()
def _probe_rows(x: Tensor, kwargs: Mapping[str, Any]) -> Tuple[Tensor, Dict[str, Any]]:
    """(at most) the first two rows of ``x``, and of each tensor kwarg with one row per datapoint:
    what a structural probe trace runs on."""
    n = min(int(x.shape[0]), 2)
    kw = {k: (v[:n] if torch.is_tensor(v) and v.dim() and v.shape[0] == x.shape[0] else v) for k, v in kwargs.items()}
    return x[:n], kw


def model_layout(model: Callable, x: Tensor, *, continuous_only: bool = True, **kwargs: Any) -> Layout:
    """The :class:`Layout` of ``model``'s latent sites, from one trace on (a few rows of) ``x``.

    Every latent site must be in the ``"data"`` plate (its value ``(N, *event_shape)``).
    Continuous sites must have real support (a site on (0, inf) needs a transform to the
    real line first). A discrete site is summed out when the model marks it with
    ``infer={"enumerate": "parallel"}`` and refused otherwise (with ``continuous_only``).
    """
    xb, kw = _probe_rows(x, kwargs)
    n = xb.shape[0]
    with torch.random.fork_rng(devices=[]):  # a structural probe: it must not advance the caller's stream
        trace = poutine.trace(poutine.block(model, hide_types=["param"])).get_trace(xb, **kw)
    sites, enumerated = [], []
    for name, site in _latent_sample_sites(trace):
        fn = site["fn"]
        if fn.support.is_discrete:
            if _enumerated(site) and getattr(fn, "has_enumerate_support", False):
                enumerated.append(name)
                continue
            if continuous_only:
                raise ValueError(
                    f"latent site {name!r} is discrete: mark it infer={{'enumerate': 'parallel'}} in the model "
                    "so that it is summed out, or use an estimator that samples it from the guide (iw, elbo)"
                )
            continue
        value = site["value"]
        if value.dim() < 1 or value.shape[0] != n:
            raise ValueError(
                f"latent site {name!r} has value shape {tuple(value.shape)}: every latent site must sit "
                f"in the 'data' plate at dim -1 (one value per datapoint)"
            )
        if not _is_real(fn.support):
            raise ValueError(
                f"latent site {name!r} has support {fn.support}, not the real line: these estimators "
                "move latents freely; reparameterize it (e.g. sample its log) in the model"
            )
        sites.append(Site(name, tuple(fn.event_shape)))
    return Layout(tuple(sites), tuple(enumerated))


def _diagonal_normal(fn: Any) -> Optional[Any]:
    """The Normal under ``fn``'s Independent wrappers, or None when it is another distribution."""
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    return fn if isinstance(fn, torch.distributions.Normal) else None


@torch.no_grad()
def richer_than_mean_field(guide: Callable, x: Tensor, **kwargs: Any) -> Optional[str]:
    """None where ``guide`` is, per datapoint, a product over its latent sites of diagonal
    Gaussians whose parameters depend on x alone: the family of mean-field q* (so Cremer et al.'s
    amortization and approximation gaps are what a gap decomposition measures). Otherwise what
    makes it richer, in words: a discrete site (a mixture over the continuous ones), a site that
    is no diagonal Gaussian (a flow, a full covariance), or a site whose parameters depend on
    another site's value (a conditional, hierarchical guide). Probed on (at most) two rows of
    ``x``, the random state left as it was."""
    xb, kw = _probe_rows(x, kwargs)
    blocked = poutine.block(guide, hide_types=["param"])
    with torch.random.fork_rng(devices=[]):
        trace = poutine.trace(blocked).get_trace(xb, **kw)
        sites = list(_latent_sample_sites(trace))
        for name, site in sites:
            if site["fn"].support.is_discrete:
                return f"it samples the discrete site {name!r} (a mixture over the continuous sites)"
            if _diagonal_normal(site["fn"]) is None:
                return f"its site {name!r} is a {type(site['fn']).__name__}, not a diagonal Gaussian"
        for name, site in sites if len(sites) > 1 else []:
            moved = {other: s["value"] + 1.0 for other, s in sites if other != name}
            again = poutine.trace(poutine.condition(blocked, data=moved)).get_trace(xb, **kw).nodes[name]
            first, second = _diagonal_normal(site["fn"]), _diagonal_normal(again["fn"])
            if (
                first is None
                or second is None
                or not (torch.equal(first.loc, second.loc) and torch.equal(first.scale, second.scale))
            ):
                return f"its site {name!r} depends on the value of another site (a conditional guide)"
    return None


# ---------------------------------------------------------------------------------------------
# log p(x, latents)


def _sample_dims(latents: Mapping[str, Tensor], layout: Optional[Layout], n: int) -> Tuple[int, ...]:
    """The shape of the draws before the datapoint dim: ``()`` or ``(S,)``."""
    if layout is not None and layout.sites:
        site = layout.sites[0]
        value = latents[site.name]
        shape = value.shape[: value.dim() - len(site.event_shape)]
    else:
        value = next(iter(latents.values()))
        shape = value.shape[:2] if value.dim() >= 2 and value.shape[1] == n else value.shape[:1]
    if shape[-1:] != (n,):
        raise ValueError(f"latents must have shape (*draws, {n}, *event_shape); got {tuple(value.shape)}")
    if len(shape) > 2:
        raise ValueError("latents may have at most one draw dim before the datapoint dim")
    return tuple(shape[:-1])


def _enumerated_terms(
    model: Callable,
    x: Tensor,
    latents: Mapping[str, Tensor],
    kwargs: Mapping[str, Any],
    max_plate_nesting: int = 1,
    layout: Optional[Layout] = None,
) -> Tuple[Tensor, Tensor, Tuple[int, ...], poutine.Trace]:
    """(log p(latents, d), log p(x, latents, d), (*draws, N), trace): a trace of the model
    conditioned on ``latents`` with every discrete site d it marks for enumeration enumerated, its
    values on enumeration dims to the left of ``(*draws, N)`` (not yet summed out)."""
    n = x.shape[0]
    sample_shape = _sample_dims(latents, layout, n)
    conditioned = poutine.condition(model, data=dict(latents))
    has_particles = len(sample_shape) == 1
    first_enum_dim = -(max_plate_nesting + (2 if has_particles else 1))
    plate = (
        pyro.plate(PARTICLE_PLATE, sample_shape[0], dim=-(max_plate_nesting + 1)) if has_particles else nullcontext()
    )
    with plate:
        trace = poutine.trace(poutine.enum(conditioned, first_available_dim=first_enum_dim)).get_trace(x, **kwargs)
    trace.compute_log_prob()
    prior = lik = None
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        lp = site["log_prob"]
        if not site["is_observed"] and not _enumerated(site) and not _infer(site).get("is_auxiliary"):
            raise ValueError(
                f"latent site {name!r} of the model was not given a value (latents name "
                f"{', '.join(map(repr, latents)) or 'none'}); a discrete site must be marked "
                "infer={'enumerate': 'parallel'} to be summed out"
            )
        if site["is_observed"] and name not in latents:
            lik = lp if lik is None else lik + lp
        else:
            prior = lp if prior is None else prior + lp
    shape = sample_shape + (n,)
    zero = x.new_zeros(shape)
    prior = zero if prior is None else prior
    lik = zero if lik is None else lik
    return prior, prior + lik, shape, trace


def _sum_out(t: Tensor, shape: Tuple[int, ...]) -> Tensor:
    """``t`` ``(*enumeration dims, *shape)`` with the enumeration dims summed out (log-sum-exp)."""
    if t.dim() > len(shape):
        t = t.reshape((-1,) + tuple(t.shape[-len(shape) :])).logsumexp(0)
    return t.expand(shape)


def _traced_terms(
    model: Callable,
    x: Tensor,
    latents: Mapping[str, Tensor],
    kwargs: Mapping[str, Any],
    max_plate_nesting: int = 1,
    layout: Optional[Layout] = None,
) -> Tuple[Tensor, Tensor]:
    """(log p(latents), log p(x | latents)) through a trace of the conditioned model; enumerated
    discrete sites summed out (log-sum-exp over their enumeration dims)."""
    prior, joint, shape, _ = _enumerated_terms(model, x, latents, kwargs, max_plate_nesting, layout)
    log_prior = _sum_out(prior, shape)
    return log_prior, _sum_out(joint, shape) - log_prior


def sample_enumerated(
    model: Callable,
    x: Tensor,
    latents: Mapping[str, Tensor],
    *,
    layout: Optional[Layout] = None,
    **kwargs: Any,
) -> Tuple[Dict[str, Tensor], Tensor, Tensor]:
    """Draws of the discrete sites the model enumerates from their exact conditional
    p(d | x, latents), one per draw of ``latents`` ``{site: (*draws, N, *event_shape)}``.

    Returns ``({site: (*draws, N)}, log p(x, latents, d), log p(x, latents))``: the drawn values,
    the joint at them, and the joint with d summed out, each ``(*draws, N)``. What a proposal
    over the continuous sites alone needs to become one over every site (q*(z) p(d | x, z): the
    gap decomposition of a model whose guide samples its discrete sites)."""
    _, joint, shape, trace = _enumerated_terms(model, x, latents, kwargs, layout=layout)
    sites = [(name, site) for name, site in trace.nodes.items() if site["type"] == "sample" and _enumerated(site)]
    if not sites:
        raise ValueError("the model marks no discrete site for enumeration: there is nothing to draw")
    enum_shape = tuple(joint.shape[: joint.dim() - len(shape)])
    full = enum_shape + shape
    flat = joint.expand(full).reshape((-1,) + shape)  # (values, *shape)
    index = torch.distributions.Categorical(logits=flat.movedim(0, -1)).sample()  # (*shape)
    values = {}
    for name, site in sites:
        value = cast(Tensor, site["value"])  # the site's support on its enumeration dim, 1 elsewhere
        values[name] = value.expand(full).reshape((-1,) + shape).gather(0, index.unsqueeze(0)).squeeze(0)
    at_draw = flat.gather(0, index.unsqueeze(0)).squeeze(0)
    return values, at_draw, flat.logsumexp(0)


def log_prior_and_likelihood(
    model: Callable, x: Tensor, latents: Mapping[str, Tensor], *, layout: Optional[Layout] = None, **kwargs: Any
) -> Tuple[Tensor, Tensor]:
    """(log p(latents), log p(x | latents)) per datapoint, each ``(*draws, N)``.

    ``latents``: ``{site: (*draws, N, *event_shape)}`` for every continuous latent site (at most
    one draw dim). Discrete sites the model marks for enumeration are summed out: log p(latents)
    is then the marginal over them, and log p(x | latents) = log p(x, latents) - log p(latents).
    Annealed importance sampling tempers the second term only. ``layout`` (the model's, from
    :func:`model_layout`) tells the draw dims from the event dims; without it they are inferred
    from the datapoint dim.
    """
    owner = fast_pair(model, None, kwargs, x)
    if owner is not None:
        return owner.log_prior(x, latents, **kwargs), owner.log_likelihood(x, latents, **kwargs)
    return _traced_terms(model, x, latents, kwargs, layout=layout)


def log_joint(
    model: Callable, x: Tensor, latents: Mapping[str, Tensor], *, layout: Optional[Layout] = None, **kwargs: Any
) -> Tensor:
    """log p(x, latents) per datapoint, ``(*draws, N)`` (see :func:`log_prior_and_likelihood`)."""
    prior, lik = log_prior_and_likelihood(model, x, latents, layout=layout, **kwargs)
    return prior + lik


# ---------------------------------------------------------------------------------------------
# Guide draws and importance weights


def sample_guide(
    model: Callable, guide: Callable, x: Tensor, num_particles: int, **kwargs: Any
) -> Tuple[Latents, Tensor]:
    """Draws of the guide's latent sites ``{site: (K, N, *event_shape)}`` and log q ``(K, N)``."""
    owner = fast_pair(model, guide, kwargs, x)
    if owner is not None:
        return owner.sample_guide(x, num_particles, **kwargs)
    with pyro.plate(PARTICLE_PLATE, num_particles, dim=-2):
        trace = poutine.trace(poutine.block(guide, hide_types=["param"])).get_trace(x, **kwargs)
    trace.compute_log_prob()
    shape = (num_particles, x.shape[0])
    latents, log_q = {}, x.new_zeros(shape)
    for name, site in _latent_sample_sites(trace):
        value = site["value"]
        latents[name] = value.expand(shape + value.shape[value.dim() - len(site["fn"].event_shape) :])
        log_q = log_q + site["log_prob"].expand(shape)
    return latents, log_q


def guide_and_prior(
    pair: FastPair, x: Tensor, num_particles: Optional[int] = None, **kwargs: Any
) -> Tuple[Latents, Tensor, Tensor]:
    """(latents, log q, log p(latents)) of a fast-path pair: its ``guide_and_prior`` where it has
    one (one pass, :meth:`ppl_vae.models.VAE.guide_and_prior`), else ``sample_guide`` then
    ``log_prior`` (a hand-written pair needs only the protocol's members)."""
    method = getattr(pair, "guide_and_prior", None)
    if method is not None:
        return method(x, num_particles, **kwargs)
    latents, log_q = pair.sample_guide(x, num_particles, **kwargs)
    return latents, log_q, pair.log_prior(x, latents, **kwargs)


def log_importance_weights(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *args: Any,
    num_particles: int = 1,
    max_plate_nesting: int = 1,
    **kwargs: Any,
) -> Tensor:
    """log p(x, z_k) - log q(z_k | x), ``(num_particles, N)``, for z_k ~ q over every latent site.

    Through the fast-path protocol where the pair offers it; otherwise through Pyro traces
    (the guide traced, the model replayed on its draws), where discrete sites the model marks
    for enumeration and the guide does not sample are summed out.
    """
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}")
    owner = None if args else fast_pair(model, guide, kwargs, x)
    if owner is not None:
        latents, log_q, log_prior = guide_and_prior(owner, x, num_particles, **kwargs)
        return log_prior + owner.log_likelihood(x, latents, **kwargs) - log_q
    weights = None if args else _fast_model_weights(model, guide, x, num_particles, kwargs)
    if weights is not None:
        return weights
    lp, _ = traced_log_probs(
        model, guide, x, *args, num_particles=num_particles, max_plate_nesting=max_plate_nesting, **kwargs
    )
    return lp.log_weight


def traced_log_probs(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *args: Any,
    num_particles: int,
    max_plate_nesting: int = 1,
    **kwargs: Any,
) -> Tuple[LogProbs, poutine.Trace]:
    """(:class:`~ppl_vae.inference.traces.LogProbs` ``(num_particles, N)``, the guide's trace)
    for z ~ q over every site the guide samples: the guide traced, the model replayed on its draws.

    Discrete sites the model marks for enumeration and the guide does not sample are summed out
    of log p(x, z) and log p(x | z): replayed, the model would draw them from their prior, and a
    weight p(x, d, z) / q(z) with d ~ p(d) counts p(d) twice.
    """
    model_trace, guide_trace = trace_pair(
        model, guide, x, *args, num_particles=num_particles, max_plate_nesting=max_plate_nesting, **kwargs
    )
    shape = (num_particles, x.shape[0])
    if not any(
        _enumerated(site) for _, site in _latent_sample_sites(model_trace) if site["name"] not in guide_trace.nodes
    ):
        return log_probs(model_trace, guide_trace, shape), guide_trace
    # the model sums out discrete sites the guide leaves to it: score the guide's draws exactly
    guide_trace.compute_log_prob()
    latents, log_q = {}, x.new_zeros(shape)
    for name, site in _latent_sample_sites(guide_trace):
        latents[name] = site["value"]
        log_q = log_q + site["log_prob"].expand(shape)
    event_shapes = {k: tuple(_fn(guide_trace.nodes[k]).event_shape) for k in latents}
    latents = {k: v.expand(shape + v.shape[v.dim() - len(event_shapes[k]) :]) for k, v in latents.items()}
    layout = Layout(tuple(Site(k, event_shapes[k]) for k in latents))
    prior, lik = _traced_terms(model, x, latents, kwargs, max_plate_nesting, layout=layout)
    return LogProbs(prior + lik, lik, log_q), guide_trace


def _fast_model_owner(
    model: Callable, guide: Callable, kwargs: Mapping[str, Any], x: Optional[Tensor] = None
) -> Optional[Any]:
    """The model's fast-path owner where :func:`_fast_model_weights` applies, else None."""
    guide_shapes = getattr(guide, "latent_shapes", None)
    if not callable(guide_shapes) or not callable(getattr(guide, "draw_latents", None)):
        return None
    owner = fast_pair(model, None, kwargs, x)
    if owner is None or tuple(getattr(owner, "enumerated_sites", ())):
        return None
    model_shapes = getattr(owner, "latent_shapes", None)
    if not callable(model_shapes):
        return None
    shapes = {name: tuple(shape) for name, shape in model_shapes().items()}
    if shapes != dict(guide_shapes()) or any(len(shape) != 1 for shape in shapes.values()):
        return None
    return owner


def _fast_model_weights(
    model: Callable, guide: Callable, x: Tensor, num_particles: int, kwargs: Mapping[str, Any]
) -> Optional[Tensor]:
    """The log-weights of a guide that draws its own latents without tracing
    (``latent_shapes`` and ``draw_latents``: mean-field q*,
    :class:`~ppl_vae.inference.meanfield.MeanFieldGuide`) under a model that offers the
    fast-path protocol, scored by the model's ``log_prior`` and blocked ``log_likelihood``: the
    traced path's numbers to float rounding, from the same draws. None (trace them) where it
    does not apply, decided before anything is drawn: the model sums out discrete sites, the
    guide's sites or event shapes are not the model's, or an event is not a vector."""
    owner = _fast_model_owner(model, guide, kwargs, x)
    if owner is None:
        return None
    latents, log_q = guide.draw_latents(num_particles)  # type: ignore[attr-defined]
    return owner.log_prior(x, latents, **kwargs) + owner.log_likelihood(x, latents, **kwargs) - log_q


def scored_by_traces(model: Callable, guide: Callable, kwargs: Mapping[str, Any] = {}) -> bool:
    """Whether :func:`log_importance_weights` scores ``(model, guide)`` through Pyro's traces:
    neither the pair's fast path nor the model's under a self-drawing guide applies. Traced
    scoring holds every intermediate tensor of a chunk at once, so its chunks are sized
    smaller (:func:`ppl_vae.inference.importance.default_particle_batch_size`)."""
    return fast_pair(model, guide, kwargs) is None and _fast_model_owner(model, guide, kwargs) is None


def scored_values_per_draw(model: Callable, x: Tensor, layout: Layout, **kwargs: Any) -> int:
    """How many values the model's observed sites score for one draw of the continuous latents
    of one datapoint, traced as :func:`log_joint` traces it: with the discrete sites it sums out
    (``layout.enumerated``) expanded. M2's p(x | z, y) over 10 classes scores 10 x 784 values
    per draw; a GMVAE's p(x | z) 784 (its p(z | c) is what the components expand). The tensors
    of a traced evaluation grow with it, so chunks of draws are sized by it
    (:func:`ppl_vae.inference.meanfield.polish_chunk_rows`). From two traces on (at most) two
    rows of ``x``; the caller's random stream is left alone."""
    xb, kw = _probe_rows(x, kwargs)
    n = xb.shape[0]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        probe = poutine.trace(poutine.block(model, hide_types=["param"])).get_trace(xb, **kw)
        latents: Dict[str, Tensor] = {s.name: cast(Tensor, probe.nodes[s.name]["value"]) for s in layout.sites}
        conditioned = poutine.condition(model, data=latents)
        trace = poutine.trace(poutine.enum(conditioned, first_available_dim=-2)).get_trace(xb, **kw)
    values = 0
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and site["is_observed"] and name not in latents and not site_is_subsample(site):
            fn: Any = site["fn"]
            values += fn.batch_shape.numel() * fn.event_shape.numel()
    return max(1, values // n)


def check_fast_path(pair: Any, x: Tensor, *, num_particles: int = 4, atol: float = 1e-4, **kwargs: Any) -> float:
    """Compare the fast path of ``pair`` with Pyro's traces on ``x``; returns the largest
    difference of the log-weights (same guide draws), raising ValueError above ``atol``.

    Use it on your own subclass that keeps ``has_fast_path`` to check that its protocol
    methods agree with its ``model`` and ``guide``.
    """
    if not isinstance(pair, FastPair) or not getattr(pair, "has_fast_path", False):
        raise ValueError(f"{type(pair).__name__} does not declare the fast-path protocol")
    with torch.no_grad():
        start = torch.get_rng_state()
        latents, log_q = pair.sample_guide(x, num_particles, **kwargs)
        fast = pair.log_prior(x, latents, **kwargs) + pair.log_likelihood(x, latents, **kwargs)
        layout = Layout(tuple(Site(k, tuple(v.shape[2:])) for k, v in latents.items()))
        prior, lik = _traced_terms(pair.model, x, latents, kwargs, layout=layout)
        diff = float((fast - prior - lik).abs().max())
        with pyro.plate(PARTICLE_PLATE, num_particles, dim=-2):
            trace = poutine.trace(poutine.condition(pair.guide, data=latents)).get_trace(x, **kwargs)
        trace.compute_log_prob()
        traced_q = sum(trace.nodes[name]["log_prob"] for name in latents)
        diff = max(diff, float((traced_q - log_q).abs().max()))
        if getattr(pair, "guide_and_prior", None) is not None:  # one pass: the same draws and numbers
            state = torch.get_rng_state()
            torch.set_rng_state(start)
            one_latents, one_q, one_prior = guide_and_prior(pair, x, num_particles, **kwargs)
            torch.set_rng_state(state)
            diff = max(diff, float((one_q - log_q).abs().max()), float((one_prior - prior).abs().max()))
            diff = max(diff, *(float((one_latents[k] - v).abs().max()) for k, v in latents.items()))
    if not diff <= atol:
        raise ValueError(
            f"the fast path of {type(pair).__name__} differs from its model/guide by {diff:.3g} "
            f"(> {atol}): override log_prior/log_likelihood/sample_guide/guide_and_prior to match, or set "
            "has_fast_path = False"
        )
    return diff


_VERIFIED: "weakref.WeakSet[Any]" = weakref.WeakSet()
_VERIFYING: "weakref.WeakSet[Any]" = weakref.WeakSet()


def verify_declared_fast_path(pair: Any, x: Tensor, *, rows: int = 8, **kwargs: Any) -> None:
    """Check once, before training, that a pair of a class from outside the library that declares
    ``has_fast_path`` computes what its ``model``/``guide`` do (:func:`check_fast_path` on the
    first ``rows`` of ``x``; ``kwargs`` such as labels are cut to those rows too). A subclass that
    overrides ``model`` and declares the flag again would otherwise train and be scored as its
    base class. The library's own classes are checked by its tests; the RNG and the modules'
    train/eval modes are left as they were (batch normalisation's statistics do not move)."""
    if not declares_fast_path(pair) or type(pair).__module__.split(".")[0] == "ppl_vae":
        return
    try:
        if pair in _VERIFIED or pair in _VERIFYING:  # the check's own scoring does not check again
            return
        _VERIFYING.add(pair)
    except TypeError:  # an object that takes no weak reference is checked each time
        pass
    try:
        _verify(pair, x, rows, kwargs)
    finally:
        _VERIFYING.discard(pair)
    try:
        _VERIFIED.add(pair)
    except TypeError:
        pass


def _verify(pair: Any, x: Tensor, rows: int, kwargs: Dict[str, Any]) -> None:
    devices = [x.device] if x.device.type == "cuda" else []
    modes = [(m, m.training) for m in pair.modules()] if isinstance(pair, torch.nn.Module) else []
    with torch.random.fork_rng(devices=devices):
        try:
            for m, _ in modes:
                m.eval()
            rows_kwargs: Dict[str, Any] = {k: v[:rows] if torch.is_tensor(v) else v for k, v in kwargs.items()}
            try:
                check_fast_path(pair, x[:rows], **rows_kwargs)
            except ValueError:
                raise
            except Exception as exc:  # the protocol cannot even run on this model (a cvae's encoder takes y)
                raise ValueError(
                    f"{type(pair).__name__} declares has_fast_path, but its fast path fails on {rows} points "
                    f"({type(exc).__name__}: {' '.join(str(exc).split())}); set has_fast_path = False or override "
                    "log_prior/log_likelihood/sample_guide to match its model and guide"
                ) from None
        finally:
            for m, mode in modes:
                m.train(mode)


_ENUMERATION_CHECKED: "weakref.WeakSet[Any]" = weakref.WeakSet()


def verify_enumerated_sites(pair: Any, x: Tensor, **kwargs: Any) -> None:
    """Refuse, once and before training, a pair of a class from outside the library whose model
    marks a discrete latent site ``infer={"enumerate": "parallel"}`` that its guide does not
    sample, without declaring it in ``enumerated_sites``. The estimators sum such a site out;
    training sums out only the declared ones (TraceEnum_ELBO), and SVI's Trace_ELBO would draw
    the site from its prior inside the model: another objective, with biased gradients, than the
    one evaluation scores. One probe trace of model and guide on two rows of ``x``; the RNG and
    the modules' train/eval modes are left as they were."""
    model, guide = getattr(pair, "model", None), getattr(pair, "guide", None)
    if not callable(model) or not callable(guide) or type(pair).__module__.split(".")[0] == "ppl_vae":
        return
    try:
        if pair in _ENUMERATION_CHECKED:
            return
    except TypeError:  # an object that takes no weak reference is checked each time
        pass
    declared = set(getattr(pair, "enumerated_sites", ()) or ())
    xb, kw = _probe_rows(x, kwargs)
    modes = [(m, m.training) for m in pair.modules()] if isinstance(pair, torch.nn.Module) else []
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        try:
            for m, _ in modes:
                m.eval()
            traces = [poutine.trace(poutine.block(f, hide_types=["param"])).get_trace(xb, **kw) for f in (guide, model)]
        finally:
            for m, mode in modes:
                m.train(mode)
    guided = {name for name, _ in _latent_sample_sites(traces[0])}
    undeclared = [
        name
        for name, site in _latent_sample_sites(traces[1])
        if _enumerated(site) and site["fn"].support.is_discrete and name not in guided and name not in declared
    ]
    if undeclared:
        names = ", ".join(map(repr, undeclared))
        raise ValueError(
            f"{type(pair).__name__}'s model marks the discrete site(s) {names} for enumeration, which its guide "
            f"does not sample, but the class does not declare them: add enumerated_sites = ({names},) to it, so "
            "that training sums them out (TraceEnum_ELBO) as the estimators do; undeclared, SVI would sample them "
            "from the prior inside the model"
        )
    try:
        _ENUMERATION_CHECKED.add(pair)
    except TypeError:
        pass


__all__ = [
    "FastPair",
    "Latents",
    "Layout",
    "Site",
    "check_fast_path",
    "verify_enumerated_sites",
    "fast_pair",
    "guide_and_prior",
    "log_importance_weights",
    "log_joint",
    "log_prior_and_likelihood",
    "model_layout",
    "sample_guide",
    "verify_declared_fast_path",
]


def flat_terms(model: Callable, x: Tensor, z: Tensor, layout: Layout, **kwargs: Any) -> Tuple[Tensor, Tensor]:
    """(log p(latents), log p(x | latents)) for a flat point ``z`` ``(*draws, N, layout.size)``
    of the latent space (see :func:`log_prior_and_likelihood`)."""
    return log_prior_and_likelihood(model, x, layout.split(z), layout=layout, **kwargs)


def flat_log_joint(model: Callable, x: Tensor, z: Tensor, layout: Layout, **kwargs: Any) -> Tensor:
    """log p(x, latents) for a flat point ``z`` ``(*draws, N, layout.size)``, ``(*draws, N)``."""
    prior, lik = flat_terms(model, x, z, layout, **kwargs)
    return prior + lik


def guide_layout(guide: Callable, x: Tensor, layout: Layout, **kwargs: Any) -> None:
    """Check that ``guide`` samples every continuous latent site of ``layout`` with its event shape
    (a one-line ValueError naming the site otherwise)."""
    xb, kw = _probe_rows(x, kwargs)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        trace = poutine.trace(poutine.block(guide, hide_types=["param"])).get_trace(xb, **kw)
    for site in layout.sites:
        node = trace.nodes.get(site.name)
        if node is None or node["type"] != "sample":
            raise ValueError(f"the guide has no sample site {site.name!r}, a latent site of the model")
        if tuple(_fn(node).event_shape) != site.event_shape:
            raise ValueError(
                f"the guide's site {site.name!r} has event shape {tuple(_fn(node).event_shape)}, "
                f"the model's {site.event_shape}"
            )
