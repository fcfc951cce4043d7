"""``ppl-vae evaluate --method iw|ais|bdmc`` through CliRunner: bounds named, warnings, bad --out."""

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
        [run_dir, "--method", "ais", "--ais-steps", 8, "--num-chains", 4, "--num-datapoints", 6, "--out", tmp_path]
    )
    assert result.exit_code == 0, result.output
    assert "log p(x) >= " not in result.output  # a stochastic bound is no hard inequality
    assert "log p(x) estimate " in result.output and "(AIS, T=8 steps, C=4 chains from the prior" in result.output
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
    assert "log p(x) estimate " in result.output and "(IW, K=10: a stochastic lower bound" in result.output
    assert "Warning: K=10 is too few for a PSIS k̂ tail check; raise --num-samples" in result.output
    assert "log p̂(x) (IW, jackknife)" in result.output and "estimate, neither bound" in result.output
    ds = results.load_netcdf(tmp_path / "evaluation.nc")
    assert "khat" in ds and all(ds[v].attrs.get("bound") in BOUNDS for v in ds.data_vars)
    assert ds["log_likelihood"].attrs["bound"] == "lower bound" and ds["elbo"].attrs["bound"] == "lower bound"


@pytest.mark.slow
def test_bdmc_prints_the_sandwich_for_each_step_count(run_dir, tmp_path):
    result = _invoke(
        [
            run_dir,
            "--method",
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


def test_warnings_name_weak_estimates_and_what_to_do():
    ds = xr.Dataset(
        {"khat": ("datapoint", [0.2, 0.95, 0.4]), "ess": ("datapoint", [300.0, 2.0, 150.0])},
        attrs={"method": "iw", "num_samples": 1000},
    )
    lines = Evaluation(ds).warnings
    assert len(lines) == 2
    assert "PSIS k̂ > 0.7 for 1 of 3 datapoints (max 0.95)" in lines[0] and "raise --num-samples" in lines[0]
    assert "ESS < 10 for 1 of 3 datapoints" in lines[1]
    ais = xr.Dataset(
        {"ess": ("datapoint", [1.5, 2.0, 15.0]), "accept_rate": ("datapoint", [0.1, 0.2, 0.3])},
        attrs={"method": "ais", "num_chains": 16},
    )
    lines = Evaluation(ais).warnings
    assert any("chain ESS < 8 of 16 for 2 of 3" in line and "--ais-steps" in line for line in lines)
    assert any("acceptance is 0.20" in line for line in lines)
    good = xr.Dataset(
        {"khat": ("datapoint", [0.2]), "ess": ("datapoint", [500.0])}, attrs={"method": "iw", "num_samples": 1000}
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
    _one_line_error(_invoke([run_dir, "--method", "ais", "--out", tmp_path / "new"]), "--out")
    assert not list((tmp_path / "new").iterdir())


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
        (["--method", "ais", "--ais-steps", 0], "--ais-steps must be >= 1"),
        (["--method", "ais", "--num-chains", 0], "--num-chains must be >= 1"),
        (["--method", "ais", "--step-size", 0], "--step-size must be > 0"),
        (["--method", "ais", "--ais-steps", 3, "--ais-steps", 4], "--method ais takes one --ais-steps"),
    ],
)
def test_bad_ais_options_give_one_line_errors(run_dir, args, message):
    _one_line_error(_invoke([run_dir, *args]), message)
