"""Training controls: lr schedules, gradient clipping, validation split and early stopping, KL
schedules, bf16 autocast; each in config.json, resumed exactly, refused when invalid."""

from __future__ import annotations

import json
import math

import pytest
import torch

import ppl_vae
from ppl_vae import runs
from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ppl_vae.errors import ConfigError, TrainingDiverged
from ppl_vae.inference import training
from ppl_vae.inference.training import KL_SCHEDULES, epochs_since_best, validate_train_config, validation_split
from tests.conftest import drop_history_digest, invoke, one_line_error, requires_cuda


def small_config(train_size: int = 200, **train) -> RunConfig:
    defaults = dict(epochs=3, batch_size=64, lr=3e-3, device="cpu")
    defaults.update(train)
    return RunConfig(
        model=ModelConfig(model="bernoulli_mlp", latent_dim=4, hidden_dim=32),
        data=DataConfig(dataset="digits", train_size=train_size),
        train=TrainConfig(**defaults),
    )


# -- divergence and clipping ----------------------------------------------------------------------


def test_a_run_that_diverges_without_clipping_trains_with_it(tmp_path):
    """SGD at lr 0.1 on a loss scaled to the whole training set: the first updates are huge and the
    loss overflows within two epochs; clipping the gradient norm to 10 bounds every update."""
    config = small_config(optimizer="sgd", lr=0.1, train_size=400)
    with pytest.raises(
        TrainingDiverged,
        match=r"at step \d+ \(epoch \d\); try a smaller train.lr or gradient "
        r"clipping \(train.clip_grad_norm",
    ) as info:
        ppl_vae.fit(config, tmp_path / "plain", progress=False)
    assert info.value.step >= 1
    config.train.clip_grad_norm = 10.0
    run = ppl_vae.fit(config, tmp_path / "clipped", progress=False)
    elbo = run.history.test_elbo.values
    assert all(math.isfinite(v) for v in elbo)
    # 1-particle test ELBOs over 360 points: Monte Carlo se well under 1 nat; the curve rises by several
    assert elbo[-1] > elbo[0] + 1.0 and elbo[-1] > -60


def test_divergence_through_the_cli_names_the_flags_to_change(tmp_path):
    result = invoke(
        "fit",
        "--model",
        "bernoulli_mlp",
        "--latent-dim",
        4,
        "--hidden-dim",
        32,
        "--train-size",
        400,
        "--optimizer",
        "sgd",
        "--lr",
        0.1,
        "--epochs",
        3,
        "--batch-size",
        64,
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        tmp_path / "run",
    )
    line = one_line_error(result, "try a smaller --lr or gradient clipping (--clip-grad-norm")
    assert "at step" in line


def test_clipping_bounds_the_update_of_every_step():
    """With SGD, one update moves the parameters by lr * (clipped gradient): its norm is at most lr * max_norm."""
    from ppl_vae.pipeline import prepare

    config = small_config(optimizer="sgd", lr=0.1, clip_grad_norm=0.5, epochs=1, batch_size=200)
    vae, data, stepper = prepare(config)
    before = torch.cat([p.detach().flatten().clone() for p in vae.parameters()])
    training.train(vae, data, config.train, stepper=stepper, progress=False, evaluate=False)
    after = torch.cat([p.detach().flatten() for p in vae.parameters()])
    assert 0 < float((after - before).norm()) <= 0.1 * 0.5 * (1 + 1e-4)
    assert not stepper.optimizers["svi"]._optimizer_step_pre_hooks  # the hook is removed afterwards


# -- learning-rate schedules ----------------------------------------------------------------------


def test_a_step_schedule_halves_the_learning_rate_each_epoch(tmp_path):
    config = small_config(lr_schedule="StepLR", lr_schedule_options={"step_size": 1, "gamma": 0.5})
    run = ppl_vae.fit(config, tmp_path / "run", progress=False)
    assert run.history.lr.values.tolist() == pytest.approx([3e-3, 1.5e-3, 7.5e-4])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["lr_schedule_options"] == {
        "step_size": 1,
        "gamma": 0.5,
    }


