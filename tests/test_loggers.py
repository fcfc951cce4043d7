"""TensorBoard logging (a training Callback), read back with TensorBoard's own event reader."""

from __future__ import annotations

import pickle

import pytest

import ppl_vae
from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ppl_vae.loggers import ScalarLogger, TensorBoardLogger
from tests.conftest import invoke

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def events(log_dir):
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_fit_log_tensorboard_writes_scalars_and_sample_grids(tmp_path):
    out = tmp_path / "run"
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
        "--batch-size",
        50,
        "--epochs",
        3,
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        out,
        "--log",
        "tensorboard",
        "--log-every-steps",
        2,
        "--lr-schedule",
        "StepLR",
        "--lr-schedule-options",
        '{"step_size": 1, "gamma": 0.5}',
    )
    assert result.exit_code == 0, result.output
    acc = events(out / "tensorboard")
    tags = acc.Tags()
    assert {"epoch/test_elbo", "epoch/train_elbo", "epoch/lr", "step/loss", "step/lr", "step/kl_weight"} <= set(
        tags["scalars"]
    )
    history = ppl_vae.load_run(out).history
    test_elbo = [(e.step, e.value) for e in acc.Scalars("epoch/test_elbo")]
    assert [s for s, _ in test_elbo] == [4, 8, 12]  # at the optimizer step that ended each epoch
    assert [e.value for e in acc.Scalars("epoch/epoch")] == [1, 2, 3]
    assert [v for _, v in test_elbo] == pytest.approx(history.test_elbo.values.tolist(), rel=1e-6)
    assert [e.value for e in acc.Scalars("epoch/lr")] == pytest.approx([1e-3, 5e-4, 2.5e-4])
    assert [e.step for e in acc.Scalars("step/loss")] == [2, 4, 6, 8, 10, 12]  # 4 steps per epoch, every 2nd
    images = acc.Images("samples")
    assert [i.step for i in images] == [4, 8, 12] and images[0].width > 8 and images[0].height > 1


def test_a_resumed_run_logs_its_new_epochs(tmp_path):
    config = RunConfig(
        model=ModelConfig(model="bernoulli_mlp", latent_dim=2, hidden_dim=16),
        data=DataConfig(train_size=100),
        train=TrainConfig(epochs=1, batch_size=50, device="cpu"),
    )
    ppl_vae.fit(config, tmp_path / "run", progress=False)
    logger = TensorBoardLogger(tmp_path / "run" / "tensorboard", every_steps=1, num_images=0)
    logger = pickle.loads(pickle.dumps(logger))  # what nproc > 1 does to callbacks
    ppl_vae.resume(tmp_path / "run", epochs=3, progress=False, callbacks=[logger])
    acc = events(tmp_path / "run" / "tensorboard")
    assert [e.step for e in acc.Scalars("epoch/test_elbo")] == [4, 6]  # epochs 2, 3 of 2 steps each
    assert [e.value for e in acc.Scalars("epoch/epoch")] == [2, 3]
    assert [e.step for e in acc.Scalars("step/loss")] == [3, 4, 5, 6]
    assert "samples" not in acc.Tags()["images"]


def test_another_service_is_a_small_subclass(tmp_path):
    class Recorder(ScalarLogger):
        def __init__(self):
            super().__init__(every_steps=1)
            self.seen = []

        def log_scalars(self, scalars, step):
            self.seen.append((step, scalars))

    recorder = Recorder()
    config = RunConfig(
        model=ModelConfig(model="bernoulli_mlp", latent_dim=2, hidden_dim=16),
        data=DataConfig(train_size=100),
        train=TrainConfig(epochs=2, batch_size=50, device="cpu"),
    )
    ppl_vae.fit(config, tmp_path / "run", progress=False, callbacks=[recorder])
    epoch_logs = [(s, d) for s, d in recorder.seen if "epoch/test_elbo" in d]
    assert [s for s, _ in epoch_logs] == [2, 4] and [d["epoch/epoch"] for _, d in epoch_logs] == [1, 2]
    # one step axis that never goes back: W&B's wandb.log(step=...) drops a call whose step does
    steps = [s for s, _ in recorder.seen]
    assert steps == sorted(steps)
    assert len([d for _, d in recorder.seen if "step/loss" in d]) == 4


def test_an_unknown_logger_is_a_one_line_error(tmp_path):
    from tests.conftest import one_line_error

    result = invoke("fit", "--log", "wandb", "--epochs", 1, "--device", "cpu", "--out", tmp_path / "run")
    one_line_error(result, "unknown logger 'wandb'; valid loggers: tensorboard")
    assert not (tmp_path / "run").exists()


def test_a_logger_named_twice_is_refused_and_a_text_model_logs_no_sample_image(tmp_path):
    """QA: --log tensorboard --log tensorboard wrote two event files, every value twice; and a text
    model, whose --sample-grids is refused, logged a 'samples' image of character indices."""
    from tests.conftest import one_line_error

    twice = invoke("fit", "--log", "tensorboard", "--log", "tensorboard", "--epochs", 1, "--out", tmp_path / "a")
    one_line_error(twice, "--log tensorboard is given more than once")
    assert not (tmp_path / "a").exists()
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(f"line {i} of a small corpus" for i in range(80)) + "\n")
    out = tmp_path / "text"
    text = ["--model", "text_hybrid", "--dataset", "text-lines", "--data-dir", lines, "--hidden-dim", 16]
    result = invoke("fit", *text, "--latent-dim", 4, "--epochs", 1, "--device", "cpu", "--no-progress",
                    "--log", "tensorboard", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    tags = events(out / "tensorboard").Tags()
    assert "epoch/test_elbo" in tags["scalars"] and tags["images"] == []
