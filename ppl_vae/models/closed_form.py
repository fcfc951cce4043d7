"""Closed-form models with several latent sites, for testing estimators (as Pyro's own tests do).

- :class:`TwoLayerLinearGaussian`: z2 ~ N(0, I), z1 | z2 ~ N(A z2 + a, s1^2 I),
  x | z1 ~ N(W z1 + b, s^2 I). Everything is jointly Gaussian, so
  p(x) = N(W a + b, W (A A^T + s1^2 I) W^T + s^2 I) and the joint posterior p(z2, z1 | x) is
  Gaussian with a known mean and covariance. Its guides: an amortized diagonal one
  q(z2|x) q(z1|x), and the exact posterior written as two sites, q(z2|x) q(z1|z2, x).
- :class:`TwoComponentLinearGaussian`: c ~ Categorical(pi) over two values, **enumerated**
  (``infer={"enumerate": "parallel"}``), z | c ~ N(m_c, I), x | z ~ N(W z + b, s^2 I), so
  p(x) = sum_c pi_c N(x; W m_c + b, W W^T + s^2 I); its exact posterior over z is a mixture of
  two Gaussians, which :meth:`~TwoComponentLinearGaussian.exact_posterior_guide` samples as
  one continuous site.

Both use the traced path of the estimators (they declare no fast-path protocol), so they
test the code that serves any user's hand-written pair.
"""

from __future__ import annotations

from typing import Optional, Tuple

import pyro
import torch
from pyro import distributions as dist
from torch import Tensor, nn


