"""``ppl-vae anomaly`` and ``ppl-vae text`` through click's CliRunner, bad inputs included."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

from ppl_vae.cli.main import cli
from tests.conftest import one_line_error
from tests.models.test_scvae import planted_sensor_series

# Training in these tests runs several times faster on one thread on a shared machine.
pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--epochs", "1", "--batch-size", "32", "--device", "cpu", "--no-progress"]


def _one_line_error(result) -> str:
    line = one_line_error(result)
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1, result.output
    return line


@pytest.fixture(scope="module")
def sensor_run(tmp_path_factory):
    """A sensor CSV with planted anomalies in its test part, and an scvae run fitted on it."""
    tmp = tmp_path_factory.mktemp("sensors")
    values, labels = planted_sensor_series(num_steps=1000, anomaly_from=700, num_anomalies=3)
    path = tmp / "sensors.csv"
    rows = [",".join([f"{v:.5f}" for v in row] + [str(label)]) for row, label in zip(values, labels)]
    path.write_text("a,b,c,label\n" + "\n".join(rows) + "\n")
    run = tmp / "run"
    result = CliRunner().invoke(
        cli,
        [
            "fit",
            "--model",
            "scvae",
            "--dataset",
            "timeseries-csv",
            "--data-dir",
            str(path),
            "--hidden-dim",
            "8",
            "--latent-dim",
            "4",
            "--out",
            str(run),
            *FAST,
        ],
    )
    assert result.exit_code == 0, result.output
    return path, run


def test_fit_scvae_then_anomaly_reports_auroc_and_writes_scores(tmp_path, sensor_run):
    runner = CliRunner()
    _, run = sensor_run
    out = tmp_path / "scores.nc"
    result = runner.invoke(
        cli,
        [
            "anomaly",
            str(run),
            "--num-samples",
            "2",
            "--no-progress",
            "--out",
            str(out),
            "--score",
            "reconstruction_probability",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "AUROC" in result.output and "AUPRC" in result.output
    scores = xr.load_dataset(out)
    assert scores.sizes["datapoint"] == int(scores["label"].size) and 0.0 <= scores.attrs["auroc"] <= 1.0
    # what was scored: the file says which data, so scores of other files are not taken for the run's
    assert scores.attrs["dataset"] == "timeseries-csv" and scores.attrs["split"] == "test"
    assert scores.attrs["data"] == "the run's own" and scores.attrs["data_dir"].endswith("sensors.csv")
    assert scores.attrs["made_from"].startswith(f"{run} at epoch ")  # which weights scored them
    assert scores["score"].attrs["units"] == "nats" and "Monte Carlo" in scores["score"].attrs["description"]
    assert "(chance 0.5)" in result.output and "the share of anomalies" in result.output
    assert np.isfinite(scores["score"]).all()


def test_anomaly_bad_inputs_give_one_line_errors(tmp_path, sensor_run):
    runner = CliRunner()
    _, run = sensor_run
    assert "valid anomaly scores" in _one_line_error(runner.invoke(cli, ["anomaly", str(run), "--score", "nope"]))
    assert "expects" in _one_line_error(runner.invoke(cli, ["anomaly", str(run), "--dataset", "digits"]))
    # the sensor CSV's labels are anomaly labels already: --normal-class 1 inverted them (AUROC 1 -> 0)
    out = tmp_path / "inverted.nc"
    refused = runner.invoke(cli, ["anomaly", str(run), "--normal-class", "1", "--out", str(out)])
    assert "already" in _one_line_error(refused) and "--normal-class" in refused.output and not out.exists()
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,oops\n")
    assert "non-numeric" in _one_line_error(
        runner.invoke(cli, ["anomaly", str(run), "--dataset", "timeseries-csv", "--data-dir", str(bad)])
    )
    assert "non-numeric" in _one_line_error(
        runner.invoke(
            cli,
            [
                "fit",
                "--model",
                "scvae",
                "--dataset",
                "timeseries-csv",
                "--data-dir",
                str(bad),
                "--out",
                str(tmp_path / "r2"),
                *FAST,
            ],
        )
    )
    assert not (tmp_path / "r2").exists()


def test_wrong_image_size_is_a_one_line_error(tmp_path):
    path = tmp_path / "images.npy"
    np.save(path, np.random.default_rng(0).random((20, 1, 30, 30)).astype(np.float32))
    msg = _one_line_error(
        CliRunner().invoke(
            cli,
            [
                "fit",
                "--model",
                "scvae",
                "--dataset",
                str(path),
                "--likelihood",
                "bernoulli",
                "--out",
                str(tmp_path / "r"),
                *FAST,
            ],
        )
    )
    assert "divisible by 4" in msg


def test_text_cli_reports_bits_per_character_samples_and_interpolation(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["the cat sat", "a dog ran", "the dog sat", "a cat ran"] * 5) + "\n")
    runner = CliRunner()
    run = tmp_path / "text_run"
    result = runner.invoke(
        cli,
        [
            "fit",
            "--model",
            "text_hybrid",
            "--dataset",
            "text-lines",
            "--data-dir",
            str(corpus),
            "--hidden-dim",
            "8",
            "--latent-dim",
            "2",
            "--out",
            str(run),
            *FAST,
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        cli,
        [
            "text",
            str(run),
            "--num-samples",
            "2",
            "--samples",
            "2",
            "--interpolate",
            "the cat sat",
            "a dog ran",
            "--steps",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "bits/char" in result.output and "KL" in result.output
    assert result.output.count("\n") >= 1 + 1 + 2 + 1 + 3
    body = result.output.splitlines()
    shown = body[body.index("interpolation (quoted):") + 1 :][:3]
    assert all(line.startswith("  '") or line.startswith('  "') for line in shown), shown  # trailing spaces visible
    first = result.output.splitlines()[0]  # every number says what it is
    assert "(IW, K=2: a stochastic upper bound)" in first and "(ELBO: a stochastic upper bound)" in first
    assert first.count(" ± ") == 4 and first.endswith("; ± se over sentences")  # QA: bare numbers
    assert "a Monte Carlo estimate" in first
    for flags, message in [
        (["--steps", "3"], "--steps applies to an interpolation only"),
        (["--samples", "0", "--temperature", "0.5"], "--temperature applies to the sampled sentences only"),
        # endpoints the model never read: one truncated without its end token, or nothing at all
        (["--interpolate", "x" * 80, "a dog ran"], "the first sentence has 80 characters"),
        (["--interpolate", "a dog ran", "   "], "the second sentence has 0 characters"),
    ]:
        assert message in _one_line_error(runner.invoke(cli, ["text", str(run), *flags]))


def test_text_bad_inputs_give_one_line_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    runner = CliRunner()
    msg = _one_line_error(
        runner.invoke(
            cli,
            [
                "fit",
                "--model",
                "text_hybrid",
                "--dataset",
                "text-lines",
                "--data-dir",
                str(empty),
                "--out",
                str(tmp_path / "r"),
                *FAST,
            ],
        )
    )
    assert "empty" in msg
    msg = _one_line_error(
        runner.invoke(
            cli, ["fit", "--model", "text_hybrid", "--dataset", "digits", "--out", str(tmp_path / "r"), *FAST]
        )
    )
    assert "text_hybrid" in msg
