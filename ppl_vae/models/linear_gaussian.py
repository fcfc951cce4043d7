"""The linear-Gaussian VAE: a model whose evidence and posterior are known in closed form.

p(z) = N(0, I_d), p(x|z) = N(W z + b, sigma^2 I_D), so p(x) = N(b, W W^T + sigma^2 I) and
p(z|x) = N(mu, Sigma) with precision Sigma^{-1} = I + W^T W / sigma^2 and
mu = Sigma W^T (x - b) / sigma^2. Estimators (ELBO, importance weighting, mean-field VI,
HMC) are tested against these closed forms, as Pyro's own tests do.
"""

from __future__ import annotations

import math
from typing import Tuple

import pyro
import torch
from pyro import distributions as dist
from torch import Tensor, nn

from ppl_vae.models.likelihoods import FixedScaleGaussianLikelihood
from ppl_vae.models.priors import StandardNormalPrior
from ppl_vae.models.vae import VAE, data_plate


class LinearGaussianEncoder(nn.Module):
    """q(z|x) = N(A x + c, diag(exp(log_scale))): amortized, diagonal, linear in x."""

    def __init__(self, x_dim: int, latent_dim: int):
        super().__init__()
        self.linear = nn.Linear(x_dim, latent_dim)
        self.log_scale = nn.Parameter(torch.zeros(latent_dim))

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        loc = self.linear(x)
        return loc, self.log_scale.exp().expand_as(loc)


class LinearDecoder(nn.Module):
    """z -> W z + b (the mean of p(x|z))."""

    num_params = 1

    def __init__(self, latent_dim: int, x_dim: int):
        super().__init__()
        self.linear = nn.Linear(latent_dim, x_dim)

    def forward(self, z: Tensor) -> Tuple[Tensor]:
        return (self.linear(z),)


class LinearGaussianVAE(VAE):
    """A VAE with p(x) = N(b, W W^T + sigma^2 I); exact quantities for tests and checks.

    Datapoints are vectors of size ``x_dim``. ``W``, ``b`` and ``sigma`` may be given; by
    default W and b are random (seeded by the caller's torch RNG).
    """

    decoder: LinearDecoder

    def __init__(
        self,
        x_dim: int,
        latent_dim: int,
        sigma: float = 0.5,
        W: Tensor | None = None,
        b: Tensor | None = None,
    ):
        decoder = LinearDecoder(latent_dim, x_dim)
        with torch.no_grad():
            if W is not None:
                decoder.linear.weight.copy_(W)
            if b is not None:
                decoder.linear.bias.copy_(b)
        super().__init__(
            LinearGaussianEncoder(x_dim, latent_dim),
            decoder,
            StandardNormalPrior(latent_dim),
            FixedScaleGaussianLikelihood(event_dims=1, scale=sigma),
            (x_dim,),
        )
        self.sigma = float(sigma)

    @property
    def W(self) -> Tensor:
        return self.decoder.linear.weight

    @property
    def b(self) -> Tensor:
        return self.decoder.linear.bias

    def exact_log_marginal(self, x: Tensor) -> Tensor:
        """log p(x) = log N(x; b, W W^T + sigma^2 I), shape ``(N,)``."""
        cov = self.W @ self.W.T + self.sigma**2 * torch.eye(self.W.shape[0], dtype=x.dtype, device=x.device)
        return dist.MultivariateNormal(self.b, covariance_matrix=cov).log_prob(x)

    def exact_posterior(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """(loc ``(N, d)``, covariance ``(d, d)``) of p(z|x)."""
        d = self.W.shape[1]
        precision = torch.eye(d, dtype=x.dtype, device=x.device) + self.W.T @ self.W / self.sigma**2
        cov = torch.linalg.inv(precision)
        loc = (x - self.b) @ self.W @ cov.T / self.sigma**2
        return loc, cov

    def optimal_mean_field(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """(loc, scale) of the diagonal Gaussian minimizing KL(q || p(z|x)).

        For a Gaussian posterior it has the posterior mean and variances 1 / diag(precision)
        (Bishop 2006, section 10.1.2).
        """
        loc, cov = self.exact_posterior(x)
        precision = torch.linalg.inv(cov)
        return loc, precision.diagonal().rsqrt().expand_as(loc)

    def elbo_closed_form(self, x: Tensor, loc: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
        """The exact ELBO of q = N(loc, diag(scale^2)) (default: the encoder's), shape ``(N,)``."""
        if loc is None or scale is None:
            loc, scale = self.encoder(x)
        D = x.shape[-1]
        resid = x - loc @ self.W.T - self.b
        expected_sq = (resid**2).sum(-1) + (scale**2 @ (self.W**2).sum(0))
        log_lik = -0.5 * D * math.log(2 * math.pi * self.sigma**2) - expected_sq / (2 * self.sigma**2)
        kl = 0.5 * (scale**2 + loc**2 - 1.0 - 2.0 * scale.log()).sum(-1)
        return log_lik - kl

    def exact_posterior_guide(self, x: Tensor, *, num_data=None, kl_weight: float = 1.0) -> Tensor:
        """A guide equal to p(z|x) (full covariance): its importance weights are all log p(x)."""
        loc, cov = self.exact_posterior(x)
        with data_plate(x, num_data):
            return pyro.sample("z", dist.MultivariateNormal(loc, covariance_matrix=cov))
