"""The cases of issue 20 part 2 (a new user's and an attacker's session): each was a traceback,
a wrong input accepted, a dead end, a hang or a misleading message; each is checked here."""

from __future__ import annotations

import json
import os
import shutil
import types
import urllib.error
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ppl_vae import pipeline, runs
from ppl_vae.cli.main import cli, memory_message
from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ppl_vae.data.datasets import DATASETS, load_dataset
from ppl_vae.errors import DataError
from ppl_vae.inference.training import Callback
from tests.conftest import one_line_error

SMALL = [
    "--train-size",
    "100",
    "--batch-size",
    "50",
    "--latent-dim",
    "2",
    "--hidden-dim",
    "8",
    "--device",
    "cpu",
    "--no-progress",
]


def invoke(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def tiny_config(epochs: int = 1, **train) -> RunConfig:
    return RunConfig(
        model=ModelConfig(model="gaussian_mlp", latent_dim=2, hidden_dim=8),
        data=DataConfig(dataset="digits", train_size=100),
        train=TrainConfig(epochs=epochs, batch_size=50, device="cpu", **train),
    )


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cases") / "run"
    pipeline.fit(tiny_config(1), out, progress=False)
    return out


@pytest.fixture
def run(one_epoch_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(one_epoch_run, copy)
    return copy


def rewrite_checkpoint(run_dir, change):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = run_dir / runs.CHECKPOINT
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["ppl_vae"])
    tensors = load_file(str(path))
    change(tensors, meta)
    save_file(tensors, str(path), metadata={"ppl_vae": json.dumps(meta)})


# -- tracebacks -------------------------------------------------------------------------------------


def test_huge_learning_rate_is_refused_before_any_folder(tmp_path):
    result = invoke("fit", *SMALL, "--epochs", 1, "--lr", "1e300", "--out", tmp_path / "r")
    one_line_error(result, "--lr must be at most 3.4e38")
    assert result.exit_code == 1 and not (tmp_path / "r").exists()


@pytest.mark.parametrize("out", ["a" * 300, "/".join(["d" * 200] * 30)], ids=["long-name", "deep-path"])
def test_out_too_long_for_the_filesystem_is_one_line(tmp_path, out):
    result = invoke("fit", *SMALL, "--epochs", 1, "--out", tmp_path / out)
    line = one_line_error(result, "--out" if "/" in out else "bytes long")
    assert result.exit_code == 1 and len(line) < 400
    assert list(tmp_path.iterdir()) == []


def test_empty_out_is_refused_instead_of_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["fit", *SMALL, "--epochs", "1", "--out", ""])
    assert result.exit_code == 2 and "empty name" in result.output
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda t, m: m.pop("epoch"), "its metadata lacks 'epoch'"),
        (lambda t, m: t.pop("rng.cpu"), "lacks a valid tensor 'rng.cpu'"),
        (
            lambda t, m: t.update({next(k for k in t if k.startswith("optim.") and t[k].dim() > 1): torch.zeros(3)}),
            "has shape (3,) but its parameter has shape",
        ),
        # these reached users as "not enough values to unpack (expected 4, got 2)" and
        # "invalid literal for int() with base 10: 'abc'"
        (lambda t, m: t.update({"optim.svi": torch.zeros(1)}), "is not named optim.OPTIMIZER.INDEX.KEY"),
        (lambda t, m: t.update({"optim.svi.abc.exp_avg": torch.zeros(1)}), "is not named optim.OPTIMIZER.INDEX.KEY"),
    ],
    ids=["no-epoch", "no-rng", "optimizer-shape", "optimizer-name", "optimizer-index"],
)
def test_damaged_checkpoint_resume_is_one_line_and_keeps_the_config(run, damage, message):
    rewrite_checkpoint(run, damage)
    config_before = (run / runs.CONFIG).read_bytes()
    result = invoke("fit", "--resume", run, "--epochs", 3, "--no-progress")
    one_line_error(result, message)
    assert result.exit_code == 1
    assert (run / runs.CONFIG).read_bytes() == config_before  # a failed resume rewrote config.json


def test_inpaint_without_label_counts_weights_as_draws_times_labels(tmp_path):
    config = RunConfig(
        model=ModelConfig(model="cvae", latent_dim=2, hidden_dim=8),
        data=DataConfig(dataset="digits", train_size=100),
        train=TrainConfig(epochs=0, batch_size=50, device="cpu"),
    )
    pipeline.fit(config, tmp_path / "cvae", progress=False)
    result = invoke(
        "inpaint", tmp_path / "cvae", "--no-label", "--num-samples", 20, "--num-images", 2, "--num-draws", 1
    )
    assert result.exit_code == 0, result.output
    assert "of 200 weights (20 draws of z x 10 labels)" in result.output


