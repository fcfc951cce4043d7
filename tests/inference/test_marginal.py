"""HMC on z and the appendix-D estimator against a linear-Gaussian VAE's closed forms."""

from __future__ import annotations

import pytest
import torch

from ppl_vae.inference.marginal import fit_gaussian, hmc_log_marginal, hmc_posterior, log_joint
from ppl_vae.models.linear_gaussian import LinearGaussianVAE


@pytest.fixture
def lg():
    torch.manual_seed(3)
    vae = LinearGaussianVAE(6, 2, sigma=0.7)
    x = torch.randn(3, 6) * 1.5
    return vae, x


def test_log_joint_fast_path_equals_traced_model(lg):
    vae, x = lg
    z = torch.randn(3, 2)
    traced = log_joint(lambda x_, **kw: vae.model(x_, **kw), x, z)  # not a bound VAE.model: traced
    fast = log_joint(vae.model, x, z)
    loc, cov = vae.exact_posterior(x)
    exact = torch.distributions.MultivariateNormal(loc, cov).log_prob(z) + vae.exact_log_marginal(x)
    torch.testing.assert_close(fast, traced)
    torch.testing.assert_close(fast, exact, atol=1e-4, rtol=1e-5)


def test_hmc_samples_exact_posterior(lg):
    vae, x = lg
    # each datapoint repeated 100 times: 100 independent chains per posterior, pooled
    xs = x[:2].repeat_interleave(100, 0)
    result = hmc_posterior(vae.model, xs, 2, num_samples=10, warmup_steps=60)
    loc, cov = vae.exact_posterior(x[:2])
    for i in range(2):
        z = result.samples[:, i * 100 : (i + 1) * 100].reshape(-1, 2)
        torch.testing.assert_close(z.mean(0), loc[i].detach(), atol=0.08, rtol=0)
        torch.testing.assert_close(torch.cov(z.T), cov.detach(), atol=0.08, rtol=0)
    assert 0.75 < result.accept_rate <= 1.0  # the step size was adapted toward 90%


def test_fit_gaussian_recovers_planted_moments():
    torch.manual_seed(0)
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.8]])
    samples = torch.distributions.MultivariateNormal(torch.tensor([1.0, -2.0]), cov).sample((20000, 1))
    q = fit_gaussian(samples)
    torch.testing.assert_close(q.loc[0], torch.tensor([1.0, -2.0]), atol=0.03, rtol=0)
    torch.testing.assert_close(q.covariance_matrix[0], cov, atol=0.04, rtol=0)


def test_appendix_d_estimator_matches_exact_log_marginal(lg):
    vae, x = lg
    estimate = hmc_log_marginal(vae.model, None, x, latent_dim=2, num_samples=150, warmup_steps=50)
    exact = vae.exact_log_marginal(x).detach()
    torch.testing.assert_close(estimate, exact, atol=0.15, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"latent_dim": 5}, "latent_dim"),
        ({"latent_dim": 2, "num_samples": 2}, "num_samples"),
    ],
)
def test_estimator_rejects_bad_arguments(lg, kwargs, match):
    vae, x = lg
    with pytest.raises(ValueError, match=match):
        hmc_log_marginal(vae.model, None, x, **kwargs)


def test_hmc_rejects_bad_target(lg):
    vae, x = lg
    with pytest.raises(ValueError, match="target_accept_prob"):
        hmc_posterior(vae.model, x, 2, target_accept_prob=1.5)


def test_appendix_d_knows_when_log_px_cannot_be_positive(lg):
    """A Bernoulli model's p(x) is a probability: the estimate records log p(x) <= 0 and its
    warnings flag a positive estimate as impossible; a Gaussian model's density has no such limit."""
    from ppl_vae.inference import estimators
    from ppl_vae.models.zoo import build_vae

    vae, x = lg
    gaussian = estimators.estimate("appendix_d", vae.model, None, x, seed=0, num_samples=8, warmup_steps=4)
    assert gaussian.to_dataset().attrs["log_px_max"] == "none"
    torch.manual_seed(0)
    bern = build_vae("bernoulli_mlp", (6,), latent_dim=2, hidden_dim=4)
    xb = torch.bernoulli(torch.full((3, 6), 0.5))
    est = estimators.estimate("appendix_d", bern.model, None, xb, seed=0, num_samples=8, warmup_steps=4)
    ds = est.to_dataset()
    assert ds.attrs["log_px_max"] == 0.0
    assert "accept_rate" in ds and "ess" in ds  # the estimator's own diagnostics
    weak = estimators.get("appendix_d").weak
    assert not any("impossible" in w for w in weak(ds))
    ds["log_px"][1] = 15500.0  # what a chain that never left its start gave in QA
    lines = [w for w in weak(ds) if "impossible" in w]
    assert len(lines) == 1 and "for 1 of 3 datapoints" in lines[0] and "--num-samples" in lines[0]
    ds["accept_rate"][:] = 0.1
    assert any("acceptance rate below" in w for w in weak(ds))