def _mvn_condition(mean: Tensor, cov: Tensor, x: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """For a joint Gaussian over (u, x) with u the first ``k`` coordinates, the mean ``(N, k)``
    and covariance ``(k, k)`` of u | x."""
    s_uu, s_ux, s_xx = cov[:k, :k], cov[:k, k:], cov[k:, k:]
    gain = torch.linalg.solve(s_xx, s_ux.T).T  # S_ux S_xx^-1
    loc = mean[:k] + (x - mean[k:]) @ gain.T
    return loc, s_uu - gain @ s_ux.T


class TwoLayerLinearGaussian(nn.Module):
    """The two-layer linear-Gaussian hierarchy z2 -> z1 -> x with exact log p(x) and posterior.

    Sizes ``x_dim``, ``z1_dim``, ``z2_dim``. The parameters (A, a, W, b) are random from the
    caller's torch RNG; ``s1`` and ``s`` are the noise scales. Latent sites ``"z2"`` then
    ``"z1"`` (the model's order); the flat latent vector of the estimators is [z2, z1].
    """

    def __init__(
        self,
        x_dim: int = 5,
        z1_dim: int = 3,
        z2_dim: int = 2,
        s1: float = 0.6,
        s: float = 0.4,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.x_dim, self.z1_dim, self.z2_dim = x_dim, z1_dim, z2_dim
        self.s1, self.s = float(s1), float(s)
        self.A = nn.Parameter(torch.randn(z1_dim, z2_dim, dtype=dtype) * 0.8)
        self.a = nn.Parameter(torch.randn(z1_dim, dtype=dtype) * 0.3)
        self.W = nn.Parameter(torch.randn(x_dim, z1_dim, dtype=dtype) * 0.8)
        self.b = nn.Parameter(torch.randn(x_dim, dtype=dtype) * 0.3)
        # the amortized guide: q(z2|x) q(z1|x), diagonal and linear in x
        self.enc2 = nn.Linear(x_dim, z2_dim).to(dtype)
        self.enc1 = nn.Linear(x_dim, z1_dim).to(dtype)
        self.log_scale2 = nn.Parameter(torch.full((z2_dim,), -0.5, dtype=dtype))
        self.log_scale1 = nn.Parameter(torch.full((z1_dim,), -0.5, dtype=dtype))

    def model(self, x: Tensor, y: Optional[Tensor] = None) -> None:
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(x.new_zeros(self.z2_dim), 1.0).to_event(1))
            z1 = pyro.sample("z1", dist.Normal(z2 @ self.A.T + self.a, self.s1).to_event(1))
            pyro.sample("x", dist.Normal(z1 @ self.W.T + self.b, self.s).to_event(1), obs=x)

    def guide(self, x: Tensor, y: Optional[Tensor] = None) -> None:
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z2", dist.Normal(self.enc2(x), self.log_scale2.exp()).to_event(1))
            pyro.sample("z1", dist.Normal(self.enc1(x), self.log_scale1.exp()).to_event(1))

    def joint(self) -> Tuple[Tensor, Tensor]:
        """Mean and covariance of the Gaussian over (z2, z1, x)."""
        eye = lambda n: torch.eye(n, dtype=self.A.dtype)  # noqa: E731
        # (z2, z1, x) = L eps + m, eps ~ N(0, I) of size z2 + z1 + x
        d2, d1, dx = self.z2_dim, self.z1_dim, self.x_dim
        m2 = torch.zeros(d2, dtype=self.A.dtype)
        m1 = self.a
        mx = self.W @ self.a + self.b
        c22 = eye(d2)
        c12 = self.A
        c11 = self.A @ self.A.T + self.s1**2 * eye(d1)
        cx2 = self.W @ self.A
        cx1 = self.W @ c11
        cxx = self.W @ c11 @ self.W.T + self.s**2 * eye(dx)
        cov = torch.cat(
            [
                torch.cat([c22, c12.T, cx2.T], 1),
                torch.cat([c12, c11, cx1.T], 1),
                torch.cat([cx2, cx1, cxx], 1),
            ],
            0,
        )
        return torch.cat([m2, m1, mx]), cov

    def exact_log_marginal(self, x: Tensor) -> Tensor:
        """log p(x), ``(N,)``."""
        mean, cov = self.joint()
        k = self.z2_dim + self.z1_dim
        return dist.MultivariateNormal(mean[k:], covariance_matrix=cov[k:, k:]).log_prob(x)

    def exact_posterior(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """(mean ``(N, z2 + z1)``, covariance) of p(z2, z1 | x), in the flat order [z2, z1]."""
        mean, cov = self.joint()
        return _mvn_condition(mean, cov, x, self.z2_dim + self.z1_dim)

    def optimal_mean_field(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """(loc, scale) of the diagonal Gaussian over [z2, z1] minimizing KL(q || p(z2, z1 | x)):
        the posterior mean and precisions diag(Sigma^-1) (Bishop 2006, 10.1.2)."""
        loc, cov = self.exact_posterior(x)
        return loc, torch.linalg.inv(cov).diagonal().rsqrt().expand_as(loc)

    def exact_posterior_guide(self, x: Tensor, y: Optional[Tensor] = None) -> None:
        """p(z2 | x) p(z1 | z2, x): the exact joint posterior as two sites."""
        loc, cov = self.exact_posterior(x)
        k2 = self.z2_dim
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.MultivariateNormal(loc[..., :k2], covariance_matrix=cov[:k2, :k2]))
            gain = torch.linalg.solve(cov[:k2, :k2], cov[:k2, k2:]).T  # Sigma_12 Sigma_22^-1
            loc1 = loc[..., k2:] + (z2 - loc[..., :k2]) @ gain.T
            cov1 = cov[k2:, k2:] - gain @ cov[:k2, k2:]
            pyro.sample("z1", dist.MultivariateNormal(loc1, covariance_matrix=cov1))


class TwoComponentLinearGaussian(nn.Module):
    """c ~ Cat(pi) (two values, enumerated), z | c ~ N(m_c, I), x | z ~ N(W z + b, s^2 I).

    The discrete site ``"c"`` is marked ``infer={"enumerate": "parallel"}``: estimators sum it
    out exactly, so the only continuous latent site is ``"z"``.
    """

    def __init__(self, x_dim: int = 4, z_dim: int = 2, s: float = 0.5, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.s = float(s)
        self.logits = nn.Parameter(torch.tensor([0.3, -0.3], dtype=dtype))
        self.means = nn.Parameter(torch.tensor([[1.5] * z_dim, [-1.5] * z_dim], dtype=dtype))
        self.W = nn.Parameter(torch.randn(x_dim, z_dim, dtype=dtype) * 0.8)
        self.b = nn.Parameter(torch.randn(x_dim, dtype=dtype) * 0.3)
        self.enc = nn.Linear(x_dim, z_dim).to(dtype)
        self.log_scale = nn.Parameter(torch.zeros(z_dim, dtype=dtype))

    def model(self, x: Tensor, y: Optional[Tensor] = None) -> None:
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(logits=self.logits), infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(self.means[c], 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.s).to_event(1), obs=x)

    def guide(self, x: Tensor, y: Optional[Tensor] = None) -> None:
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.enc(x), self.log_scale.exp()).to_event(1))

    def _per_component(self, x: Tensor):
        """log pi_c + log N(x; W m_c + b, C) ``(2, N)`` and the posterior of z given c ((2, N, d), (d, d))."""
        d = self.W.shape[1]
        eye = torch.eye(d, dtype=x.dtype)
        cov_x = self.W @ self.W.T + self.s**2 * torch.eye(self.W.shape[0], dtype=x.dtype)
        log_pi = torch.log_softmax(self.logits, -1)
        terms, locs = [], []
        precision = eye + self.W.T @ self.W / self.s**2
        cov_z = torch.linalg.inv(precision)
        for c in range(2):
            m = self.means[c]
            terms.append(log_pi[c] + dist.MultivariateNormal(self.W @ m + self.b, covariance_matrix=cov_x).log_prob(x))
            locs.append((m + (x - self.b) @ self.W / self.s**2) @ cov_z.T)
        return torch.stack(terms), torch.stack(locs), cov_z

    def exact_log_marginal(self, x: Tensor) -> Tensor:
        """log p(x) = log sum_c pi_c N(x; W m_c + b, W W^T + s^2 I), ``(N,)``."""
        return self._per_component(x)[0].logsumexp(0)

    def exact_posterior_guide(self, x: Tensor, y: Optional[Tensor] = None) -> None:
        """p(z | x) = sum_c p(c | x) N(z; mean_c(x), Sigma): the exact posterior as one continuous site."""
        terms, locs, cov = self._per_component(x)
        weights = (terms - terms.logsumexp(0)).T  # (N, 2) log p(c | x)
        components = dist.MultivariateNormal(locs.transpose(0, 1), covariance_matrix=cov)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MixtureSameFamily(dist.Categorical(logits=weights), components))
