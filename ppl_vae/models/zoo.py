"""Named models (the registry behind ``--model``) and :func:`build_vae`.

Each entry is a :class:`ModelSpec`: a builder taking the datapoint shape, latent and hidden
sizes, a prior and a likelihood, plus the defaults the paper used for that model.
"""

from __future__ import annotations

import collections.abc
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

from ppl_vae.config import Range  # one declaration of a range, for config fields and builder options
from ppl_vae.models.likelihoods import LIKELIHOODS, Likelihood, make_likelihood
from ppl_vae.models.networks import GaussianMLPEncoder, MLPDecoder
from ppl_vae.models.priors import Prior, check_options, make_prior
from ppl_vae.models.vae import VAE
from ppl_vae.registry import Registry

Builder = Callable[..., VAE]


@dataclass(frozen=True)
class ModelSpec:
    """A named model: how to build it and its defaults.

    ``build(event_shape, latent_dim, hidden_dim, prior, likelihood, **data_info)``: data_info
    holds facts about the dataset a model may need (``num_classes``, ``vocab_size``, ...);
    builders ignore the keys they do not use. A builder's keyword-only parameters are the
    model's options (``ModelConfig.model_options``, ``--model-option``); their annotations
    (with :class:`Range` or :class:`Choice` in ``typing.Annotated``) declare what each allows.
    """

    build: Builder
    description: str
    likelihood: str
    latent_dim: int = 10
    hidden_dim: int = 200
    event_dims: Optional[int] = None  # None: all of a datapoint's dims form one event
    #: trains on partly labelled data (``data.labels``, ``--labels N``): the config check reads it
    uses_labels: bool = False


MODELS: Registry[ModelSpec] = Registry("model")


def _mlp_vae(
    event_shape: Sequence[int],
    latent_dim: int,
    hidden_dim: int,
    prior: Prior,
    likelihood: Likelihood,
    **data_info,
) -> VAE:
    encoder = GaussianMLPEncoder(event_shape, latent_dim, (hidden_dim,), activation="tanh")
    decoder = MLPDecoder(latent_dim, event_shape, likelihood.num_params, (hidden_dim,), "tanh")
    return VAE(encoder, decoder, prior, likelihood, event_shape)


MODELS.register("gaussian_mlp", doc="AEVB appendix C.2: tanh MLP, Gaussian encoder and decoder")(
    ModelSpec(
        _mlp_vae,
        "AEVB appendix C.2: tanh MLP encoder, Gaussian decoder with learned variance and mean squashed into (0, 1)",
        likelihood="gaussian_sigmoid",
    )
)
MODELS.register("bernoulli_mlp", doc="AEVB appendix C.1: tanh MLP, Bernoulli decoder")(
    ModelSpec(
        _mlp_vae,
        "AEVB appendix C.1: tanh MLP encoder, Bernoulli decoder",
        likelihood="bernoulli",
    )
)


# ---------------------------------------------------------------------------------------------
# Model options: each builder declares its options once, as keyword-only parameters whose
# annotations give the type, and (with typing.Annotated) the range or the choices. The check
# below reads those declarations, so a value from --model-option or a received config.json is
# refused with one line before the builder sees it.


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: the mapping is not hashable
class Choice:
    """A marker for ``Annotated[str, Choice(mapping)]``: the option is one of the mapping's keys
    (read when checked, so a registry that grows is followed)."""

    names: Mapping[str, Any]

    def __contains__(self, value: object) -> bool:
        return isinstance(value, str) and value in self.names

    def describe(self) -> str:
        return "one of " + ", ".join(repr(n) for n in self.names)


PositiveInt = typing.Annotated[int, Range(1)]
"""A size: an integer >= 1."""
PositiveFloat = typing.Annotated[float, Range(0.0, low_open=True)]
"""A finite number > 0."""
NonNegativeFloat = typing.Annotated[float, Range(0.0)]
"""A finite number >= 0."""
UnitFraction = typing.Annotated[float, Range(0.0, 1.0, low_open=True)]
"""A share: a number in (0, 1]."""

_SEQUENCES = (list, tuple, collections.abc.Sequence, typing.Sequence, typing.List, typing.Tuple)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)  # type: ignore[arg-type]


def _admits(marker: Union[Range, Choice], value: object) -> bool:
    """Whether ``marker`` allows ``value``; a :class:`Range` marks a number (an int or a float:
    the annotated type, which ``value`` conforms to), nothing else is in it."""
    if isinstance(marker, Choice):
        return value in marker
    return isinstance(value, (int, float)) and value in marker


