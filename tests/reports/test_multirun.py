"""Several runs on the same datapoints: paired differences (ppl_vae.reports.multirun, ppl-vae compare RUN...)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

from ppl_vae import pipeline
from ppl_vae.analysis import results
from ppl_vae.cli.main import cli
from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ppl_vae.reports.multirun import compare_runs, paired_table, plot_paired_differences
from tests.conftest import one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")  # small loops: one thread is several times faster


def _synthetic(n=400, shift=0.3, seed=0):
    rng = np.random.default_rng(seed)
    hardness = rng.normal(-100, 10, n)  # large spread between datapoints, shared by both runs
    a = hardness + rng.normal(0, 0.2, n)
    b = hardness + shift + rng.normal(0, 0.2, n)
    values = np.stack([a, b])[..., None]
    return (
        xr.Dataset(
            {
                "value": (("run", "datapoint", "quantity"), values),
                "stderr": (("run", "datapoint", "quantity"), np.full_like(values, 0.05)),
            },
            coords={
                "run": ["A", "B"],
                "datapoint": np.arange(n),
                "quantity": ["iw_amortized"],
                "bound": ("quantity", ["lower bound"]),
                "description": ("quantity", ["log p̂(x) (iw)"]),
            },
            attrs={"reference_run": "A"},
        ),
        a,
        b,
    )


def test_paired_differences_cancel_the_spread_between_datapoints():
    ds, a, b = _synthetic()
    table = paired_table(ds)
    row = table.loc[("B", "iw_amortized")]
    d = b - a
    assert row["diff"] == pytest.approx(d.mean())
    assert row["diff_se"] == pytest.approx(d.std(ddof=1) / np.sqrt(len(d)))
    assert row["diff_mc_se"] == pytest.approx(np.sqrt(2 * 0.05**2 * len(d)) / len(d))
    # the unpaired se of each run is ~50x larger than the paired one; the 0.3-nat shift is clear only paired
    assert row["se"] > 20 * row["diff_se"] and bool(row["beyond_noise"]) and row["bound"] == "lower bound"
    assert abs(row["diff"] - 0.3) < 3 * row["diff_se"]
    assert np.isnan(table.loc[("A", "iw_amortized")]["diff"])
    same, _, _ = _synthetic(shift=0.0)
    assert not paired_table(same).loc[("B", "iw_amortized")]["beyond_noise"]
    fig = plot_paired_differences(ds)
    assert len(fig.axes) == 2
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]  # every row named, the run on its first
    quantities = [str(q) for q in ds.quantity.values]
    assert ticks == [f"B: {quantities[0]}", *quantities[1:]], ticks


def _fit(out, binarize="none", seed=0):
    config = RunConfig(
        model=ModelConfig(model="bernoulli_mlp" if binarize != "none" else "gaussian_mlp", latent_dim=2, hidden_dim=8),
        data=DataConfig(dataset="digits", train_size=100, binarize=binarize),
        train=TrainConfig(epochs=1, batch_size=50, device="cpu", seed=seed),
    )
    pipeline.fit(config, out, progress=False)
    return out


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    return _fit(root / "a"), _fit(root / "b", seed=1)


@pytest.mark.slow
def test_compare_several_runs_from_the_cli(two_runs, tmp_path):
    a, b = two_runs
    result = CliRunner().invoke(
        cli,
        [
            "compare",
            str(a),
            str(b),
            str(a),
            "-k",
            "8",
            "--num-datapoints",
            "10",
            "--mf-steps",
            "5",
            "--mf-polish-steps",
            "5",
            "--out",
            str(tmp_path),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Δ vs ref" in result.output and "lower bound" in result.output
    assert "a difference of two bounds is neither" in result.output  # kind describes the mean, not Δ
    ds = results.load_netcdf(tmp_path / "multirun.nc")
    assert ds["value"].dims == ("run", "datapoint", "quantity") and ds.sizes["run"] == 3
    assert ds.attrs["estimator"] == "mis" and len(set(ds["run"].values)) == 3  # unique names for a repeated run
    # the same run, same datapoints, same seed: the paired difference is exactly zero
    np.testing.assert_array_equal(ds["value"].isel(run=2).values, ds["value"].isel(run=0).values)
    assert not np.array_equal(ds["value"].isel(run=1).values, ds["value"].isel(run=0).values)
    html = (tmp_path / "report.html").read_text()
    assert "How to read this" in html and html.count("src='data:image/png;base64,") == 1
    assert "paired se" in html and "http://" not in html
    # QA: the run against itself printed an 'MC se' of Δ of 0.040 beside Δ = 0.000: it is the se
    # Δ would have with independent draws, and every number that says so now says that
    assert "MC se*: the Monte Carlo se Δ would have if the runs' draws were independent" in result.output
    assert "MC se if independent" in html and "they share their random numbers" in html
    # QA: on the page the kind column sat beside Δ with no word that Δ is neither bound
    assert "<th>kind of the mean</th>" in html and "a difference of two bounds is neither" in html
    assert "(the weights scored)" in html and " at epoch " in html


def test_iw_estimator_and_refusals(two_runs, tmp_path):
    a, b = two_runs
    multi = compare_runs([a, b], estimator="iw", num_samples=5, num_datapoints=6, out_dir=tmp_path, progress=False)
    assert list(multi.values.quantity.values) == ["log_px", "elbo"]
    assert list(multi.values.bound.values) == ["lower bound", "lower bound"]
    assert multi.table.shape[0] == 4
    with pytest.raises(ValueError, match="at least two runs"):
        compare_runs([a], progress=False)
    with pytest.raises(ValueError, match="unknown estimator 'nope'; valid estimators: ais, appendix_d"):
        compare_runs([a, b], estimator="nope", progress=False)
    with pytest.raises(ValueError, match="--num-samples does not apply to estimator 'ais'"):
        compare_runs([a, b], estimator="ais", num_samples=5, progress=False)
    from ppl_vae.inference import estimators

    simulated = [name for name in estimators.ESTIMATORS if estimators.get(name).simulated]
    assert simulated == ["bdmc"]  # every estimator on data simulated from the model is refused
    for name in simulated:
        out = tmp_path / name
        result = CliRunner().invoke(cli, ["compare", str(a), str(b), "--estimator", name, "--out", str(out)])
        one_line_error(result, f"estimator '{name}' scores data simulated from each run's own model")
        assert not out.exists()
    other = _fit(tmp_path / "binary", binarize="threshold")  # other test data: no pairing possible
    result = CliRunner().invoke(
        cli,
        ["compare", str(a), str(other), "-k", "3", "--estimator", "iw", "--out", str(tmp_path / "x"), "--no-progress"],
    )
    one_line_error(result, "does not evaluate the same test datapoints")
