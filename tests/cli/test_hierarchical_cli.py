"""Hierarchical models from the command line: fit with model options, evaluate (IW, AIS, BDMC),
compare with per-site diagnostics, multi-run compare, and one-line errors for bad sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ppl_vae.analysis import results
from tests.conftest import invoke, one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = [
    "--dataset",
    "digits",
    "--train-size",
    "200",
    "--epochs",
    "1",
    "--batch-size",
    "50",
    "--hidden-dim",
    "16",
    "--latent-dim",
    "2",
    "--device",
    "cpu",
    "--no-progress",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hier")
    two = root / "two_layer"
    result = invoke("fit", "--model", "two_layer", "--model-option", "z1_dim=3", "--out", two, *FAST)
    assert result.exit_code == 0, result.output
    ladder = root / "ladder"
    result = invoke(
        "fit",
        "--model",
        "ladder",
        "--kl-warmup",
        "1",
        "--model-option",
        "kl_warmup_fractions=[0.5, 1]",
        "--model-option",
        "hidden_dims=[[16], [8, 8]]",
        "--method",
        "iwae",
        "--num-particles",
        "2",
        "--out",
        ladder,
        *[a for a in FAST if a not in ("--hidden-dim", "16")],  # hidden_dims sets the sizes
    )
    assert result.exit_code == 0, result.output
    return two, ladder


def test_fit_records_the_model_options_and_resumes_with_them(runs):
    two, ladder = runs
    config = json.loads((ladder / "config.json").read_text())
    assert config["model"]["model_options"] == {"kl_warmup_fractions": [0.5, 1], "hidden_dims": [[16], [8, 8]]}
    assert json.loads((two / "config.json").read_text())["model"]["model_options"] == {"z1_dim": 3}
    result = invoke("fit", "--resume", two, "--epochs", "2", "--no-progress")
    assert result.exit_code == 0 and "epoch 2:" in result.output, result.output


@pytest.mark.parametrize(
    "method,extra",
    [
        ("iw", ["--num-samples", "50"]),
        ("ais", ["--ais-steps", "10", "--num-chains", "2"]),
        ("bdmc", ["--ais-steps", "5", "--ais-steps", "10", "--num-chains", "2"]),
    ],
)
def test_evaluate_works_on_hierarchical_runs(runs, tmp_path, method, extra):
    for run in runs:
        out = tmp_path / run.name
        result = invoke(
            "evaluate", run, "--estimator", method, *extra, "--num-datapoints", "6", "--out", out, "--no-progress"
        )
        assert result.exit_code == 0, result.output
        assert "log p(x)" in result.output
        (nc,) = out.glob("evaluation*.nc")
        ds = results.load_netcdf(nc)
        assert ds.sizes["datapoint"] == 6
        assert all(np.isfinite(ds[v].values).all() for v in ds.data_vars if ds[v].dtype.kind == "f")


def test_compare_reports_kl_and_active_units_per_layer(runs, tmp_path):
    two, _ = runs
    result = invoke(
        "compare",
        two,
        "--num-samples",
        "20",
        "--num-datapoints",
        "12",
        "--num-draws",
        "5",
        "--mf-steps",
        "20",
        "--mf-polish-steps",
        "5",
        "--out",
        tmp_path,
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert (
        "z2: " in result.output and "z1: " in result.output
    )  # "active units: a of 5 (z2: b of 2, ...; z1: c of 3, ...)"
    diag = results.load_netcdf(tmp_path / "diagnostics.nc")
    assert list(diag["latent_site"].values) == ["z2"] * 2 + ["z1"] * 3
    assert {"num_active_z1", "num_active_z2"} <= set(diag.attrs)
    assert np.isfinite(diag["kl"].values).all() and (diag["kl"].values >= 0).all()
    html = (tmp_path / "report.html").read_text()
    assert "latent sites z2 (2), z1 (3)" in html and "z1: " in html
    idata = results.load_inference_data(tmp_path / "inference_data.nc")
    for site, size in (("z1", 3), ("z2", 2)):  # both guides' draws keep every site
        for guide in ("amortized", "meanfield"):
            assert idata.posterior[f"{site}_{guide}"].shape == (1, 5, 12, size)


def test_multirun_compare_pairs_hierarchical_runs(runs, tmp_path):
    result = invoke(
        "compare",
        *runs,
        "--estimator",
        "iw",
        "--num-samples",
        "20",
        "--num-datapoints",
        "10",
        "--out",
        tmp_path,
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert "ladder" in result.output and "two_layer" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--latent-dim", "0"], "--latent-dim must be >= 1"),
        (["--model-option", "z1_dim=0"], "option 'z1_dim' must be null or an integer >= 1, got 0"),
        (["--model-option", "depth=3"], "model 'two_layer' has no option 'depth'"),
        (["--model-option", "z1_dim"], "--model-option must be KEY=VALUE"),
    ],
)
def test_bad_sizes_and_options_are_one_line_errors(tmp_path, args, message):
    result = invoke("fit", "--model", "two_layer", "--out", tmp_path / "r", *FAST, *args)  # the last value counts
    one_line_error(result, message)
