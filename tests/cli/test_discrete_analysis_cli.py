"""The discrete-latent models (gmvae with its component enumerated, m2 with labels enumerated)
through every analysis command: evaluate (IW and AIS), compare, and multi-run compare with the
HTML report, with finite numbers and each number saying what it bounds."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from tests.conftest import invoke

SMALL = (
    "--epochs",
    1,
    "--latent-dim",
    4,
    "--hidden-dim",
    16,
    "--binarize",
    "threshold",
    "--train-size",
    300,
    "--no-progress",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("discrete")
    made = {}
    for model, extra in (("gmvae", ()), ("m2", ("--labels", 50))):
        result = invoke("fit", "--model", model, *SMALL, *extra, "--out", root / model)
        assert result.exit_code == 0, result.output
        made[model] = root / model
    return made


@pytest.mark.parametrize("model", ["gmvae", "m2"])
def test_evaluate_iw_and_ais_on_a_discrete_latent_model(runs, model, one_thread):
    run = runs[model]
    assert invoke("evaluate", run, "--num-samples", 30, "--num-datapoints", 20, "--no-progress").exit_code == 0
    iw = xr.load_dataset(run / "evaluation.nc", engine="h5netcdf")
    assert np.isfinite(iw["log_px"].values).all() and iw["log_px"].attrs["bound"] == "lower bound"
    assert (iw["log_px"] >= iw["elbo"] - 1e-6).all()  # log-mean-exp of the weights >= their mean
    result = invoke(
        "evaluate",
        run,
        "--estimator",
        "ais",
        "--ais-steps",
        10,
        "--num-chains",
        2,
        "--num-datapoints",
        10,
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    ais = xr.load_dataset(run / "evaluation_ais.nc", engine="h5netcdf")
    assert np.isfinite(ais["log_px"].values).all() and ais["log_px"].attrs["bound"] == "lower bound"


def test_compare_one_and_several_discrete_latent_runs(runs, tmp_path, one_thread):
    result = invoke(
        "compare",
        runs["gmvae"],
        "--num-samples",
        30,
        "--num-datapoints",
        20,
        "--out",
        tmp_path / "one",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    gaps = xr.load_dataset(tmp_path / "one" / "gaps.nc", engine="h5netcdf")
    assert np.isfinite(gaps["estimate"].values).all()
    assert (tmp_path / "one" / "report.html").read_text().count("<img") >= 3
    result = invoke(
        "compare",
        runs["gmvae"],
        runs["m2"],
        "--num-samples",
        30,
        "--num-datapoints",
        20,
        "--out",
        tmp_path / "multi",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    multi = xr.load_dataset(tmp_path / "multi" / "multirun.nc", engine="h5netcdf")
    assert set(multi.run.values) == {"gmvae", "m2"} and np.isfinite(multi["value"].values).all()
    assert "<img" in (tmp_path / "multi" / "report.html").read_text()