@pytest.mark.parametrize(
    "controls",
    [
        # step_size 3: the scheduler's epoch count decides when the lr falls (after epoch 3, past the resume point)
        dict(
            lr_schedule="StepLR",
            lr_schedule_options={"step_size": 3, "gamma": 0.7},
            clip_grad_norm=50.0,
            kl_schedule="cyclical",
            kl_cycle_epochs=3,
            kl_cycle_ratio=0.5,
        ),
        # no gain counts as 100 nats: epochs 2 and 3 are bad ones, so the lr halves after epoch 3, which a
        # scheduler without its saved best and bad-epoch count would not do
        dict(
            lr_schedule="ReduceLROnPlateau",
            val_fraction=0.2,
            early_stopping_patience=10,
            lr_schedule_options={"patience": 1, "factor": 0.5, "threshold": 100.0, "threshold_mode": "abs"},
        ),
        # milestones are a Counter of ints: JSON would turn its keys into strings and the lr would never fall
        dict(lr_schedule="MultiStepLR", lr_schedule_options={"milestones": [3], "gamma": 0.7}),
    ],
    ids=["step-clip-cyclical", "plateau-val-early-stopping", "multistep"],
)
def test_resume_with_controls_matches_an_uninterrupted_run(tmp_path, controls):
    straight = ppl_vae.fit(small_config(epochs=4, **controls), tmp_path / "a", progress=False)
    ppl_vae.fit(small_config(epochs=2, **controls), tmp_path / "b", progress=False)
    resumed = ppl_vae.resume(tmp_path / "b", epochs=4, progress=False)
    for (k, a), (_, b) in zip(straight.vae.state_dict().items(), resumed.vae.state_dict().items()):
        assert torch.equal(a, b), k
    for name in ("lr", "kl_weight", "test_elbo", "val_elbo", "train_loss"):
        assert resumed.history[name].values.tolist() == pytest.approx(
            straight.history[name].values.tolist(), nan_ok=True, rel=0, abs=0
        ), name
    assert straight.history.lr.values.tolist() == pytest.approx(
        [3e-3] * 3 + [3e-3 * (0.7 if "gamma" in controls["lr_schedule_options"] else 0.5)]
    )
    _, meta = runs.read_checkpoint(tmp_path / "b")
    assert set(meta["schedulers"]) == {"svi"}


# -- validation split, early stopping, best checkpoint ----------------------------------------------


def test_the_validation_split_is_seeded_disjoint_and_never_trained_on(tmp_path):
    state = torch.get_rng_state()
    fit_idx, val_idx = validation_split(400, TrainConfig(val_fraction=0.25, seed=3))
    assert torch.equal(torch.get_rng_state(), state)
    assert len(val_idx) == 100 and len(fit_idx) == 300
    assert sorted(torch.cat([fit_idx, val_idx]).tolist()) == list(range(400))
    again, _ = validation_split(400, TrainConfig(val_fraction=0.25, seed=3))
    other, _ = validation_split(400, TrainConfig(val_fraction=0.25, seed=4))
    assert torch.equal(again, fit_idx) and not torch.equal(other, fit_idx)
    run = ppl_vae.fit(small_config(epochs=2, val_fraction=0.25), tmp_path / "run", progress=False)
    assert (run.history.num_train_samples.diff("epoch") == 150).all()  # the 50 validation points are left out
    assert all(math.isfinite(v) for v in run.history.val_elbo.values)
    assert math.isnan(
        float(ppl_vae.fit(small_config(epochs=1), tmp_path / "noval", progress=False).history.val_elbo[0])
    )


def test_epochs_since_best():
    records = [{"val_elbo": v} for v in (-3.0, -1.0, -2.0, -1.0, float("nan"))]
    assert epochs_since_best(records) == 3  # the first of equal maxima; NaN never improves
    assert epochs_since_best(records[:2]) == 0
    assert epochs_since_best([{"val_elbo": float("nan")}]) is None


