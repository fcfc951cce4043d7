"""Wake-sleep improves a linear-Gaussian model toward the planted one and updates the right parts."""

from __future__ import annotations

import pytest
import torch

from ppl_vae.config import TrainConfig
from ppl_vae.data.datasets import Dataset
from ppl_vae.inference.training import METHODS, train
from ppl_vae.inference.wake_sleep import WakeSleepStepper
from ppl_vae.models.linear_gaussian import LinearGaussianVAE


def planted_data(n=400, x_dim=8, latent_dim=2, sigma=0.5):
    torch.manual_seed(11)
    true = LinearGaussianVAE(x_dim, latent_dim, sigma=sigma)
    with torch.no_grad():
        x = true.decode(torch.randn(n, latent_dim)) + sigma * torch.randn(n, x_dim)
    return true, x


def test_registered_as_wake_sleep():
    assert METHODS.get("wake-sleep") is WakeSleepStepper


def test_wake_sleep_improves_log_marginal_and_elbo():
    true, x = planted_data()
    torch.manual_seed(0)
    vae = LinearGaussianVAE(8, 2, sigma=0.5)
    stepper = WakeSleepStepper(vae, TrainConfig(method="wake-sleep", optimizer="adam", lr=0.02))
    with torch.no_grad():
        before_lp, before_elbo = vae.exact_log_marginal(x).mean(), vae.elbo_closed_form(x).mean()
    for _ in range(150):
        idx = torch.randint(0, len(x), (50,))
        loss = stepper.step(x[idx], num_data=len(x))
        assert torch.isfinite(loss)
    with torch.no_grad():
        after_lp, after_elbo = vae.exact_log_marginal(x).mean(), vae.elbo_closed_form(x).mean()
        best = true.exact_log_marginal(x).mean()
    assert after_lp > before_lp + 3.0
    assert after_elbo > before_elbo + 3.0
    assert after_lp > best - 1.0  # close to the planted model's evidence
    assert after_elbo <= after_lp + 1e-4  # a lower bound stays below


def test_phases_touch_only_their_parameters():
    _, x = planted_data(n=50)
    vae = LinearGaussianVAE(8, 2, sigma=0.5)
    stepper = WakeSleepStepper(vae, TrainConfig(method="wake-sleep", lr=0.1, optimizer="sgd"))
    wake_params = stepper.optimizers["wake"].param_groups[0]["params"]
    sleep_params = stepper.optimizers["sleep"].param_groups[0]["params"]
    assert {id(p) for p in wake_params}.isdisjoint(id(p) for p in sleep_params)
    assert {id(p) for p in sleep_params} == {id(p) for p in vae.encoder.parameters()}
    before = {n: p.detach().clone() for n, p in vae.named_parameters()}
    stepper.step(x, num_data=50)
    changed = {n for n, p in vae.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("encoder") for n in changed) and any(n.startswith("decoder") for n in changed)


def test_loss_is_negative_elbo_scaled_to_data():
    _, x = planted_data(n=400)
    vae = LinearGaussianVAE(8, 2, sigma=0.5)
    stepper = WakeSleepStepper(vae, TrainConfig(method="wake-sleep", lr=1e-8, optimizer="sgd"))
    with torch.no_grad():
        exact = -vae.elbo_closed_form(x).sum()
    losses = torch.stack([stepper.step(x, num_data=800) for _ in range(200)])
    # one-sample estimate of -ELBO, times num_data / batch = 2
    torch.testing.assert_close(losses.mean(), 2 * exact, rtol=0.02, atol=0)


def test_train_with_wake_sleep_records_history():
    _, x = planted_data(n=200)
    data = Dataset("toy", x[:150], x[150:])
    vae = LinearGaussianVAE(8, 2, sigma=0.5)
    history = train(vae, data, TrainConfig(method="wake-sleep", epochs=3, batch_size=50, lr=0.02), progress=False)
    assert history.sizes["epoch"] == 3
    assert float(history.train_elbo[-1]) > float(history.train_elbo[0])


def test_refuses_kl_warmup():
    with pytest.raises(ValueError, match="kl_warmup_epochs"):
        WakeSleepStepper(LinearGaussianVAE(4, 2), TrainConfig(method="wake-sleep", kl_warmup_epochs=2))


def test_refuses_a_prior_that_uses_the_encoder():
    """The VampPrior evaluates the encoder, so the wake phase would train it too."""
    from ppl_vae.models import build_vae

    vae = build_vae("bernoulli_mlp", (1, 4, 4), prior="vamp", latent_dim=2, hidden_dim=8)
    with pytest.raises(
        ValueError, match=r"needs a model whose prior does not evaluate the encoder .*the VampPrior does"
    ):
        WakeSleepStepper(vae, TrainConfig(method="wake-sleep"))
