"""Models: networks, priors, likelihoods, the VAE model/guide pair and the model registry."""

from ppl_vae.models import (  # noqa: E402,F401  (registers the "conv" and "cvae" models)  # noqa: E402,F401  (registers "scvae", "scvae_plain", "text_hybrid")
    conv,
    cvae,
    discrete,  # noqa: E402,F401  (registers "m2", "gmvae", "relaxed_gmvae")
    disentangle_nets,  # noqa: E402,F401  (registers "chen_mlp", "conv64")
    hierarchical,  # noqa: E402,F401  (registers "one_layer", "two_layer", "ladder")
    scvae,
    text,
)
from ppl_vae.models.guides import GUIDES, IAFGuideVAE, make_guide
from ppl_vae.models.likelihoods import LIKELIHOODS, Likelihood, make_likelihood
from ppl_vae.models.priors import (
    PRIORS,
    FlowPrior,
    MixtureOfGaussiansPrior,
    Prior,
    StandardNormalPrior,
    VampPrior,
    make_prior,
)
from ppl_vae.models.vae import VAE, data_plate
from ppl_vae.models.zoo import MODELS, ModelSpec, build_vae

__all__ = [
    "GUIDES",
    "FlowPrior",
    "IAFGuideVAE",
    "VampPrior",
    "make_guide",
    "LIKELIHOODS",
    "MODELS",
    "PRIORS",
    "Likelihood",
    "MixtureOfGaussiansPrior",
    "ModelSpec",
    "Prior",
    "StandardNormalPrior",
    "VAE",
    "build_vae",
    "data_plate",
    "make_likelihood",
    "make_prior",
]