def test_early_stopping_keeps_the_best_checkpoint_and_a_resume_trains_no_further(tmp_path, monkeypatch):
    """The ELBO estimates are made to fall after epoch 1, so its validation ELBO stays the best."""
    calls = {"n": 0}

    def falling_elbo(model, guide, x, **kwargs):
        calls["n"] += 1
        return torch.full((x.shape[0],), -float(calls["n"]))

    monkeypatch.setattr(training, "elbo_per_datapoint", falling_elbo)
    run = ppl_vae.fit(
        small_config(epochs=10, val_fraction=0.2, early_stopping_patience=2), tmp_path / "run", progress=False
    )
    assert run.history.epoch.values.tolist() == [1, 2, 3]
    assert runs.read_checkpoint(tmp_path / "run", tensors=False)[1]["epoch"] == 3
    best_tensors, best_meta = runs.read_checkpoint(tmp_path / "run", checkpoint=runs.CHECKPOINT_BEST)
    assert best_meta["epoch"] == 1
    assert any(not torch.equal(best_tensors[f"model.{k}"], v) for k, v in run.vae.state_dict().items())
    best = ppl_vae.load_run(tmp_path / "run", best=True)
    assert all(torch.equal(best_tensors[f"model.{k}"], v) for k, v in best.vae.state_dict().items())
    ppl_vae.fit(small_config(epochs=1), tmp_path / "noval", progress=False)
    with pytest.raises(ValueError, match="has no checkpoint-best.safetensors"):
        ppl_vae.load_run(tmp_path / "noval", best=True)
    assert ppl_vae.resume(tmp_path / "run", progress=False).new_epochs == 0
    assert training.stopped_early(run.history.pipe(training.history_records), run.config.train).startswith(
        "stopped early after epoch 3: the validation ELBO has not improved for 2 epochs"
    )
    result = invoke("fit", "--resume", tmp_path / "run", "--no-progress")
    assert result.exit_code == 0 and "nothing to do" in result.output and "stopped early after epoch 3" in result.output
    assert "patience 2, set when the run is made: --early-stopping-patience" in result.output
    result = invoke("fit", "--resume", tmp_path / "run", "--early-stopping-patience", "5", "--no-progress")
    assert result.exit_code != 0 and "drop --early-stopping-patience" in result.output  # as the line says


def test_a_history_written_before_the_new_variables_still_resumes(tmp_path):
    """Runs written before val_elbo and lr existed: those read as NaN, and training goes on."""
    ppl_vae.fit(small_config(epochs=1), tmp_path / "run", progress=False)
    old = runs.load_history(tmp_path / "run").drop_vars(["val_elbo", "lr"])
    from ppl_vae.io import write_netcdf

    write_netcdf(old, tmp_path / "run" / runs.HISTORY, run_files=True)  # the test stands in for an old run layer
    drop_history_digest(tmp_path / "run")  # whose checkpoints did not record the history they continue
    resumed = ppl_vae.resume(tmp_path / "run", epochs=2, progress=False)
    assert math.isnan(float(resumed.history.lr[0])) and float(resumed.history.lr[1]) == pytest.approx(3e-3)


# -- KL schedules ---------------------------------------------------------------------------------


def test_kl_schedules():
    spe = 4
    cyc = TrainConfig(kl_schedule="cyclical", kl_cycle_epochs=2, kl_cycle_ratio=0.5, kl_weight=2.0)
    weights = [KL_SCHEDULES.get("cyclical")(cyc, step, spe) for step in range(16)]
    # Fu et al.: within each 8-step cycle the weight rises linearly over the first half, then holds
    assert weights[:8] == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0, 2.0, 2.0])
    assert weights[8:] == weights[:8]
    assert KL_SCHEDULES.get("constant")(TrainConfig(kl_schedule="constant", kl_weight=0.3), 5, spe) == 0.3
    old = TrainConfig(kl_warmup_epochs=2)  # a config written before kl_schedule existed
    assert [KL_SCHEDULES.get(old.kl_schedule)(old, s, spe) for s in (0, 3, 7, 8)] == pytest.approx(
        [0.125, 0.5, 1.0, 1.0]
    )