def conforms(value: object, hint: Any) -> bool:
    """Whether ``value`` (as read from JSON: None, bool, int, float, str, list) is of type ``hint``.

    Reads ``Optional``/``Union``, ``Literal``, ``Annotated`` with :class:`Range` or
    :class:`Choice`, ``Sequence``/``List``/``Tuple`` (a JSON list or a tuple, never a string),
    ``bool`` (only true/false), ``int`` (not a bool, not 2.0), ``float`` (an int or a float,
    finite) and ``str``; anything else (``Any``, a class it does not know) is accepted, the
    builder then checks it."""
    if hint is Any or hint is None and value is None:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return conforms(value, args[0]) and all(_admits(m, value) for m in args[1:] if isinstance(m, (Range, Choice)))
    if origin is Union or (origin is not None and getattr(origin, "__name__", "") == "UnionType"):
        return any(conforms(value, arm) for arm in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return _is_number(value)
    if hint is str:
        return isinstance(value, str)
    if origin in _SEQUENCES or hint in _SEQUENCES:
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(conforms(v, a) for v, a in zip(value, args))
        item = args[0] if args else Any
        return all(conforms(v, item) for v in value)
    return True


def describe_type(hint: Any, plural: bool = False) -> str:
    """``hint`` in words for an error message: ``"a list of integers >= 1"``, ``"true or false"``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        marks = [m for m in args[1:] if isinstance(m, (Range, Choice))]
        choice = next((m for m in marks if isinstance(m, Choice)), None)
        if choice is not None:
            return choice.describe()
        ranges = " ".join(m.bounds() for m in marks if isinstance(m, Range))
        return f"{describe_type(args[0], plural)} {ranges}".strip()
    if origin is Union or (origin is not None and getattr(origin, "__name__", "") == "UnionType"):
        arms = [a for a in args if a is not type(None)]
        words = " or ".join(describe_type(a, plural) for a in arms)
        if len(arms) != len(args):
            return f"null or {words if len(arms) == 1 else f'({words})'}"
        return words
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    simple = {
        bool: ("true or false", "true or false values"),
        int: ("an integer", "integers"),
        float: ("a finite number", "finite numbers"),
        str: ("a string", "strings"),
    }
    if hint in simple:
        return simple[hint][plural]
    if origin in _SEQUENCES or hint in _SEQUENCES:
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            items = ", ".join(describe_type(a) for a in args)
            return f"{'lists' if plural else 'a list'} of {len(args)} items ({items})"
        if not args:
            return "lists" if plural else "a list"
        item = describe_type(args[0], plural=True)
        if " or " in item:
            item = f"({describe_type(args[0])})"
        return f"{'lists' if plural else 'a list'} of {item}"
    return getattr(hint, "__name__", str(hint))


def _option_hints(build: Builder) -> dict:
    try:
        return typing.get_type_hints(build, include_extras=True)
    except Exception:  # a plugin's builder annotated with names only a type checker sees
        return {}


def check_keyword_options(owner: str, fn: Callable[..., Any], options: Mapping[str, Any]) -> None:
    """A one-line ValueError for an option ``fn`` does not declare (its keyword-only parameters
    are its options), or for a value its annotation does not allow (see :func:`conforms`); null
    is allowed for an option whose default is None. ``owner`` names it: ``"model 'm2'"``,
    ``"method 'mcem'"``, ``"objective 'beta_vae'"``."""
    import inspect

    params = {p.name: p for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}
    unknown = [k for k in options if k not in params]
    if unknown:
        takes = f"it takes {', '.join(params)}" if params else "it takes no options"
        raise ValueError(f"{owner} has no option {unknown[0]!r}; {takes}")
    hints = _option_hints(fn)
    for key, value in options.items():
        hint = hints.get(key, Any)
        if value is None and params[key].default is None:
            continue
        if not conforms(value, hint):
            raise ValueError(f"{owner}: option {key!r} must be {describe_type(hint)}, got {value!r}")


def check_model_options(name: str, build: Builder, options: dict) -> None:
    """:func:`check_keyword_options` of model ``name``'s builder."""
    check_keyword_options(f"model {name!r}", build, options)


def _check_sizes_given_once(
    model: str, latent_dim: Optional[int], hidden_dim: Optional[int], model_options: Dict[str, Any]
) -> None:
    """Refuse a size given twice: ``hidden_dim`` beside the option ``hidden_dims``, which sets
    every layer (``hidden_dim`` would be recorded and ignored), or ``latent_dim`` beside a
    ``latent_dims`` whose top layer differs."""
    if hidden_dim is not None and "hidden_dims" in model_options:
        raise ValueError(
            f"hidden_dim={hidden_dim} and model option hidden_dims={model_options['hidden_dims']} both set the "
            f"hidden sizes of {model!r}: give one"
        )
    latent_dims = model_options.get("latent_dims")
    if (
        latent_dim is not None
        and isinstance(latent_dims, (list, tuple))
        and latent_dims
        and latent_dims[-1] != latent_dim
    ):
        raise ValueError(
            f"model option latent_dims={list(latent_dims)} puts {latent_dims[-1]} units in the top layer but "
            f"latent_dim is {latent_dim}: leave latent_dim out or set it to {latent_dims[-1]}"
        )


def build_vae(
    model: str,
    event_shape: Sequence[int],
    *,
    prior: Union[str, Prior] = "standard_normal",
    likelihood: Union[str, Likelihood, None] = None,
    latent_dim: Optional[int] = None,
    hidden_dim: Optional[int] = None,
    prior_options: Optional[dict] = None,
    likelihood_options: Optional[dict] = None,
    data_info: Optional[dict] = None,
    guide: str = "diagonal_normal",
    guide_options: Optional[dict] = None,
    model_options: Optional[dict] = None,
) -> VAE:
    """Build a registered model, swapping in a prior, likelihood and guide family by name.

    >>> vae = build_vae("gaussian_mlp", (1, 8, 8), prior="vamp", likelihood="laplace",
    ...                 guide="iaf", guide_options={"num_flows": 2})  # doctest: +SKIP

    ``data_info`` (see :class:`ModelSpec`) is passed on to the model's builder. ``guide`` names
    a family in :data:`ppl_vae.models.guides.GUIDES` ("diagonal_normal" is AEVB's). Options a
    prior, guide or likelihood does not take raise a ValueError naming the option. A prior that
    needs other parts (the VampPrior uses the encoder) is attached to the finished VAE.
    ``model_options`` go to the model's builder: the keyword-only arguments it declares (e.g.
    ``z1_dim``, ``hidden_dims`` for ``two_layer``); others, and values their annotations do not
    allow (:func:`check_model_options`), raise a ValueError naming the model and the option.
    """
    from ppl_vae.models.guides import GUIDES, make_guide

    GUIDES.get(guide)
    given_latent_dim, given_hidden_dim = latent_dim, hidden_dim
    spec = MODELS.get(model)
    event_shape = tuple(int(s) for s in event_shape)
    if not event_shape or min(event_shape) < 1:
        raise ValueError(f"event_shape must be a non-empty shape of positive sizes, got {event_shape}")
    for what, given, options in (("prior", prior, prior_options), ("likelihood", likelihood, likelihood_options)):
        if options and not isinstance(given, str) and given is not None:
            raise ValueError(
                f"{what}_options {dict(options)} apply to a {what} named by string; the {type(given).__name__} "
                f"given is already built: pass the options to its constructor"
            )
    if isinstance(prior, Prior):
        if latent_dim is not None and latent_dim != prior.latent_dim:
            raise ValueError(f"latent_dim={latent_dim} disagrees with the prior's {prior.latent_dim}")
        latent_dim = prior.latent_dim
    latent_dim = spec.latent_dim if latent_dim is None else int(latent_dim)
    hidden_dim = spec.hidden_dim if hidden_dim is None else int(hidden_dim)
    if latent_dim < 1:
        raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
    if hidden_dim < 1:
        raise ValueError(f"hidden_dim must be >= 1, got {hidden_dim}")
    prior_name = prior if isinstance(prior, str) else None
    if not isinstance(prior, Prior):
        prior = make_prior(prior, latent_dim, **(prior_options or {}))
    event_dims = len(event_shape) if spec.event_dims is None else spec.event_dims
    if likelihood is None:
        likelihood = spec.likelihood
    if not isinstance(likelihood, Likelihood):
        check_options("likelihood", likelihood, LIKELIHOODS.get(likelihood), likelihood_options or {}, skip=1)
        likelihood = make_likelihood(likelihood, event_dims=event_dims, **(likelihood_options or {}))
    elif getattr(likelihood, "event_dims", event_dims) != event_dims:
        raise ValueError(
            f"the {type(likelihood).__name__} given sums {likelihood.event_dims} trailing dim(s) of a datapoint, "
            f"but {model!r} datapoints of shape {event_shape} need {event_dims}: build it with "
            f"event_dims={event_dims} (make_likelihood(name, event_dims={event_dims}))"
        )
    model_options = dict(model_options or {})
    check_model_options(model, spec.build, model_options)
    _check_sizes_given_once(model, given_latent_dim, given_hidden_dim, model_options)
    try:
        vae = spec.build(
            event_shape, latent_dim, hidden_dim, prior, likelihood, **{**(data_info or {}), **model_options}
        )
    except ValueError as exc:  # said with the names the user gave: prior 'vamp', not VampPrior
        if prior_name is None or type(prior).__name__ not in str(exc):
            raise
        cls = type(prior).__name__
        said = str(exc).replace(f"({cls})", f"({prior_name!r})").replace(cls, f"prior {prior_name!r}")
        raise ValueError(said) from None
    if not isinstance(vae, VAE):  # a plugin's builder: what every command reads of a model is a VAE's
        raise ValueError(
            f"model {model!r} built a {type(vae).__name__}, not a ppl_vae.models.VAE: a model registered for "
            "--model is a VAE (encoder, decoder, prior, likelihood; subclass it to write your own model or guide); "
            "train a hand-written Pyro pair from Python with ppl_vae.inference.train(pair, data, TrainConfig(...))"
        )
    try:
        vae = make_guide(guide, vae, **(guide_options or {}))
    except ValueError as exc:  # said with the names the user gave: model 'two_layer', not HierarchicalVAE
        if type(vae).__name__ not in str(exc):
            raise
        raise ValueError(str(exc).replace(type(vae).__name__, f"model {model!r}")) from None
    vae.prior.attach_to(vae.encoder, vae.event_shape, num_classes=vae.num_classes)
    return vae
