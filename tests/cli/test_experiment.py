"""``ppl-vae experiment`` through click's CliRunner, and the sha256-checked download."""

from __future__ import annotations

import hashlib

import pandas as pd
import pytest
from click.testing import CliRunner

from ppl_vae.cli.main import cli
from ppl_vae.data import download as dl


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


def test_fig2_command_writes_figure_and_numbers(tmp_path):
    out = tmp_path / "f2"
    res = invoke(
        "experiment",
        "fig2",
        "--dataset",
        "digits",
        "--latent-dims",
        "2",
        "--hidden-dim",
        "8",
        "--max-samples",
        "200",
        "--num-evals",
        "2",
        "--eval-size",
        "20",
        "--out",
        str(out),
        "--no-progress",
    )
    assert res.exit_code == 0, res.output
    assert "digits z=2 AEVB train" in res.output and "wake-sleep" in res.output
    assert "final ELBO per datapoint, nats (lower bound: Monte Carlo estimate of the ELBO" in res.output
    frame = pd.read_csv(out / "fig2.csv")
    assert set(frame["method"]) == {"AEVB", "wake-sleep"}
    assert (out / "fig2.png").is_file() and (out / "fig2.svg").is_file()


def test_fig5_and_fig4_commands(tmp_path):
    res = invoke(
        "experiment",
        "fig5",
        "--dataset",
        "digits",
        "--latent-dims",
        "2",
        "--hidden-dim",
        "8",
        "--max-samples",
        "100",
        "--num-images",
        "4",
        "--out",
        str(tmp_path / "f5"),
        "--no-progress",
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "f5" / "fig5.png").is_file()
    res = invoke(
        "experiment",
        "fig4",
        "--dataset",
        "digits",
        "--hidden-dim",
        "8",
        "--max-samples",
        "100",
        "--grid-size",
        "2",
        "--out",
        str(tmp_path / "f4"),
        "--no-progress",
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "f4" / "fig4_digits.nc").is_file()


@pytest.mark.parametrize(
    "args, words",
    [
        (["fig2", "--dataset", "nope"], "experiment dataset"),
        (["fig2", "--latent-dims", "a,b"], "--latent-dims"),
        (["fig2", "--dataset", "digits", "--methods", "MCEM"], "--methods must be among AEVB, wake-sleep"),
        (["fig2", "--dataset", "digits", "--max-samples", "0"], "--max-samples must be positive"),
        (["fig3", "--latent-dim", "7", "--dataset", "digits"], "--latent-dim must be between 1 and 4"),
        (["fig4", "--dataset", "mnist", "--data-dir", "/nonexistent"], "sha256"),
        (["fig5", "--dataset", "frey-face"], "--data-dir"),
    ],
)
def test_bad_input_gives_one_line_error(tmp_path, args, words):
    res = invoke("experiment", *args, "--out", str(tmp_path / "o"), "--no-progress")
    assert res.exit_code != 0
    assert words in res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1


def _mirror(tmp_path, content=b"frey face bytes"):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "frey_rawface.mat").write_bytes(content)
    return mirror, hashlib.sha256(content).hexdigest()


def test_download_verifies_sha256(tmp_path, monkeypatch):
    mirror, digest = _mirror(tmp_path)
    monkeypatch.setitem(dl.SOURCES._entries, "frey-face", dl.Source("unused", {"frey_rawface.mat": digest}))
    paths = dl.download("frey-face", tmp_path / "data", url=mirror.as_uri(), progress=False)
    assert paths == [tmp_path / "data" / "frey_rawface.mat"]
    assert paths[0].read_bytes() == b"frey face bytes"


def test_download_with_wrong_checksum_leaves_nothing(tmp_path):
    mirror, _ = _mirror(tmp_path)  # these bytes are not the real frey_rawface.mat
    res = invoke(
        "experiment",
        "download",
        "frey-face",
        "--data-dir",
        str(tmp_path / "data"),
        "--url",
        mirror.as_uri(),
        "--no-progress",
    )
    assert res.exit_code == 1
    assert "expected 265a83a2" in res.output and res.output.startswith("Error:")
    assert not (tmp_path / "data").exists()  # no file, and no empty folder either


def test_download_missing_file_and_unknown_dataset(tmp_path):
    res = invoke(
        "experiment",
        "download",
        "mnist",
        "--data-dir",
        str(tmp_path / "d"),
        "--url",
        (tmp_path / "empty").as_uri(),
        "--no-progress",
    )
    assert res.exit_code == 1 and "could not download" in res.output
    res = invoke("experiment", "download", "cifar", "--data-dir", str(tmp_path / "d"))
    assert res.exit_code == 1 and "downloadable dataset" in res.output