def test_cyclical_kl_weight_in_the_history(tmp_path):
    run = ppl_vae.fit(
        small_config(epochs=4, kl_schedule="cyclical", kl_cycle_epochs=2, kl_cycle_ratio=1.0),
        tmp_path / "run",
        progress=False,
    )
    assert run.history.kl_weight.values.tolist() == pytest.approx([0.5, 1.0, 0.5, 1.0])


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lr_schedule", "NoSuchLR", "must be null or a torch.optim.lr_scheduler class"),
        ("lr_schedule", "LambdaLR", "must be null or a torch.optim.lr_scheduler class"),
        ("lr_schedule", "ReduceLROnPlateau", "set train.val_fraction > 0"),
        (
            "lr_schedule_options",
            {"step_size": 2},
            "applies to a learning-rate schedule (lr_schedule) only; train.lr_schedule is null",
        ),
        ("clip_grad_norm", 0.0, "must be a positive number"),
        ("val_fraction", 1.0, "must be in [0, 1)"),
        ("early_stopping_patience", 3, "applies to a validation set (val_fraction > 0) only"),
        ("kl_schedule", "sigmoid", "must be one of constant, cyclical, linear"),
        ("kl_weight", -1.0, "finite number >= 0"),
        ("kl_cycle_epochs", 0, "must be >= 1"),
        ("kl_cycle_ratio", 0.0, "must be in (0, 1]"),
        ("precision", "fp8", "must be one of fp32, bf16"),
    ],
)
def test_bad_controls_are_refused_naming_the_field(field, value, message):
    config = TrainConfig(device="cpu", **{field: value})
    with pytest.raises(ConfigError, match=f"train.{field}") as info:
        validate_train_config(config)
    assert message in str(info.value) and info.value.field == f"train.{field}"


def test_scheduler_options_that_do_not_fit_are_refused():
    with pytest.raises(ConfigError, match=r"train.lr_schedule_options do not fit StepLR: .*step_size"):
        validate_train_config(TrainConfig(device="cpu", lr_schedule="StepLR"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bf16_on_cpu_is_a_one_line_cli_error(tmp_path):
    result = invoke("fit", "--precision", "bf16", "--device", "cpu", "--epochs", 1, "--out", tmp_path / "run")
    one_line_error(result, "--precision 'bf16' (autocast) needs a CUDA device")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr-schedule", "StepLR", "--lr-schedule-options", "[1]"], "must be a JSON object"),
        (["--lr-schedule", "StepLR", "--lr-schedule-options", "{bad"], "must be a JSON object"),
        (["--lr-schedule", "StepLR"], "--lr-schedule-options do not fit StepLR"),
        (
            ["--early-stopping-patience", "2"],
            "--early-stopping-patience applies to a validation set (--val-fraction > 0) only",
        ),
    ],
)
def test_bad_control_flags_are_refused(tmp_path, args, message):
    result = invoke("fit", *args, "--epochs", 1, "--device", "cpu", "--out", tmp_path / "run")
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_the_cli_records_the_controls_in_config_json(tmp_path):
    result = invoke(
        "fit",
        "--model",
        "bernoulli_mlp",
        "--latent-dim",
        2,
        "--hidden-dim",
        16,
        "--train-size",
        200,
        "--epochs",
        2,
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        tmp_path / "run",
        "--lr-schedule",
        "ExponentialLR",
        "--lr-schedule-options",
        '{"gamma": 0.9}',
        "--clip-grad-norm",
        5,
        "--val-fraction",
        0.1,
        "--early-stopping-patience",
        3,
        "--kl-schedule",
        "constant",
        "--kl-weight",
        0.5,
    )
    assert result.exit_code == 0, result.output
    train = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert (train["lr_schedule"], train["lr_schedule_options"], train["clip_grad_norm"]) == (
        "ExponentialLR",
        {"gamma": 0.9},
        5.0,
    )
    assert (train["val_fraction"], train["early_stopping_patience"], train["kl_schedule"], train["kl_weight"]) == (
        0.1,
        3,
        "constant",
        0.5,
    )
    assert (tmp_path / "run" / runs.CHECKPOINT_BEST).is_file()


@requires_cuda
@pytest.mark.cuda
def test_bf16_autocast_trains_on_cuda(tmp_path):
    run = ppl_vae.fit(small_config(epochs=2, device="cuda", precision="bf16"), tmp_path / "run", progress=False)
    elbo = run.history.test_elbo.values
    assert all(math.isfinite(v) for v in elbo) and elbo[-1] > elbo[0]
