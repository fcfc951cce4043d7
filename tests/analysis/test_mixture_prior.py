"""Estimators on a model whose prior is a mixture of Gaussians (``MixtureSameFamily``: the
``mixture_of_gaussians`` and ``vamp`` priors), against the closed form of a linear-Gaussian
decoder under that prior. torch wraps a mixture's support in ``MixtureSameFamilyConstraint``,
which the latent layout took for a constrained support: compare, AIS, mean-field VI and MCEM
refused every run with either prior."""

from __future__ import annotations

import torch
from pyro import distributions as dist

from ppl_vae.analysis.gaps import mis
from ppl_vae.inference.ais import ais
from ppl_vae.inference.latents import model_layout
from ppl_vae.models import build_vae
from ppl_vae.models.linear_gaussian import LinearGaussianVAE
from ppl_vae.models.priors import MixtureOfGaussiansPrior


def _linear_mixture() -> LinearGaussianVAE:
    torch.manual_seed(0)
    vae = LinearGaussianVAE(x_dim=4, latent_dim=2, sigma=0.5)
    vae.prior = MixtureOfGaussiansPrior(2, num_components=3, init_scale=1.5)
    with torch.no_grad():
        vae.prior.logits.copy_(torch.tensor([0.5, 0.0, -0.5]))
    return vae.double().eval()


def _exact_log_px(vae: LinearGaussianVAE, x: torch.Tensor) -> torch.Tensor:
    """log p(x) = log sum_k pi_k N(x; W mu_k + b, W S_k W^T + sigma^2 I), written out: (N,)."""
    prior = vae.prior()
    log_pi = torch.log_softmax(prior.mixture_distribution.logits, -1)
    comp = prior.component_distribution.base_dist
    W, b = vae.W, vae.b
    terms = []
    for k in range(len(log_pi)):
        cov = W @ torch.diag(comp.scale[k] ** 2) @ W.T + vae.sigma**2 * torch.eye(4, dtype=x.dtype)
        terms.append(log_pi[k] + dist.MultivariateNormal(W @ comp.loc[k] + b, covariance_matrix=cov).log_prob(x))
    return torch.stack(terms).logsumexp(0)


def test_mixture_and_vamp_priors_have_a_real_latent_layout():
    x = torch.rand(4, 1, 8, 8)
    for prior, options in (("mixture_of_gaussians", {"num_components": 3}), ("vamp", {"num_components": 3})):
        vae = build_vae("gaussian_mlp", (1, 8, 8), latent_dim=2, hidden_dim=8, prior=prior, prior_options=options)
        layout = model_layout(vae.model, x)
        assert layout.names == ("z",) and layout.size == 2, prior


def test_mis_and_ais_under_a_mixture_prior_match_the_closed_form():
    vae = _linear_mixture()
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2
    exact = _exact_log_px(vae, x)
    out = mis(vae.model, vae.guide, x, seed=0, num_samples=4000)
    err, se = out.log_px - exact, out.log_px_stderr
    # log p̂ of an unbiased p̂: its mean sits at most a little below log p(x); 5 standard errors
    assert bool((err.abs() <= 5 * se + 1e-6).all()), (err, se)
    elbo_q_star, elbo_se = out.variables["elbo_meanfield"].data, out.variables["elbo_meanfield_stderr"].data
    assert bool((elbo_q_star < exact + 5 * elbo_se).all())  # a lower bound on log p(x)
    res = ais(vae.model, vae.guide, x, seed=0, num_steps=200, num_chains=8)
    assert bool((res.log_px <= exact + 5 * res.log_px_stderr).all())  # a stochastic lower bound
    mean_se = float(res.log_px_stderr.pow(2).sum().sqrt()) / len(x)
    assert abs(float((exact - res.log_px).mean())) <= 5 * mean_se  # and, at 200 steps, close to it
