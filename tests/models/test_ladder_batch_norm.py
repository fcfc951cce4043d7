"""Batch normalisation in the hierarchical models (issue 26, item 1): where it sits, train vs eval
mode (running statistics), the fast path against Pyro's program with it, estimators that score in
eval mode, checkpoints that keep the running statistics and a resume that continues exactly, and
any number of layers from the command line (``latent_dims``)."""

from __future__ import annotations

import json

import pytest
import torch
from pyro.infer import Trace_ELBO

import ppl_vae
from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ppl_vae.inference.fused import fused_elbo_loss
from ppl_vae.inference.importance import importance_estimate
from ppl_vae.inference.latents import check_fast_path, model_layout
from ppl_vae.inference.training import METHODS
from ppl_vae.models import build_vae
from ppl_vae.models.networks import BatchNorm, mlp
from tests.conftest import invoke

pytestmark = pytest.mark.usefixtures("one_thread")


def small(name, **options):
    hidden = {} if "hidden_dims" in options else {"hidden_dim": 8}  # both would be refused: one sets the sizes
    return build_vae(name, (1, 4, 4), latent_dim=2, model_options=options, **hidden)


def binary(n=12, seed=0):
    return torch.bernoulli(torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed)))


def norms(module):
    return [m for m in module.modules() if isinstance(m, BatchNorm)]


def trained(vae, steps=5):
    """A few SVI steps, so that the running statistics are no longer their initial 0 and 1."""
    stepper = METHODS.get("svi")(vae, TrainConfig(lr=1e-2))
    for i in range(steps):
        stepper.step(binary(seed=i), num_data=60)
    return vae


# ---------------------------------------------------------------------------------------------
# Where it sits


def test_on_by_default_for_the_ladder_in_every_network_and_off_for_two_layer():
    ladder = build_vae("ladder", (1, 28, 28))
    assert ladder.batch_norm
    # every hidden layer of the bottom-up MLPs (2 each), the generative conditional (2), the decoder (2)
    assert [len(norms(step)) for step in ladder.encoder] == [2, 2]
    assert len(norms(ladder.generative)) == 2 and len(norms(ladder.decoder)) == 2
    assert [m.num_features for m in norms(ladder.encoder[0])] == [200, 200]
    # a normalised linear map has no bias (the normalisation's shift replaces it); the heads keep theirs
    linears = [m for m in ladder.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(m.bias is None for m in linears) == 8 and sum(m.bias is not None for m in linears) == 4
    two = build_vae("two_layer", (1, 28, 28))
    assert not two.batch_norm and not norms(two)
    assert all(m.bias is not None for m in two.modules() if isinstance(m, torch.nn.Linear))
    assert len(norms(build_vae("two_layer", (1, 28, 28), model_options={"batch_norm": True}))) == 2 * 4
    assert not norms(build_vae("ladder", (1, 28, 28), model_options={"batch_norm": False}))
    # the option off leaves every other model's networks (and numbers) as they were
    assert not norms(build_vae("one_layer", (1, 28, 28))) and not norms(build_vae("bernoulli_mlp", (1, 8, 8)))
    torch.manual_seed(0)
    plain = mlp([5, 4, 3])
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), mlp([5, 4, 3], batch_norm=False).parameters()))


def test_batch_norm_normalises_over_every_leading_dim_and_uses_running_statistics_in_eval_mode():
    torch.manual_seed(0)
    norm = BatchNorm(3)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.normal_()
    x = torch.randn(4, 5, 3) * 3 + 1  # (particles, datapoints, features)
    flat = torch.nn.BatchNorm1d(3)
    flat.load_state_dict(norm.state_dict())
    out = norm(x)
    assert out.shape == x.shape
    assert torch.allclose(out, flat(x.reshape(-1, 3)).reshape(4, 5, 3), atol=1e-6)
    # training mode: the statistics of all 20 rows, and the running statistics move towards them
    assert torch.allclose(norm.running_mean, 0.1 * x.reshape(-1, 3).mean(0), atol=1e-6)
    assert int(norm.num_batches_tracked) == 1
    norm.eval()
    running = norm.running_mean.clone(), norm.running_var.clone()
    y = norm(x)
    expected = (x - running[0]) / (running[1] + norm.eps).sqrt() * norm.weight + norm.bias
    assert torch.allclose(y, expected, atol=1e-5) and not torch.allclose(y, out, atol=1e-2)
    assert torch.equal(norm.running_mean, running[0]) and int(norm.num_batches_tracked) == 1
    assert torch.allclose(norm(x[:, :1]), y[:, :1], atol=1e-6)  # one row alone: no batch needed in eval mode


