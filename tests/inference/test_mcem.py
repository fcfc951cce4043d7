"""MCEM with HMC: its E-step samples the exact posterior; its M-steps raise log p(x)."""

from __future__ import annotations

import pytest
import torch

from ppl_vae.config import TrainConfig
from ppl_vae.inference.mcem import MCEMStepper
from ppl_vae.inference.training import METHODS
from ppl_vae.models.linear_gaussian import LinearGaussianVAE


def test_registered_as_mcem():
    assert METHODS.get("mcem") is MCEMStepper


def test_e_step_samples_exact_posterior():
    torch.manual_seed(5)
    vae = LinearGaussianVAE(6, 2, sigma=0.6)
    x = torch.randn(1, 6).expand(200, 6)  # one datapoint repeated: 200 chains on p(z|x)
    stepper = MCEMStepper(vae, TrainConfig(method="mcem"), warmup_steps=40, num_hmc_samples=21)
    z = stepper.e_step(x)
    loc, cov = vae.exact_posterior(x[:1])
    torch.testing.assert_close(z.mean(0), loc[0].detach(), atol=0.1, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), cov.detach(), atol=0.08, rtol=0)
    # 20 joint transitions at a target of 0.9: P(share of moves <= 0.6) < 1e-3 for a working sampler
    assert 0.6 < stepper.accept_rate <= 1.0
    # the model's parameters are trainable again after the E-step
    assert all(p.requires_grad for p in vae.parameters())


def test_mcem_improves_log_marginal_on_planted_model():
    torch.manual_seed(11)
    true = LinearGaussianVAE(8, 2, sigma=0.5)
    with torch.no_grad():
        x = true.decode(torch.randn(300, 2)) + 0.5 * torch.randn(300, 8)
    torch.manual_seed(0)
    vae = LinearGaussianVAE(8, 2, sigma=0.5)
    stepper = MCEMStepper(vae, TrainConfig(method="mcem", optimizer="adam", lr=0.05), warmup_steps=3)
    with torch.no_grad():
        before = vae.exact_log_marginal(x).mean()
    losses = []
    for _ in range(15):
        idx = torch.randint(0, len(x), (100,))
        losses.append(float(stepper.step(x[idx], num_data=len(x))))
    with torch.no_grad():
        after = vae.exact_log_marginal(x).mean()
        best = true.exact_log_marginal(x).mean()
    assert after > before + 3.0
    assert after > best - 1.5
    # the complete-data objective rose too (negative Q fell)
    assert sum(losses[-3:]) < sum(losses[:3])


def test_mcem_refuses_large_latent_and_warmup():
    with pytest.raises(ValueError, match="latent dimension is at most 20"):
        MCEMStepper(LinearGaussianVAE(30, 25), TrainConfig(method="mcem"))
    with pytest.raises(ValueError, match="kl_warmup_epochs"):
        MCEMStepper(LinearGaussianVAE(4, 2), TrainConfig(method="mcem", kl_warmup_epochs=1))


def test_a_resumed_mcem_run_continues_its_adapted_step_size_exactly(tmp_path, one_thread):
    """The HMC step size adapts across E-steps; it was not checkpointed, so a resumed run restarted
    the adaptation at 1.0 and its losses and weights parted from an uninterrupted run's."""
    import ppl_vae
    from ppl_vae import runs
    from ppl_vae.config import DataConfig, ModelConfig, RunConfig

    def config(epochs):
        options = {"num_leapfrog_steps": 2, "warmup_steps": 2, "num_weight_updates": 1}
        train = TrainConfig(epochs=epochs, device="cpu", batch_size=50, train_eval_size=100, method="mcem")
        train.method_options = options
        return RunConfig(
            ModelConfig(model="gaussian_mlp", latent_dim=2, hidden_dim=8), DataConfig(train_size=100), train
        )

    straight = ppl_vae.fit(config(3), tmp_path / "a", progress=False)
    ppl_vae.fit(config(1), tmp_path / "b", progress=False)
    step_size = runs.read_checkpoint(tmp_path / "b", tensors=False)[1]["method_state"]["step_size"]
    assert isinstance(step_size, float) and step_size != 1.0  # adapted during the first epoch
    resumed = ppl_vae.resume(tmp_path / "b", epochs=3, progress=False)
    assert resumed.history.train_loss.values.tolist() == straight.history.train_loss.values.tolist()
    for (name, a), (_, b) in zip(straight.vae.state_dict().items(), resumed.vae.state_dict().items()):
        assert torch.equal(a, b), name


def test_mcem_method_state_takes_a_finite_positive_step_size_only():
    import math

    vae = LinearGaussianVAE(x_dim=4, latent_dim=2)
    stepper = MCEMStepper(vae, TrainConfig(method="mcem", device="cpu"))
    for good, expected in (
        ({"step_size": 1}, 1.0),
        ({"step_size": 0.25}, 0.25),
        ({}, None),
        ({"step_size": None}, None),
    ):
        stepper.load_method_state(good)  # a JSON integer too; {} and null: an older run, adaptation restarts
        assert stepper.step_size == expected
    for bad in ({"step_size": math.inf}, {"step_size": math.nan}, {"step_size": -1.0}, {"step_size": True}, {"x": 1}):
        with pytest.raises(ValueError, match="a finite number > 0"):
            stepper.load_method_state(bad)
