"""Named models (the registry behind ``--model``) and :func:`build_vae`.

Each entry is a :class:`ModelSpec`: a builder taking the datapoint shape, latent and hidden
sizes, a prior and a likelihood, plus the defaults the paper used for that model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

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
    model's options (``ModelConfig.model_options``, ``--model-option``).
    """

    build: Builder
    description: str
    likelihood: str
    latent_dim: int = 10
    hidden_dim: int = 200
    event_dims: Optional[int] = None  # None: all of a datapoint's dims form one event


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


def check_model_options(name: str, build: Builder, options: dict) -> None:
    """A one-line ValueError for an option the builder of model ``name`` does not declare
    (its keyword-only parameters are its options)."""
    import inspect

    allowed = [p.name for p in inspect.signature(build).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = [k for k in options if k not in allowed]
    if unknown:
        takes = f"it takes {', '.join(allowed)}" if allowed else "it takes no options"
        raise ValueError(f"model {name!r} has no option {unknown[0]!r}; {takes}")


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
    ``z1_dim``, ``hidden_dims`` for ``two_layer``); others raise a ValueError naming the option.
    """
    from ppl_vae.models.guides import GUIDES, make_guide

    GUIDES.get(guide)
    spec = MODELS.get(model)
    event_shape = tuple(int(s) for s in event_shape)
    if not event_shape or min(event_shape) < 1:
        raise ValueError(f"event_shape must be a non-empty shape of positive sizes, got {event_shape}")
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
    if not isinstance(prior, Prior):
        prior = make_prior(prior, latent_dim, **(prior_options or {}))
    event_dims = len(event_shape) if spec.event_dims is None else spec.event_dims
    if likelihood is None:
        likelihood = spec.likelihood
    if not isinstance(likelihood, Likelihood):
        check_options("likelihood", likelihood, LIKELIHOODS.get(likelihood), likelihood_options or {}, skip=1)
        likelihood = make_likelihood(likelihood, event_dims=event_dims, **(likelihood_options or {}))
    model_options = dict(model_options or {})
    check_model_options(model, spec.build, model_options)
    vae = spec.build(event_shape, latent_dim, hidden_dim, prior, likelihood, **{**(data_info or {}), **model_options})
    vae = make_guide(guide, vae, **(guide_options or {}))
    vae.prior.attach_to(vae.encoder, vae.event_shape, num_classes=vae.num_classes)
    return vae