@pytest.mark.parametrize("name,options", [("ladder", {}), ("two_layer", {"batch_norm": True})])
def test_train_and_eval_mode_differ_and_eval_mode_scores_each_datapoint_alone(name, options):
    torch.manual_seed(0)
    vae = trained(small(name, **options))
    x = binary(seed=9)
    train_loc = vae.guide_means(x)["z1"][0]
    vae.eval()
    eval_loc = vae.guide_means(x)["z1"][0]
    assert not torch.allclose(train_loc, eval_loc, atol=1e-3)
    # eval mode: a datapoint's guide does not depend on its batch; training mode: it does
    assert torch.allclose(vae.guide_means(x[:3])["z1"][0], eval_loc[:3], atol=1e-6)
    vae.train()
    assert not torch.allclose(vae.guide_means(x[:3])["z1"][0], train_loc[:3], atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Fast path, estimators


@pytest.mark.parametrize("name,options", [("ladder", {}), ("two_layer", {"batch_norm": True})])
def test_the_fast_path_is_pyros_program_with_batch_norm(name, options):
    torch.manual_seed(0)
    vae = trained(small(name, **options))
    x = binary(seed=9)
    vae.eval()  # running statistics: what every estimator scores
    assert check_fast_path(vae, x, num_particles=3) < 1e-4
    vae.train()  # batch statistics, over particles and datapoints alike on both paths
    assert check_fast_path(vae, x, num_particles=3) < 1e-4
    torch.manual_seed(1)
    fused = fused_elbo_loss(vae, x, num_data=60)
    torch.manual_seed(1)
    traced = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, num_data=60)
    assert float(fused) == pytest.approx(float(traced), rel=1e-5)


def test_estimators_score_in_eval_mode_and_leave_the_running_statistics_alone():
    torch.manual_seed(0)
    vae = trained(small("ladder"))
    x = binary(seed=9)
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    est = importance_estimate(vae.model, vae.guide, x, num_samples=20, seed=0)
    assert vae.training and all(m.training for m in vae.modules())
    assert all(torch.equal(v, state[k]) for k, v in vae.state_dict().items())
    vae.eval()
    by_hand = importance_estimate(vae.model, vae.guide, x, num_samples=20, seed=0)
    assert torch.equal(est.log_px, by_hand.log_px)
    vae.train()
    in_training_mode = importance_estimate(lambda x: vae.model(x), lambda x: vae.guide(x), x, num_samples=20, seed=0)
    assert not torch.allclose(in_training_mode.log_px, est.log_px, atol=1e-3)  # what eval mode avoids


# ---------------------------------------------------------------------------------------------
# Checkpoints and resume


def ladder_config(epochs, **model_options) -> RunConfig:
    return RunConfig(
        model=ModelConfig(model="ladder", latent_dim=2, hidden_dim=16, model_options=model_options),
        data=DataConfig(dataset="digits", binarize="threshold", train_size=200),
        train=TrainConfig(epochs=epochs, batch_size=50, lr=3e-3, device="cpu", train_eval_size=50),
    )


def test_a_checkpoint_keeps_the_running_statistics_and_a_resume_continues_exactly(tmp_path):
    straight = ppl_vae.fit(ladder_config(4), tmp_path / "a", progress=False)
    ppl_vae.fit(ladder_config(2), tmp_path / "b", progress=False)
    loaded = ppl_vae.load_run(tmp_path / "b")
    stats = {k: v for k, v in loaded.vae.state_dict().items() if "running" in k or "num_batches" in k}
    assert len(stats) == 3 * 8  # 8 normalisations, each with running mean, variance and count
    assert all(int(v) == 2 * 4 for k, v in stats.items() if "num_batches" in k and "generative" not in k)
    assert not any(torch.equal(v, torch.zeros_like(v)) for k, v in stats.items() if "running_mean" in k)
    resumed = ppl_vae.resume(tmp_path / "b", epochs=4, progress=False)
    assert list(resumed.history.epoch.values) == [1, 2, 3, 4]
    a, b = straight.vae.state_dict(), resumed.vae.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-6, atol=1e-7), k
    assert resumed.history.test_elbo.values == pytest.approx(straight.history.test_elbo.values, rel=1e-6)


def test_a_five_layer_ladder_from_the_command_line_trains_every_parameter(tmp_path):
    from ppl_vae.pipeline import prepare

    out = tmp_path / "ladder5"
    args = ["--model", "ladder", "--model-option", "latent_dims=[8,6,4,3,2]", "--hidden-dim", "16"]
    fast = ["--dataset", "digits", "--train-size", "200", "--batch-size", "50", "--device", "cpu", "--no-progress"]
    result = invoke("fit", *args, "--epochs", "1", *fast, "--out", out)
    assert result.exit_code == 0, result.output
    config = ppl_vae.load_run(out).config
    assert config.model.model_options == {"latent_dims": [8, 6, 4, 3, 2]}
    initial = prepare(config)[0]  # seeded as fit seeds it: the weights before the first step
    run = ppl_vae.load_run(out)
    assert run.vae.latent_dims == (8, 6, 4, 3, 2) and run.vae.prior.latent_dim == 2
    assert model_layout(run.vae.model, torch.zeros(2, 1, 8, 8)).names == ("z5", "z4", "z3", "z2", "z1")
    assert run.vae.hidden_dims == ((16, 16), (8, 8), (4, 4), (2, 2), (1, 1))
    assert len(norms(run.vae)) == 5 * 2 + 4 * 2 + 2
    before = dict(initial.named_parameters())
    still = [k for k, v in run.vae.named_parameters() if torch.equal(v, before[k])]
    assert not still, still
    # the per-layer warm-up takes one fraction per layer
    result = invoke("fit", "--resume", out, "--epochs", "2", "--no-progress")
    assert result.exit_code == 0 and "epoch 2:" in result.output, result.output
    vae = build_vae("ladder", (1, 8, 8), model_options={"latent_dims": [8, 6, 4], "kl_warmup_fractions": [0.2, 0.5, 1]})
    assert vae.kl_weights(0.1) == pytest.approx((0.5, 0.2, 0.1))


