"""``ppl-vae evaluate --estimator iw|ais|bdmc`` through CliRunner: bounds named, warnings, bad --out."""

from __future__ import annotations

import os

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

from ppl_vae.analysis import results
from ppl_vae.cli.main import cli
from ppl_vae.reports.evaluation import Evaluation

BOUNDS = {"lower bound", "upper bound", "neither"}


def _invoke(args):
    return CliRunner().invoke(cli, ["evaluate", *map(str, args), "--no-progress"])


@pytest.mark.slow
def test_ais_prints_a_lower_bound_and_saves_bounds_for_every_variable(run_dir, tmp_path):
    result = _invoke(
        [run_dir, "--estimator", "ais", "--ais-steps", 8, "--num-chains", 4, "--num-datapoints", 6, "--out", tmp_path]
    )
    assert result.exit_code == 0, result.output
    assert "log p(x) >= " not in result.output  # a stochastic bound is no hard inequality
    assert "log p(x) estimate " in result.output and "(ais, num_steps=8, num_chains=4" in result.output
    assert "stochastic lower bound" in result.output
    ds = results.load_netcdf(tmp_path / "evaluation_ais.nc")
    assert ds.sizes["datapoint"] == 6 and ds.sizes["chain"] == 4
    assert all(ds[v].attrs.get("bound") in BOUNDS for v in ds.data_vars)
    assert ds["log_px"].attrs["bound"] == "lower bound" and ds.attrs["num_steps"] == 8
    assert np.isfinite(ds["log_px"].values).all()
    assert (tmp_path / "evaluation_ais.csv").read_text().count("\n") == 7  # header + one row per datapoint


def test_iw_saves_khat_and_bounds_and_warns_when_k_is_too_small_for_it(run_dir, tmp_path):
    result = _invoke([run_dir, "--num-samples", 10, "--num-datapoints", 5, "--out", tmp_path])
    assert result.exit_code == 0, result.output
    assert "log p(x) >= " not in result.output
    assert "log p(x) estimate " in result.output and "(iw, num_samples=10: a stochastic lower bound" in result.output
    assert "Warning: K=10 is too few for a PSIS k̂ tail check; raise --num-samples" in result.output
    ds = results.load_netcdf(tmp_path / "evaluation.nc")
    assert "khat" in ds and all(ds[v].attrs.get("bound") in BOUNDS for v in ds.data_vars)
    assert ds["log_px"].attrs["bound"] == "lower bound" and ds["elbo"].attrs["bound"] == "lower bound"


def test_jackknife_is_an_estimate_from_the_same_weights_as_iw(run_dir, tmp_path):
    common = ["--num-samples", 10, "--num-datapoints", 5]
    iw = _invoke([run_dir, *common, "--out", tmp_path / "iw"])
    jk = _invoke([run_dir, "--estimator", "jackknife", *common, "--out", tmp_path / "jk"])
    assert jk.exit_code == 0, jk.output
    assert "log p̂(x) (jackknife)" in jk.output and "estimate, neither bound" in jk.output
    a = results.load_netcdf(tmp_path / "iw" / "evaluation.nc")
    b = results.load_netcdf(tmp_path / "jk" / "evaluation_jackknife.nc")
    assert b["log_px"].attrs["bound"] == "neither" and b.attrs["estimator"] == "jackknife"
    np.testing.assert_allclose(b["log_px_iw"].values, a["log_px"].values, rtol=1e-6)  # same seed: same draws
    assert iw.exit_code == 0


@pytest.mark.slow
def test_bdmc_prints_the_sandwich_for_each_step_count(run_dir, tmp_path):
    result = _invoke(
        [
            run_dir,
            "--estimator",
            "bdmc",
            "--ais-steps",
            2,
            "--ais-steps",
            20,
            "--num-chains",
            2,
            "--num-datapoints",
            4,
            "--out",
            tmp_path,
        ]
    )
    assert result.exit_code == 0, result.output
    assert "<= log p(x) <=" in result.output and "BDMC, T=20" in result.output
    ds = results.load_netcdf(tmp_path / "evaluation_bdmc.nc")
    assert list(ds["num_steps"].values) == [2, 20] and ds["upper"].attrs["bound"] == "upper bound"
    assert all(ds[v].attrs.get("bound") in BOUNDS for v in ds.data_vars)
    gap = ds["gap"].mean("datapoint").values
    assert gap[1] < gap[0]  # the sandwich closes as steps grow
    # its rows are simulated, not the test datapoints whose number they take (QA: they carried the
    # test set's indices and split 'test')
    assert ds.attrs["split"] == "none: 4 datapoints simulated from the model"
    assert ds["datapoint"].values.tolist() == [0, 1, 2, 3]


def test_warnings_name_weak_estimates_and_what_to_do():
    ds = xr.Dataset(
        {"khat": ("datapoint", [0.2, 0.95, 0.4]), "ess": ("datapoint", [300.0, 2.0, 150.0])},
        attrs={"estimator": "iw", "num_samples": 1000},
    )
    lines = Evaluation(ds).warnings
    assert len(lines) == 2
    assert "PSIS k̂ > 0.7 for 1 of 3 datapoints (max 0.95)" in lines[0] and "raise --num-samples" in lines[0]
    assert "ESS < 10 for 1 of 3 datapoints" in lines[1]
    ais = xr.Dataset(
        {"ess": ("datapoint", [1.5, 2.0, 15.0]), "accept_rate": ("datapoint", [0.1, 0.2, 0.3])},
        attrs={"estimator": "ais", "num_chains": 16},
    )
    lines = Evaluation(ais).warnings
    assert any("chain ESS < 8 of 16 for 2 of 3" in line and "--ais-steps" in line for line in lines)
    assert any("acceptance is 0.20" in line for line in lines)
    good = xr.Dataset(
        {"khat": ("datapoint", [0.2]), "ess": ("datapoint", [500.0])}, attrs={"estimator": "iw", "num_samples": 1000}
    )
    assert Evaluation(good).warnings == []


def _one_line_error(result, message):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], result.output


def test_out_naming_an_existing_file_is_refused_and_left_untouched(run_dir, tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    _one_line_error(_invoke([run_dir, "--num-samples", 5, "--out", target]), "--out")
    assert target.read_text() == "keep me"
    _one_line_error(_invoke([run_dir, "--num-samples", 5, "--out", target / "sub"]), "cannot be created")


def test_out_not_writable_is_refused_before_any_work(run_dir, tmp_path, monkeypatch):
    from ppl_vae.reports import common as evaluation  # where check_out_dir lives

    real_access = os.access  # deny writing only, as a read-only mount would
    monkeypatch.setattr(
        evaluation.os, "access", lambda path, mode: False if mode & os.W_OK else real_access(path, mode)
    )
    _one_line_error(_invoke([run_dir, "--estimator", "ais", "--out", tmp_path / "new"]), "--out")
    assert not (tmp_path / "new").exists()  # nothing written, and the folder made for it removed


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_out_in_a_read_only_folder_is_refused(run_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        _one_line_error(_invoke([run_dir, "--num-samples", 5, "--out", locked]), "not writable")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--estimator", "ais", "--ais-steps", 0], "--ais-steps must be >= 1"),
        (["--estimator", "ais", "--num-chains", 0], "--num-chains must be >= 1"),
        (["--estimator", "ais", "--step-size", 0], "--step-size must be > 0"),
        (["--estimator", "ais", "--ais-steps", 3, "--ais-steps", 4], "AIS takes one number of temperatures"),
    ],
)
def test_bad_ais_options_give_one_line_errors(run_dir, args, message):
    _one_line_error(_invoke([run_dir, *args]), message)
