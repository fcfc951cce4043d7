"""Per-datapoint mean-field VI against the linear-Gaussian closed form (Bishop 2006, 10.1.2)."""

from __future__ import annotations

import pytest
import torch

from ppl_vae.inference.meanfield import MEAN_FIELD_INITS, fit_mean_field, guide_moments, prior_moments
from ppl_vae.models.linear_gaussian import LinearGaussianVAE


@pytest.fixture
def lg():
    torch.manual_seed(5)
    model = LinearGaussianVAE(x_dim=5, latent_dim=2, sigma=0.5)
    return model, torch.randn(6, 5)


def test_recovers_posterior_mean_and_best_diagonal_variance(lg):
    model, x = lg
    before = [p.detach().clone() for p in model.parameters()]
    result = fit_mean_field(model.model, x, init="prior", lr=0.1, max_steps=400, num_particles=128,
                            tol=1e-3, window=20, num_eval_samples=2000, progress=False)
    with torch.no_grad():
        loc, scale = model.optimal_mean_field(x)
        post_loc, _ = model.exact_posterior(x)
        best_elbo = model.elbo_closed_form(x, loc, scale)
        amortized_elbo = model.elbo_closed_form(x)
    assert torch.allclose(loc, post_loc)
    assert (result.loc - loc).abs().max() < 0.03
    assert (result.scale - scale).abs().max() < 0.02
    # L[q*] reaches the best diagonal ELBO, within Monte Carlo error, and beats the amortized q.
    assert torch.all((result.elbo - best_elbo).abs() < 5 * result.estimate.elbo_stderr + 0.02)
    assert torch.all(result.elbo > amortized_elbo)
    # the model is frozen: parameters unchanged and no gradients left on them
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b) and p.grad is None
    assert bool(result.converged.all())
    assert result.trace.shape[0] == 1 and int(result.num_steps[0]) < 400


def test_encoder_init_starts_at_the_guide_and_batches_are_independent(lg):
    model, x = lg
    one_step = fit_mean_field(model.model, x, guide=model.guide, init="encoder", lr=1e-9, max_steps=1,
                              batch_size=4, num_eval_samples=5, progress=False)
    loc, scale = model.encoder(x)
    assert torch.allclose(one_step.loc, loc.detach(), atol=1e-6)
    assert torch.allclose(one_step.scale, scale.detach(), atol=1e-6)
    assert one_step.trace.shape == (2, 1)  # two batches: 4 + 2 datapoints
    assert one_step.to_dataset().sizes == {"datapoint": 6, "latent": 2}


def test_moments_of_prior_and_full_covariance_guide(lg):
    model, x = lg
    loc, scale = prior_moments(model.model, x)
    assert torch.equal(loc, torch.zeros(6, 2)) and torch.equal(scale, torch.ones(6, 2))
    loc, scale = guide_moments(model.exact_posterior_guide, x)
    post_loc, cov = model.exact_posterior(x)
    assert torch.allclose(loc, post_loc.detach(), atol=1e-6)
    assert torch.allclose(scale, cov.diagonal().sqrt().expand(6, 2).detach(), atol=1e-6)


def test_bad_arguments(lg):
    model, x = lg
    with pytest.raises(ValueError, match="needs the amortized guide"):
        fit_mean_field(model.model, x, init="encoder", progress=False)
    with pytest.raises(ValueError, match="valid mean-field inits: encoder, prior"):
        fit_mean_field(model.model, x, init="nowhere", progress=False)
    with pytest.raises(ValueError, match="lr must be"):
        fit_mean_field(model.model, x, init="prior", lr=-1.0, progress=False)
    with pytest.raises(ValueError, match="max_steps"):
        fit_mean_field(model.model, x, init="prior", max_steps=0, progress=False)
    assert set(MEAN_FIELD_INITS) == {"encoder", "prior"}
