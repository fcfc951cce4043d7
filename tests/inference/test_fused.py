"""The fused ELBO equals Pyro's Trace_ELBO / TraceMeanField_ELBO: same value, same gradients."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from ppl_vae.inference.fused import fused_elbo_loss, supports_fused_elbo
from ppl_vae.models import LIKELIHOODS, PRIORS, build_vae
from ppl_vae.models.linear_gaussian import LinearGaussianVAE


def losses_and_grads(vae, x, elbo, **kwargs):
    options = dict(num_particles=kwargs.get("num_particles", 1), vectorize_particles=True, max_plate_nesting=1)
    pyro.set_rng_seed(7)
    ref = elbo(**options).differentiable_loss(
        vae.model, vae.guide, x, num_data=kwargs.get("num_data"), kl_weight=kwargs.get("kl_weight", 1.0)
    )
    ref_grads = torch.autograd.grad(ref, list(vae.parameters()), allow_unused=True)
    pyro.set_rng_seed(7)
    fused = fused_elbo_loss(vae, x, analytic_kl=elbo is TraceMeanField_ELBO, **kwargs)
    grads = torch.autograd.grad(fused, list(vae.parameters()), allow_unused=True)
    return ref, fused, ref_grads, grads


@pytest.mark.parametrize("prior", PRIORS.names())
@pytest.mark.parametrize("likelihood", LIKELIHOODS.names())
@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO])
def test_fused_equals_pyro(prior, likelihood, elbo):
    torch.manual_seed(0)
    vae = build_vae("gaussian_mlp", (1, 3, 3), prior=prior, likelihood=likelihood, latent_dim=2, hidden_dim=6)
    x = torch.rand(5, 1, 3, 3)
    ref, fused, ref_grads, grads = losses_and_grads(vae, x, elbo, num_data=50, kl_weight=0.7)
    assert fused.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-5)
    for g_ref, g in zip(ref_grads, grads):
        if g_ref is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            assert torch.allclose(g, g_ref, rtol=1e-4, atol=1e-5)


def test_fused_with_vectorized_particles():
    torch.manual_seed(0)
    vae = build_vae("bernoulli_mlp", (4,), latent_dim=2, hidden_dim=5)
    x = torch.bernoulli(torch.full((6, 4), 0.4))
    ref, fused, _, _ = losses_and_grads(vae, x, Trace_ELBO, num_particles=3)
    assert fused.item() == pytest.approx(ref.item(), rel=1e-5)


def test_the_fast_path_is_the_declared_protocol_not_the_class_of_a_method():
    from ppl_vae.inference.latents import check_fast_path, fast_pair
    from ppl_vae.models.cvae import ConditionalVAE

    assert supports_fused_elbo(build_vae("gaussian_mlp", (4,)))

    class Logged(LinearGaussianVAE):  # overrides the guide, changes nothing numerically, re-declares the path
        has_fast_path = True

        def guide(self, x, **kwargs):
            return super().guide(x, **kwargs)

    class Opted(LinearGaussianVAE):
        has_fast_path = False

    class Shifted(LinearGaussianVAE):  # changes the model but re-declares the flag: check_fast_path catches it
        has_fast_path = True

        def model(self, x, y=None, **kwargs):
            return super().model(x + 1.0, y, **kwargs)

    class Undeclared(LinearGaussianVAE):  # changes the model and declares nothing: loses the fast path
        def model(self, x, y=None, **kwargs):
            return super().model(x + 1.0, y, **kwargs)

    assert not Undeclared.has_fast_path and not supports_fused_elbo(Undeclared(3, 2))

    logged = Logged(3, 2)
    assert supports_fused_elbo(logged) and fast_pair(logged.model, logged.guide) is logged
    assert check_fast_path(logged, torch.randn(5, 3)) < 1e-4
    opted = Opted(3, 2)
    assert not supports_fused_elbo(opted) and fast_pair(opted.model, opted.guide) is None
    with pytest.raises(ValueError, match="differs from its model/guide"):
        check_fast_path(Shifted(3, 2), torch.randn(5, 3))
    assert not ConditionalVAE.has_fast_path  # its model and guide take y: analysis goes through traces
    assert not supports_fused_elbo(object())
    assert fast_pair(logged.model, logged.guide, {"num_data": 10}) is None  # kwargs the protocol does not take


@pytest.mark.parametrize("elbo", ["trace", "mean_field"])
def test_training_with_and_without_the_fused_path_is_the_same(tmp_path, elbo):
    import ppl_vae
    from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    runs = []
    for fused in (True, False):
        config = RunConfig(
            model=ModelConfig(model="gaussian_mlp", latent_dim=3, hidden_dim=16),
            data=DataConfig(train_size=300),
            train=TrainConfig(epochs=2, batch_size=50, elbo=elbo, fused_elbo=fused, device="cpu", kl_warmup_epochs=1),
        )
        runs.append(ppl_vae.fit(config, tmp_path / f"run{fused}", progress=False))
    assert runs[0].history.test_elbo.values == pytest.approx(runs[1].history.test_elbo.values, rel=1e-4)
    for (name, a), (_, b) in zip(runs[0].vae.state_dict().items(), runs[1].vae.state_dict().items()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("elbo", ["trace", "mean_field"])
def test_mean_field_vi_fast_path_equals_pyro_path(elbo):
    from ppl_vae.inference.latents import fast_pair
    from ppl_vae.inference.meanfield import fit_mean_field

    torch.manual_seed(0)
    vae = build_vae("gaussian_mlp", (5,), latent_dim=2, hidden_dim=6)
    assert fast_pair(vae.model) is vae and fast_pair(vae.guide) is None
    x = torch.rand(7, 5)
    results = []
    for model in (vae.model, lambda x_, **kw: vae.model(x_, **kw)):  # the protocol, then traces
        results.append(
            fit_mean_field(
                model, vae.guide, x, elbo=elbo, max_steps=60, window=20, num_eval_samples=10, progress=False, seed=11
            )
        )
    assert torch.allclose(results[0].loc, results[1].loc, atol=1e-5)
    assert torch.allclose(results[0].scale, results[1].scale, atol=1e-5)


@pytest.mark.parametrize("prior", PRIORS.names())
def test_fused_log_weights_equal_pyro_traces(prior):
    from ppl_vae.inference import importance
    from ppl_vae.inference.latents import fast_pair

    torch.manual_seed(0)
    vae = build_vae("bernoulli_mlp", (1, 3, 3), prior=prior, latent_dim=2, hidden_dim=6)
    x = torch.bernoulli(torch.full((4, 1, 3, 3), 0.3))
    assert fast_pair(vae.model, vae.guide) is vae
    assert fast_pair(vae.model, LinearGaussianVAE(3, 2).guide) is None
    pyro.set_rng_seed(5)
    fused = importance.log_importance_weights(vae.model, vae.guide, x, num_particles=7)

    # the traced path, forced by wrapping the methods so they are not the VAE's own
    pyro.set_rng_seed(5)
    traced = importance.log_importance_weights(lambda x: vae.model(x), lambda x: vae.guide(x), x, num_particles=7)
    assert fused.shape == traced.shape == (7, 4)
    assert torch.allclose(fused, traced, rtol=1e-5, atol=1e-5)
