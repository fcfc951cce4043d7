"""``ppl-vae calibrate`` through click's CliRunner: SBC and predictive checks of a tiny run, bad inputs included."""

from __future__ import annotations

import hashlib

import pytest
from click.testing import CliRunner

from ppl_vae import pipeline
from ppl_vae.analysis import results
from ppl_vae.cli.main import cli
from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from tests.cli.conftest import tiny_run
from tests.conftest import one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = [
    "--num-simulations",
    "40",
    "--num-posterior-samples",
    "19",
    "--num-replicates",
    "20",
    "--num-datapoints",
    "20",
    "--no-progress",
]


@pytest.fixture(scope="module")
def bernoulli_run(tmp_path_factory):
    """A tiny bernoulli_mlp run on the embedded digits (1 epoch on 200 training images)."""
    return tiny_run(tmp_path_factory, "bernoulli_mlp", epochs=1)


def _hashes(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_calibrate_writes_results_and_leaves_the_run_alone(bernoulli_run, tmp_path):
    before = _hashes(bernoulli_run)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["calibrate", str(bernoulli_run), *SMALL, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert _hashes(bernoulli_run) == before
    names = {p.name for p in out.iterdir()}
    assert {
        "calibration_sbc.nc",
        "calibration_ppc.nc",
        "calibration_sbc.png",
        "calibration_ppc.png",
        "calibration_worst.png",
    } <= names
    sbc = results.load_netcdf(out / "calibration_sbc.nc")
    for var in ("rank", "chi2_p_value", "ecdf_diff", "band_lower", "outside_band", "coverage", "coverage_se"):
        assert var in sbc, var
    assert sbc.sizes["simulation"] == 40 and sbc.attrs["num_posterior_samples"] == 19
    assert {"z[0]", "z[1]", "|z|", "log p(x|z)"} <= {str(q) for q in sbc["quantity"].values}
    assert int(sbc["rank"].min()) >= 0 and int(sbc["rank"].max()) <= 19
    assert bool(((sbc["coverage"] >= 0) & (sbc["coverage"] <= 1)).all())
    ppc = results.load_netcdf(out / "calibration_ppc.nc")
    assert ppc.sizes["datapoint"] == 20 and ppc.sizes["replicate"] == 20
    assert bool(((ppc["p_value"] >= 0) & (ppc["p_value"] <= 1)).all())
    assert "coverage of central 90% intervals" in result.output
    assert "verdict:" in result.output and "mean p-value" in result.output and "extreme" in result.output
    assert "Meng 1994" in result.output


def test_calibrate_refuses_bad_input_and_writes_nothing(bernoulli_run, tmp_path):
    before = _hashes(bernoulli_run)
    runner = CliRunner()
    out = tmp_path / "out"
    missing = runner.invoke(cli, ["calibrate", str(tmp_path / "nope"), *SMALL, "--out", str(out)])
    one_line_error(missing, "nope")
    zero = runner.invoke(
        cli, ["calibrate", str(bernoulli_run), *SMALL, "--num-posterior-samples", "0", "--out", str(out)]
    )
    one_line_error(zero, "--num-posterior-samples")
    assert not out.exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    as_file = runner.invoke(cli, ["calibrate", str(bernoulli_run), *SMALL, "--out", str(a_file)])
    one_line_error(as_file, "--out")
    assert a_file.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    assert _hashes(bernoulli_run) == before


def test_calibrate_refuses_a_model_it_cannot_simulate_up_front(tmp_path):
    run = tmp_path / "relaxed"
    config = RunConfig(
        model=ModelConfig(model="relaxed_gmvae", latent_dim=2, hidden_dim=16),
        data=DataConfig(dataset="digits", train_size=100),
        train=TrainConfig(epochs=1, batch_size=50, device="cpu"),
    )
    pipeline.fit(config, run, progress=False)
    before = _hashes(run)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["calibrate", str(run), *SMALL, "--out", str(out)])
    one_line_error(result, "model 'relaxed_gmvae' cannot be calibrated")
    assert not out.exists() and _hashes(run) == before