def test_checkpoint_without_ppl_vae_metadata_says_so(run):
    from safetensors.torch import load_file, save_file

    path = run / runs.CHECKPOINT
    save_file(load_file(str(path)), str(path))
    line = one_line_error(invoke("evaluate", run, "-k", 2, "--no-progress"), "no 'ppl_vae' metadata")
    assert "('ppl_vae')" not in line


def test_animate_with_a_frame_that_is_not_an_image_is_one_line(run):
    (run / "samples").mkdir()
    (run / "samples" / "epoch_0000.png").write_text("not a png")
    result = invoke("animate", run, "--epochs", 2, "--no-progress")
    one_line_error(result, "is not a readable image")
    assert runs.checkpoint_epoch(run) == 1  # refused before training


@pytest.mark.parametrize("kind", ["fifo", "link"])
def test_animate_refuses_a_frame_that_is_a_pipe_or_a_link(run, tmp_path, kind):
    """QA: a pipe named like a frame hung animate for ever, and a link out of the run put an
    outside image into the run's samples.gif."""
    import os

    (run / "samples").mkdir()
    frame = run / "samples" / "epoch_0000.png"
    if kind == "fifo":
        os.mkfifo(frame)
    else:
        from PIL import Image

        Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")
        frame.symlink_to(tmp_path / "outside.png")
    result = invoke("animate", run, "--epochs", 2, "--no-progress")
    one_line_error(result, "is not a regular file (a link, a pipe or a folder)")
    assert runs.checkpoint_epoch(run) == 1 and not (run / "samples.gif").exists()


