"""Pyro's ELBO estimators on the library's VAE contract, against the linear-Gaussian closed form."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from ppl_vae.inference.importance import elbo_per_datapoint, log_importance_weights
from ppl_vae.models.linear_gaussian import LinearGaussianVAE


@pytest.fixture
def lg():
    torch.manual_seed(1)
    model = LinearGaussianVAE(x_dim=6, latent_dim=2, sigma=0.6)
    x = torch.randn(8, 6) + 0.5
    return model, x


def test_elbo_estimate_agrees_with_closed_form(lg):
    model, x = lg
    with torch.no_grad():
        exact = model.elbo_closed_form(x)
        log_w = log_importance_weights(model.model, model.guide, x, num_particles=20000)
    estimate = log_w.mean(0)
    stderr = log_w.std(0) / 20000**0.5
    assert torch.all((estimate - exact).abs() < 5 * stderr + 1e-4), (estimate, exact, stderr)
    assert torch.allclose(
        elbo_per_datapoint(model.model, model.guide, x, num_particles=20000, batch_size=3), exact, atol=0.05
    )


@pytest.mark.parametrize("elbo_cls", [Trace_ELBO, TraceMeanField_ELBO])
def test_pyro_losses_agree_in_expectation_with_closed_form(lg, elbo_cls):
    """Trace_ELBO (SGVB estimator A) and TraceMeanField_ELBO (estimator B) both estimate -ELBO."""
    model, x = lg
    elbo = elbo_cls(num_particles=4000, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        loss = elbo.loss(model.model, model.guide, x)
        exact = -model.elbo_closed_form(x).sum().item()
    assert loss == pytest.approx(exact, rel=2e-3)


def test_minibatch_loss_is_scaled_to_the_full_dataset(lg):
    model, x = lg
    elbo = TraceMeanField_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        scaled = elbo.loss(model.model, model.guide, x, num_data=80)
        exact = -model.elbo_closed_form(x).sum().item() * 80 / 8
    assert scaled == pytest.approx(exact, rel=2e-3)


def test_reparameterized_gradient_matches_closed_form_gradient(lg):
    model, x = lg
    params = [model.encoder.linear.weight, model.encoder.log_scale]
    exact = torch.autograd.grad(-model.elbo_closed_form(x).sum(), params)
    loss = Trace_ELBO(num_particles=20000, vectorize_particles=True, max_plate_nesting=1).differentiable_loss(
        model.model, model.guide, x
    )
    estimate = torch.autograd.grad(loss, params)
    for g_hat, g in zip(estimate, exact):
        assert torch.allclose(g_hat, g, atol=0.05 * g.abs().max().item() + 1e-3), (g_hat, g)


def test_kl_weight_scales_only_the_latent_terms(lg):
    model, x = lg
    elbo = TraceMeanField_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=1)
    loc, scale = model.encoder(x)
    with torch.no_grad():
        kl = 0.5 * (scale**2 + loc**2 - 1.0 - 2.0 * scale.log()).sum()
        # the same draws of z in both calls, so the likelihood terms cancel exactly
        pyro.set_rng_seed(3)
        full = elbo.loss(model.model, model.guide, x)
        pyro.set_rng_seed(3)
        half = elbo.loss(model.model, model.guide, x, kl_weight=0.5)
    assert full - half == pytest.approx(0.5 * kl.item(), rel=1e-4)
