"""`ppl-vae fit` and `ppl-vae models` through click's CliRunner, bad inputs included."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from ppl_vae.cli.main import cli
from tests.conftest import one_line_error

FAST = ["--epochs", "2", "--hidden-dim", "16", "--latent-dim", "2", "--train-size", "300", "--no-progress"]


@pytest.fixture
def runner():
    return CliRunner()


def invoke(runner, *args):
    return runner.invoke(cli, list(args), catch_exceptions=False)


def test_fit_writes_a_run_and_prints_elbos(runner, tmp_path):
    out = tmp_path / "run"
    result = invoke(runner, "fit", "--model", "gaussian_mlp", "--out", str(out), *FAST)
    assert result.exit_code == 0, result.output
    assert "epoch 2: train ELBO" in result.output and "test ELBO" in result.output
    assert (out / "checkpoint.safetensors").is_file() and (out / "history.nc").is_file()
    result = invoke(runner, "fit", "--resume", str(out), "--epochs", "3", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "epoch 3:" in result.output


def test_fit_default_out_is_a_fresh_folder_under_runs(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        result = invoke(runner, "fit", "--model", "bernoulli_mlp", *FAST)
        assert result.exit_code == 0, result.output
    made = sorted((tmp_path / "runs").iterdir())
    assert len(made) == 2 and all(p.name.startswith("bernoulli_mlp-digits-") for p in made)


def test_fit_with_swapped_parts_from_the_cli(runner, tmp_path):
    result = invoke(
        runner,
        "fit",
        "--model",
        "gaussian_mlp",
        "--prior",
        "mixture_of_gaussians",
        "--num-components",
        "3",
        "--likelihood",
        "laplace",
        "--elbo",
        "mean_field",
        "--optimizer",
        "adagrad",
        "--lr",
        "0.02",
        "--kl-warmup",
        "1",
        "--num-particles",
        "2",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "r"),
        *FAST,
    )
    assert result.exit_code == 0, result.output


def test_models_lists_every_registry(runner):
    result = invoke(runner, "models")
    assert result.exit_code == 0
    for name in [
        "gaussian_mlp",
        "bernoulli_mlp",
        "mixture_of_gaussians",
        "continuous_bernoulli",
        "laplace",
        "fashion-mnist",
        "mean_field",
        "adagrad",
        "svi",
    ]:
        assert name in result.output


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["--model", "nope"], "unknown model 'nope'; valid models: bernoulli_mlp"),
        (["--prior", "nope"], "unknown prior 'nope'; valid priors:"),
        (["--likelihood", "nope"], "valid likelihoods: bernoulli"),
        (["--dataset", "mnist"], "needs --data-dir"),
        (["--dataset", "nope"], "valid datasets: digits"),
        (["--dataset", "absent.npy"], "data file not found"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--device", "tpu"], "device must be"),
        (["--optimizer", "nope"], "--optimizer must be one of adagrad, adam, sgd"),
    ],
)
def test_bad_inputs_give_one_line_errors_and_no_run_directory(runner, tmp_path, args, pattern):
    out = tmp_path / "run"
    result = invoke(runner, "fit", "--out", str(out), *FAST, *args)
    one_line_error(result, pattern)
    assert not out.exists()


def test_data_outside_the_likelihood_support(runner, tmp_path):
    np.save(tmp_path / "wide.npy", np.random.rand(50, 3) * 4 - 2)
    result = invoke(
        runner,
        "fit",
        "--model",
        "bernoulli_mlp",
        "--dataset",
        str(tmp_path / "wide.npy"),
        "--out",
        str(tmp_path / "run"),
        *FAST,
    )
    one_line_error(result, "likelihood 'bernoulli' needs the training data")
    assert not (tmp_path / "run").exists()
    # the same data is fine under a Gaussian likelihood
    result = invoke(
        runner,
        "fit",
        "--model",
        "gaussian_mlp",
        "--likelihood",
        "gaussian",
        "--dataset",
        str(tmp_path / "wide.npy"),
        "--out",
        str(tmp_path / "run2"),
        *FAST,
    )
    assert result.exit_code == 0, result.output


def test_nan_in_data_and_corrupt_files(runner, tmp_path):
    a = np.random.rand(50, 3)
    a[0, 0] = np.nan
    np.save(tmp_path / "nan.npy", a)
    one_line_error(invoke(runner, "fit", "--dataset", str(tmp_path / "nan.npy"), *FAST), "NaN")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    for name in ["train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]:
        (tmp_path / "d" / name).write_bytes(b"")
    result = invoke(runner, "fit", "--dataset", "mnist", "--data-dir", str(tmp_path / "d"), *FAST)
    one_line_error(result, "corrupt or truncated gzip")


def test_existing_out_and_resume_misuse(runner, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    one_line_error(
        invoke(runner, "fit", "--out", str(out), *FAST),
        "already holds files; write the run to another folder or resume it",
    )
    assert (out / "keep.txt").read_text() == "x"
    one_line_error(
        invoke(runner, "fit", "--resume", str(tmp_path / "absent"), "--no-progress"), "run directory not found"
    )
    result = invoke(runner, "fit", "--resume", str(out), "--model", "bernoulli_mlp")
    assert result.exit_code == 2 and "drop --model" in result.output


def test_fit_sample_grids_writes_frames_and_a_gif(runner, tmp_path):
    out = tmp_path / "run"
    result = invoke(runner, "fit", "--out", str(out), "--sample-grids", *FAST)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "samples").iterdir()) == [f"epoch_000{i}.png" for i in range(3)]
    assert (out / "samples.gif").read_bytes()[:6] == b"GIF89a"


def test_fit_announces_compilation_before_the_first_step(runner, tmp_path):
    out = tmp_path / "run"
    result = invoke(
        runner,
        "fit",
        "--model",
        "gaussian_mlp",
        "--out",
        str(out),
        "--compile",
        "eager",
        "--epochs",
        "1",
        "--hidden-dim",
        "8",
        "--latent-dim",
        "2",
        "--train-size",
        "100",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert "compiling the loss with torch.compile (backend eager)" in result.output
    plain = invoke(
        runner,
        "fit",
        "--model",
        "gaussian_mlp",
        "--out",
        str(tmp_path / "plain"),
        "--epochs",
        "1",
        "--hidden-dim",
        "8",
        "--latent-dim",
        "2",
        "--train-size",
        "100",
        "--no-progress",
    )
    assert "compiling" not in plain.output