@pytest.mark.parametrize("linked", ["config.json", "samples.gif", "samples"])
def test_animate_of_a_run_with_a_link_in_it_writes_no_frame(run, tmp_path, linked):
    """A received run directory whose files are links elsewhere is refused by animate before its
    first frame: nothing is written into it or through the link (the resume's own check came
    after the first frame)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = elsewhere / linked
    if linked == "config.json":
        shutil.move(str(run / linked), target)
    elif linked == "samples":
        target.mkdir()
    else:
        target.write_bytes(b"GIF89a")
    (run / linked).symlink_to(target)
    before = sorted(p.name for p in run.iterdir())
    result = invoke("animate", run, "--epochs", 2, "--no-progress")
    one_line_error(result, "is a symlink")
    assert sorted(p.name for p in run.iterdir()) == before
    assert sorted(p.name for p in elsewhere.rglob("*")) == [linked]


# -- wrong input accepted ---------------------------------------------------------------------------


def test_an_implausible_elbo_warns_naming_the_step_and_the_setting():
    check = pipeline.DivergenceCheck(num_dims=64)
    ctx = types.SimpleNamespace(
        state=types.SimpleNamespace(records=[{"train_elbo": -5.6e30, "test_elbo": -5.5e30}], epoch=1, step=2),
        config=types.SimpleNamespace(lr=1e-4, optimizer="sgd"),
    )
    with pytest.warns(UserWarning, match=r"epoch 1 \(step 2\).*-5\.6e\+30.*--lr.*--optimizer") as record:
        check.on_epoch_end(ctx)
    assert len(record) == 1
    ctx.state.records = [{"train_elbo": float("nan"), "test_elbo": -50.0}]
    with pytest.warns(UserWarning, match="not finite"):
        check.on_epoch_end(ctx)
    ctx.state.records = [{"train_elbo": -90.0, "test_elbo": -95.0}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check.on_epoch_end(ctx)  # a plausible ELBO says nothing


def test_a_diverging_fit_prints_the_warning(tmp_path):
    np.save(tmp_path / "big.npy", (np.random.default_rng(0).random((60, 4)) * 1e12).astype(np.float32))
    result = invoke(
        "fit",
        "--dataset",
        tmp_path / "big.npy",
        "--likelihood",
        "gaussian",
        "--epochs",
        1,
        "--batch-size",
        20,
        "--latent-dim",
        2,
        "--hidden-dim",
        4,
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        tmp_path / "r",
    )
    assert "Warning: training has diverged: epoch 1" in result.output, result.output
    assert "--lr" in result.output


def test_resume_with_history_but_no_checkpoint_is_refused(run):
    (run / runs.CHECKPOINT).unlink()
    history = (run / runs.HISTORY).read_bytes()
    one_line_error(invoke("fit", "--resume", run, "--epochs", 2, "--no-progress"), "the trained weights are lost")
    assert (run / runs.HISTORY).read_bytes() == history


def test_generate_animate_and_sample_grids_refuse_a_text_model(tmp_path):
    """Sample grids of a model whose datapoints are not images (1-pixel strips) are refused by
    every command that draws them, before anything is written or trained."""
    (tmp_path / "lines.txt").write_text("\n".join(f"sentence number {i}" for i in range(20)) + "\n")
    config = RunConfig(
        model=ModelConfig(model="text_hybrid", latent_dim=2, hidden_dim=8),
        data=DataConfig(dataset="text-lines", data_dir=str(tmp_path / "lines.txt")),
        train=TrainConfig(epochs=0, batch_size=10, device="cpu"),
    )
    pipeline.fit(config, tmp_path / "text", progress=False)
    before = sorted(p.name for p in (tmp_path / "text").iterdir())
    result = invoke("generate", tmp_path / "text")
    one_line_error(result, "needs a model whose datapoints are images")
    result = invoke("animate", tmp_path / "text", "--epochs", 1, "--no-progress")
    one_line_error(result, "needs a model whose datapoints are images; TextHybridVAE's are not")
    assert sorted(p.name for p in (tmp_path / "text").iterdir()) == before  # no samples/, no samples.gif
    assert runs.checkpoint_epoch(tmp_path / "text") == 0  # not trained either
    data = ["--dataset", "text-lines", "--data-dir", tmp_path / "lines.txt", "--batch-size", 10, "--device", "cpu"]
    result = invoke(
        "fit", "--model", "text_hybrid", *data, "--epochs", 1, "--sample-grids", "--out", tmp_path / "fresh"
    )
    one_line_error(result, "--sample-grids needs a model whose datapoints are images")
    assert not (tmp_path / "fresh").exists()


def test_cvae_test_labels_of_the_wrong_length_fail_at_load(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "d.npz",
        train=rng.random((20, 4)),
        test=rng.random((10, 4)),
        train_labels=rng.integers(0, 2, 20),
        test_labels=rng.integers(0, 2, 7),
    )
    with pytest.raises(DataError, match="7 test labels for 10 test points"):
        load_dataset(str(tmp_path / "d.npz"))


def test_a_loader_returning_too_few_arrays_is_named(monkeypatch):
    # a plugin's loader returning (train, test) reached users as "not enough values to unpack"
    name = "two-arrays-test"
    monkeypatch.setitem(DATASETS._entries, name, lambda data_dir=None: (np.zeros((4, 2)), None))
    monkeypatch.setitem(DATASETS._docs, name, "")
    with pytest.raises(DataError, match="returned 2 values; a dataset loader returns 4"):
        load_dataset(name)


# -- dead ends --------------------------------------------------------------------------------------


class FailInFirstEpoch(Callback):
    def on_step_end(self, ctx):
        raise RuntimeError("loss became inf at step 1")


def test_a_fit_failing_in_epoch_1_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        pipeline.fit(tiny_config(2), tmp_path / "r", progress=False, callbacks=[FailInFirstEpoch()])
    assert not (tmp_path / "r").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError):
        pipeline.fit(tiny_config(2), tmp_path / "empty", progress=False, callbacks=[FailInFirstEpoch()])
    assert list((tmp_path / "empty").iterdir()) == []
    pipeline.fit(tiny_config(1), tmp_path / "empty", progress=False)  # the corrected command runs


def test_resume_may_change_the_learning_rate_and_the_optimizer(run):
    result = invoke("fit", "--resume", run, "--epochs", 2, "--lr", "1e-4", "--no-progress")
    assert result.exit_code == 0, result.output
    config = runs.load_config(run)
    assert config.train.lr == 1e-4 and config.train.epochs == 2
    tensors, meta = runs.read_checkpoint(run, tensors=False)
    assert meta["epoch"] == 2
    assert {g["lr"] for g in meta["optimizers"]["svi"]["param_groups"]} == {1e-4}
    result = invoke("fit", "--resume", run, "--epochs", 3, "--optimizer", "sgd", "--no-progress")
    assert result.exit_code == 0, result.output
    assert runs.load_config(run).train.optimizer == "sgd"
    assert runs.read_checkpoint(run, tensors=False)[1]["optimizers"]["svi"]["type"] == "SGD"
    refused = invoke("fit", "--resume", run, "--model", "gaussian_mlp", "--beta", 4, "--no-progress")
    one_line_error(refused, "drop --model, --beta")  # one line, exit 1: it printed click's usage text, exit 2
    assert refused.exit_code == 1 and len(refused.output.strip().splitlines()) == 1, refused.output


def test_fig4_grid_size_far_beyond_the_machine_is_refused_up_front(tmp_path):
    result = invoke("experiment", "fig4", "--grid-size", 100000, "--out", tmp_path / "f4", "--no-progress")
    line = one_line_error(result, "--grid-size 100000 is far beyond")
    assert "grid_size" not in line
    assert not (tmp_path / "f4").exists()
    result = invoke("experiment", "fig5", "--latent-dims", 1000000000, "--out", tmp_path / "f5", "--no-progress")
    one_line_error(result, "--latent-dims 1000000000 is far beyond")


def test_settings_of_an_attempt_that_wrote_no_result_do_not_block_the_corrected_command(tmp_path):
    from ppl_vae.experiments import common
    from ppl_vae.experiments.fig4 import Fig4Settings

    out = tmp_path / "f4"
    common.check_settings(out, Fig4Settings(grid_size=400))  # then out of memory: only settings.json
    common.check_settings(out, Fig4Settings(grid_size=20))
    assert json.loads((out / "settings.json").read_text())["grid_size"] == 20
    (out / "fig4.csv").write_text("dataset\n")
    with pytest.raises(ValueError, match="other settings"):
        common.check_settings(out, Fig4Settings(grid_size=30))


# -- hangs ------------------------------------------------------------------------------------------


def test_evaluate_with_an_enormous_k_is_refused_up_front(one_epoch_run):
    line = one_line_error(
        invoke("evaluate", one_epoch_run, "-k", 1000000000000, "--no-progress"),
        "--num-samples 1000000000000 is far beyond",
    )
    assert "at most" in line


def test_inpaint_with_an_enormous_number_of_draws_is_refused_up_front(one_epoch_run):
    one_line_error(invoke("inpaint", one_epoch_run, "--num-draws", 100000), "--num-draws 100000 is far beyond")


# -- messages ---------------------------------------------------------------------------------------


def test_the_memory_hint_names_the_commands_own_size_flags(monkeypatch, tmp_path):
    from ppl_vae.experiments import fig4

    def oom(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 80000000000 bytes.")

    monkeypatch.setattr(fig4, "run", oom)
    line = one_line_error(invoke("experiment", "fig4", "--out", tmp_path / "f", "--no-progress"), "not enough memory")
    assert "--grid-size" in line and "--latent-dim," not in line
    assert "--latent-dim" in memory_message(MemoryError())


def test_fit_help_names_the_method_option_not_only_svi():
    result = invoke("fit", "--help")
    assert "Train a VAE with SVI" not in result.output
    assert "--method" in result.output.split("Options:")[0]


def test_compile_is_announced(tmp_path):
    result = invoke("fit", *SMALL, "--epochs", 0, "--compile", "inductor", "--out", tmp_path / "r")
    assert "compiling the loss with torch.compile (backend inductor)" in result.output, result.output


def test_offline_download_says_why_and_leaves_no_folder(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError(None)

    monkeypatch.setattr("urllib.request.urlopen", offline)
    result = invoke("experiment", "download", "mnist", "--data-dir", tmp_path / "new" / "mnist", "--no-progress")
    line = one_line_error(result, "could not download")
    assert "None" not in line and "--url" in line
    assert not (tmp_path / "new").exists()


def test_warnings_of_every_command_are_one_stderr_line():
    from ppl_vae.cli import options

    runner = CliRunner()
    import click

    @click.command()
    def warns():
        options.warn("something\n odd")

    result = runner.invoke(warns)
    assert result.stderr == "Warning: something odd\n" and result.stdout == ""


def test_a_sigint_swallowed_during_fit_still_stops_with_exit_130(one_epoch_run, monkeypatch, tmp_path):
    import signal

    def fit_that_swallows(config, out, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)  # delivered here, its KeyboardInterrupt lost (a __del__, a C hook)
            for _ in range(1000):
                pass
        except KeyboardInterrupt:
            pass
        return pipeline.load_run(one_epoch_run)

    monkeypatch.setattr(pipeline, "fit", fit_that_swallows)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    result = invoke("fit", *SMALL, "--epochs", 1, "--out", tmp_path / "r")
    assert result.exit_code == 130, result.output
    one_line_error(result, "interrupted")
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back


def test_a_malformed_launcher_variable_is_named(tmp_path, monkeypatch):
    # "invalid literal for int() with base 10: 'abc'" reached users
    monkeypatch.setenv("WORLD_SIZE", "abc")
    line = one_line_error(invoke("fit", *SMALL, "--epochs", 1, "--out", tmp_path / "r"), "WORLD_SIZE")
    assert "invalid literal" not in line
    assert not (tmp_path / "r").exists()