def test_bad_layer_sizes_are_one_line_errors():
    with pytest.raises(ValueError, match=r"give z1_dim or latent_dims, not both"):
        small("ladder", latent_dims=[4, 2], z1_dim=3)
    with pytest.raises(ValueError, match=r"latent_dims=\[4, 3\] puts 3 units in the top layer but latent_dim"):
        small("ladder", latent_dims=[4, 3])  # --latent-dim 2 given, not the default
    assert small("ladder", latent_dims=[4, 2]).latent_dims == (4, 2)
    with pytest.raises(ValueError, match=r"option 'latent_dims' must be null or a list of integers >= 1"):
        small("two_layer", latent_dims=[4, 0])
    with pytest.raises(ValueError, match=r"option 'batch_norm' must be true or false"):
        small("ladder", batch_norm="yes")
    with pytest.raises(ValueError, match=r"kl_warmup_fractions must be 3 numbers"):
        build_vae("ladder", (1, 4, 4), model_options={"latent_dims": [4, 3, 2], "kl_warmup_fractions": [1, 1]})
    with pytest.raises(ValueError, match=r"the prior \('mixture_of_gaussians'\) is over 50: give --latent-dim 2"):
        build_vae("ladder", (1, 4, 4), prior="mixture_of_gaussians", model_options={"latent_dims": [4, 2]})
    result = invoke(
        "fit", "--model", "ladder", "--model-option", "latent_dims=[4,3]", "--latent-dim", "5", "--epochs", "1"
    )
    assert result.exit_code != 0 and "leave --latent-dim out or set it to 3" in result.output
    assert "\n" not in result.output.strip().splitlines()[-1]


def test_the_recorded_option_rebuilds_the_model(tmp_path):
    config = ladder_config(1, latent_dims=[6, 4, 2], batch_norm=False)
    run = ppl_vae.fit(config, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["model"]["model_options"]
    assert saved == {"latent_dims": [6, 4, 2], "batch_norm": False}
    loaded = ppl_vae.load_run(tmp_path / "run")
    assert loaded.vae.latent_dims == (6, 4, 2) and not norms(loaded.vae) and run.vae.num_layers == 3


# ---------------------------------------------------------------------------------------------
# One top-down pass: p(z_l | z_{l+1}) once per step (issue 26, item 6)


@pytest.mark.parametrize("latent_dims", [[4, 2], [6, 4, 2]])
def test_the_one_pass_gives_the_draws_and_numbers_of_sample_guide_then_log_prior(latent_dims):
    vae = trained(small("ladder", latent_dims=latent_dims))
    x = binary(seed=9)
    for mode in ("train", "eval"):
        getattr(vae, mode)()
        state = {k: v.clone() for k, v in vae.state_dict().items()}
        torch.manual_seed(4)
        latents, log_q = vae.sample_guide(x, 3)
        log_p = vae.log_prior(x, latents)
        vae.load_state_dict(state)  # the two-pass call moved the running statistics in train mode
        torch.manual_seed(4)
        one_latents, one_q, one_p = vae.guide_and_prior(x, 3)
        assert set(one_latents) == set(latents)
        for k in latents:
            assert torch.equal(one_latents[k], latents[k])
        assert torch.allclose(one_q, log_q, atol=1e-5) and torch.allclose(one_p, log_p, atol=1e-5)


def test_a_fused_step_runs_the_generative_network_once():
    vae = small("ladder")
    stepper = METHODS.get("svi")(vae, TrainConfig(lr=1e-2))
    assert stepper.fused
    stepper.step(binary(), num_data=60)
    tracked = {int(m.num_batches_tracked) for m in norms(vae)}
    assert tracked == {1}  # every normalisation, the generative one included, saw one batch (it saw two before)


def test_a_subclass_that_changes_log_prior_gets_the_two_pass_composition():
    base = small("ladder")

    class Warmer(type(base)):  # type: ignore[misc]
        has_fast_path = True  # it keeps its fast path, so its log_prior must be the one scored

        def log_prior(self, x, latents, y=None):
            return super().log_prior(x, latents, y) * 0.5

    user = Warmer((1, 4, 4), [4, 2], base.prior, base.likelihood, hidden_dims=[[8, 8], [4, 4]])
    x = binary()
    torch.manual_seed(1)
    latents, _, log_p = user.guide_and_prior(x, 2)
    assert torch.allclose(log_p, 0.5 * type(base).log_prior(user, x, latents), atol=1e-5)
