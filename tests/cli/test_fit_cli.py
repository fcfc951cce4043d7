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
        "trace",  # (mean_field: refused, the mixture prior has no closed-form KL)
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
        (["--optimizer", "nope"], "--optimizer must be one of adagrad, adam, adamax, sgd"),
    ],
)
def test_bad_inputs_give_one_line_errors_and_no_run_directory(runner, tmp_path, args, pattern):
    out = tmp_path / "run"
    result = invoke(runner, "fit", "--out", str(out), *FAST, *args)
    one_line_error(result, pattern)
    assert not out.exists()


def test_data_outside_the_likelihood_support(runner, tmp_path):
    np.save(tmp_path / "wide.npy", np.random.rand(400, 3) * 4 - 2)  # more rows than FAST's --train-size
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
    assert result.exit_code == 1 and "drop --model" in result.output  # one Error line, not usage


def test_fit_sample_grids_writes_frames_and_a_gif(runner, tmp_path):
    out = tmp_path / "run"
    result = invoke(runner, "fit", "--out", str(out), "--sample-grids", *FAST)
    assert result.exit_code == 0, result.output
    samples = sorted(p.name for p in (out / "samples").iterdir())
    assert samples == [f"epoch_000{i}.png" for i in range(3)] + ["frames.json"]  # and what they were drawn with
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


def test_relative_data_paths_are_recorded_absolute_so_analyses_run_from_any_folder(runner, tmp_path, monkeypatch):
    """A run fitted with a relative --data-dir (or a dataset file given by a relative path)
    records it absolute, so ``evaluate`` from another working folder finds the data; names of
    registered datasets stay names."""
    import json

    from tests.data.test_core_datasets import write_idx

    rng = np.random.default_rng(0)
    work = tmp_path / "work"
    (work / "mnist").mkdir(parents=True)
    for name, shape in [("train-images-idx3-ubyte.gz", (40, 6, 6)), ("t10k-images-idx3-ubyte.gz", (12, 6, 6))]:
        write_idx(work / "mnist" / name, rng.integers(0, 256, shape))
    for name, n in [("train-labels-idx1-ubyte.gz", 40), ("t10k-labels-idx1-ubyte.gz", 12)]:
        write_idx(work / "mnist" / name, rng.integers(0, 10, n))
    np.save(work / "points.npy", rng.random((60, 3)).astype(np.float32))
    monkeypatch.chdir(work)
    small = ["--epochs", "1", "--hidden-dim", "8", "--latent-dim", "2", "--no-progress"]
    fit = [
        ("mnist", ["--dataset", "mnist", "--data-dir", "mnist", "--model", "bernoulli_mlp"]),
        ("npy", ["--dataset", "points.npy", "--model", "gaussian_mlp"]),
    ]
    for name, args in fit:
        result = invoke(runner, "fit", *args, "--out", str(tmp_path / name), *small)
        assert result.exit_code == 0, result.output
    data = {name: json.loads((tmp_path / name / "config.json").read_text())["data"] for name, _ in fit}
    assert data["mnist"]["data_dir"] == str(work / "mnist") and data["mnist"]["dataset"] == "mnist"
    assert data["npy"]["dataset"] == str(work / "points.npy")
    monkeypatch.chdir(tmp_path)  # another folder: the relative paths would not resolve here
    for name, _ in fit:
        result = invoke(runner, "evaluate", str(tmp_path / name), "-k", "5", "--no-progress")
        assert result.exit_code == 0, result.output
        assert result.output.startswith("log p(x) estimate ") and "mean ± se over 12 test datapoints" in result.output


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--beta", "1"], "--beta applies to objective 'beta_vae' only; --objective is 'elbo'"),
        (["--kl-cycle-epochs", "10"], "--kl-cycle-epochs applies to --kl-schedule 'cyclical' only"),
        (["--method", "mcem", "--elbo", "trace"], "--elbo does not apply to method 'mcem' (it does not read it)"),
        (["--method", "wake-sleep", "--kl-weight", "1"], "--kl-weight does not apply to method 'wake-sleep'"),
        (["--optimizer", "sgd", "--adam-eps", "1e-8"], "--adam-eps applies to optimizer 'adam' or 'adamax' only"),
        (["--label-seed", "0"], "--label-seed applies to a semi-supervised split"),
    ],
)
def test_a_flag_that_does_not_apply_is_refused_even_at_its_default(tmp_path, flags, words):
    """QA: the applicability check compared values with their defaults, so `--beta 1` with the
    plain ELBO, or `--method mcem --elbo trace`, was accepted and silently dropped. A flag the user
    typed must apply, whatever its value; nothing is written."""
    result = CliRunner().invoke(
        cli, ["fit", "--epochs", "0", "--train-size", "50", "--out", str(tmp_path / "r"), *flags]
    )
    one_line_error(result, words)
    assert not (tmp_path / "r").exists()
    # a misspelt other side is named as misspelt, not as the side the flag does not apply to (review)
    typo = CliRunner().invoke(cli, ["fit", "--epochs", "0", "--out", str(tmp_path / "t"), "--optimizer", "adamw",
                                    "--adam-eps", "1e-8"])  # fmt: skip
    one_line_error(typo, "--optimizer must be one of adagrad, adam, adamax, sgd, got 'adamw'")
    # the same values, left to their defaults, or where they apply, are accepted
    ok = CliRunner().invoke(cli, ["fit", "--epochs", "0", "--train-size", "50", "--out", str(tmp_path / "ok"),
                                  "--objective", "beta_vae", "--beta", "1"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
