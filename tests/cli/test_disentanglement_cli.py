"""`ppl-vae disentanglement` and `ppl-vae generate --traverse` through click's CliRunner."""

from __future__ import annotations

import os

import pytest
import xarray as xr
from PIL import Image

from tests.conftest import invoke, one_line_error

SMALL = [
    "--model",
    "bernoulli_mlp",
    "--hidden-dim",
    "16",
    "--latent-dim",
    "3",
    "--batch-size",
    "50",
    "--no-progress",
    "--device",
    "cpu",
    "--epochs",
    "1",
]


@pytest.fixture(scope="module")
def sprites_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sprites"
    result = invoke(
        "fit",
        "--dataset",
        "dsprites",
        "--num-images",
        "150",
        "--objective",
        "beta_tc",
        "--tc-beta",
        "6",
        "--out",
        out,
        *SMALL,
    )
    assert result.exit_code == 0, result.output
    return out


def test_disentanglement_writes_netcdf_figures_and_html_into_its_folder(sprites_run, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in sprites_run.iterdir()}
    out = tmp_path / "dis"
    result = invoke(
        "disentanglement",
        sprites_run,
        "--out",
        out,
        "--num-points",
        "100",
        "--num-test-points",
        "30",
        "--num-steps",
        "5",
    )
    assert result.exit_code == 0, result.output
    assert "MIG" in result.output and "DCI disentanglement" in result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["disentanglement.nc", "traversal.png", "mutual_info.png", "objective_terms.png", "disentanglement.html"]
    )
    with xr.open_dataset(out / "disentanglement.nc", engine="h5netcdf") as ds:
        assert ds.mutual_info.dims == ("latent", "factor") and "pos_x" in ds.factor.values
        assert 0 <= float(ds.mig) <= 1
        assert " at epoch " in ds.attrs["made_from"]  # which weights were scored
        assert (
            "training points" in ds["activity"].attrs["data"]
            and "test images" in ds["traversal_activity"].attrs["data"]
        )
    html = (out / "disentanglement.html").read_text()
    assert "Latent traversals" in html and "data:image/png;base64" in html and "Objective terms" in html
    assert "dsprites here is a re-rendering, not the original file." in html  # rendered without --data-dir
    assert {p.name: p.stat().st_mtime_ns for p in sprites_run.iterdir()} == before  # the run is untouched


def test_disentanglement_refuses_a_symlink_in_its_folder_and_data_without_factors(sprites_run, tmp_path, run_dir):
    out = tmp_path / "dis"
    out.mkdir()
    outside = tmp_path / "outside.html"
    outside.write_text("keep")
    os.symlink(outside, out / "disentanglement.html")
    one_line_error(invoke("disentanglement", sprites_run, "--out", out), "symbolic link")
    assert outside.read_text() == "keep" and not (out / "disentanglement.nc").exists()
    one_line_error(invoke("disentanglement", run_dir, "--out", tmp_path / "d2"), "factor labels")


def test_generate_traverse_writes_a_png_and_refuses_a_missing_dimension(sprites_run, tmp_path):
    png = tmp_path / "trav.png"
    result = invoke("generate", sprites_run, "--traverse", "--num-steps", "4", "--out", png)
    assert result.exit_code == 0, result.output
    assert "traversals of 3 dimensions" in result.output
    with Image.open(png) as im:
        assert im.format == "PNG"
    one_line_error(
        invoke("generate", sprites_run, "--traverse", "--dim", "3", "--out", png),
        "--dim: latent dimension(s) [3] do not exist",
    )


def test_disentanglement_on_a_users_npz_says_nothing_about_dsprites(tmp_path):
    """The note on dsprites' re-rendering belongs to dsprites only: a user's .npz with factors is
    the user's own data, not a re-rendering of anything."""
    import numpy as np

    rng = np.random.default_rng(0)
    fx, fy = rng.integers(0, 6, 200), rng.integers(0, 6, 200)
    x = np.zeros((200, 1, 8, 8), np.float32)
    for i in range(200):
        x[i, 0, fy[i] : fy[i] + 3, fx[i] : fx[i] + 3] = 1
    data = tmp_path / "squares.npz"
    np.savez(data, data=x, factors=np.stack([fx, fy], 1), factor_names=np.array(["posx", "posy"]))
    run = tmp_path / "run"
    assert invoke("fit", "--dataset", data, "--out", run, *SMALL).exit_code == 0
    # an earlier report's figure of objective terms, which this run (the plain ELBO) has none of
    (run / "disentanglement").mkdir()
    (run / "disentanglement" / "objective_terms.png").write_bytes(b"an earlier report's figure")
    result = invoke("disentanglement", run, "--num-points", "100", "--num-test-points", "30", "--num-steps", "3")
    assert result.exit_code == 0, result.output
    html = (run / "disentanglement" / "disentanglement.html").read_text()
    assert "posx" in html and "dsprites" not in html and "re-rendering" not in html
    assert "Objective terms" not in html and not (run / "disentanglement" / "objective_terms.png").exists()
    assert "removed the earlier report's " in result.output and "objective_terms.png" in result.output
