"""An estimator added by registering it is evaluated and compared by the CLI with no other change."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from ppl_vae.analysis import results
from ppl_vae.cli.main import cli
from ppl_vae.inference import estimators
from ppl_vae.inference.estimators import ESTIMATORS, Estimate, register_estimator
from ppl_vae.inference.importance import importance_estimate
from tests.cli.conftest import tiny_run
from tests.conftest import one_line_error


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    return tiny_run(tmp_path_factory), tiny_run(tmp_path_factory, epochs=1)


@pytest.fixture
def half_iw(monkeypatch):
    """A new estimator: IW with half the draws, registered as a plugin would (then removed)."""
    estimators.names()  # the built-ins first
    monkeypatch.setattr(ESTIMATORS, "_entries", dict(ESTIMATORS._entries))
    monkeypatch.setattr(ESTIMATORS, "_docs", dict(ESTIMATORS._docs))

    @register_estimator("iw_half", title="IW with half the draws", bound="lower bound")
    def iw_half(model, guide, x, *, seed=None, num_samples=40, batch_size=100, progress=False, **kwargs):
        e = importance_estimate(
            model, guide, x, num_samples=num_samples // 2, batch_size=batch_size, seed=seed, **kwargs
        )
        return Estimate("iw_half", e.log_px, e.log_px_stderr, "lower bound", "IW with K/2 draws (nats)")

    return iw_half


def test_a_registered_estimator_is_evaluated_and_compared(two_runs, half_iw, tmp_path):
    a, b = two_runs
    runner = CliRunner()
    result = runner.invoke(
        cli, ["evaluate", str(a), "--estimator", "iw_half", "-k", "10", "--num-datapoints", "8", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "log p(x) estimate" in result.output and "(iw_half: a stochastic lower bound" in result.output
    ds = results.load_netcdf(tmp_path / "evaluation_iw_half.nc")
    assert ds.attrs["estimator"] == "iw_half" and ds.sizes["datapoint"] == 8 and np.isfinite(ds["log_px"]).all()
    result = runner.invoke(
        cli,
        ["compare", str(a), str(b), "--estimator", "iw_half", "-k", "10", "--num-datapoints", "8"]
        + ["--out", str(tmp_path / "multi"), "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    assert "log p̂(x) (iw_half)" in result.output
    multi = results.load_netcdf(tmp_path / "multi" / "multirun.nc")
    assert list(multi.quantity.values) == ["log_px"] and multi.attrs["estimator"] == "iw_half"
    assert [str(m) for m in multi["made_from"].values] == [f"{a} at epoch 2", f"{b} at epoch 1"]


def test_flags_that_do_not_apply_are_refused_before_any_work(two_runs, tmp_path):
    a, b = two_runs
    runner = CliRunner()
    out = tmp_path / "never"
    one_line_error(
        runner.invoke(cli, ["evaluate", str(a), "--num-chains", "4", "--out", str(out)]),
        "--num-chains does not apply to estimator 'iw' (it applies to ais, bdmc)",
    )
    for args, message in [
        (["--estimator", "iw", "--mf-steps", "5"], "--mf-steps do not apply to estimator 'iw'"),
        (
            ["--estimator", "iw", "--ais-steps", "3"],
            "--ais-steps does not apply to estimator 'iw' (it applies to ais, bdmc)",
        ),
    ]:
        one_line_error(runner.invoke(cli, ["compare", str(a), str(b), *args, "--out", str(out)]), message)
    one_line_error(
        runner.invoke(cli, ["compare", str(a), "--ais-steps", "3", "--out", str(out)]),
        "--ais-steps apply to a comparison of several runs with --estimator",
    )
    one_line_error(
        runner.invoke(cli, ["compare", str(a), "--estimator", "iw", "--out", str(out)]),
        "--estimator iw applies to a comparison of several runs",
    )
    one_line_error(
        runner.invoke(cli, ["compare", str(a), str(b), "--num-draws", "5", "--out", str(out)]),
        "--num-draws applies to one run's compare",
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "pair,message",
    [
        ("bogus=3", "--mf-option: unknown 'bogus'; allowed: 'init', 'elbo', 'lr'"),
        ("lr=abc", "--mf-option: 'lr' must be a positive number, got 'abc'"),
        ("batch_size=0", "--mf-option: 'batch_size' must be a positive integer, got 0"),  # not evaluate's --batch-size
        ("polish=1", "--mf-option: 'polish' must be true or false, got 1"),
        ("init=nowhere", "unknown mean-field init 'nowhere'; valid mean-field inits: encoder, prior"),
    ],
)
def test_a_bad_mean_field_option_is_one_line_before_any_work(two_runs, tmp_path, pair, message):
    """--mf-option KEY=VALUE is checked against fit_mean_field's settings up front: an unknown key
    reached the model as a keyword argument and a wrong type failed inside the fit, both as
    tracebacks after the run was loaded."""
    out = tmp_path / "never"
    result = CliRunner().invoke(
        cli, ["evaluate", str(two_runs[0]), "--estimator", "mis", "--mf-option", pair, "-k", "5", "--out", str(out)]
    )
    one_line_error(result, message)
    assert not out.exists()


def test_one_draw_per_datapoint_has_no_monte_carlo_se_and_says_so(two_runs, tmp_path):
    """With K = 1 each datapoint's log p̂ has no standard error (NaN in the file); the printed Monte
    Carlo se of the mean was 0.000 (a sum that skipped the NaNs), claiming an exact result."""
    result = CliRunner().invoke(
        cli, ["evaluate", str(two_runs[0]), "-k", "1", "--num-datapoints", "6", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("Monte Carlo se of mean"))
    assert "n/a" in line and "0.000" not in line
    assert np.isnan(results.load_netcdf(tmp_path / "evaluation.nc")["log_px_stderr"].values).all()
    result = CliRunner().invoke(
        cli, ["evaluate", str(two_runs[0]), "-k", "4", "--num-datapoints", "6", "--out", str(tmp_path / "k4")]
    )
    line = next(line for line in result.output.splitlines() if line.startswith("Monte Carlo se of mean"))
    ds = results.load_netcdf(tmp_path / "k4" / "evaluation.nc")
    expected = np.sqrt((ds["log_px_stderr"].values ** 2).sum()) / 6
    assert line.split()[-1] == f"{expected:.3f}"


def test_evaluates_gaps_say_they_bound_the_true_gap_not_log_p_x(two_runs, tmp_path):
    """QA: under a heading 'a stochastic lower bound, below log p(x)', the MIS gaps were listed as
    'lower bound' with no word of what they bound."""
    result = CliRunner().invoke(
        cli,
        [
            "evaluate",
            str(two_runs[0]),
            "--estimator",
            "mis",
            "-k",
            "5",
            "--num-datapoints",
            "4",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.output.splitlines() if line.split()}
    # QA: "on the true gap" was false for the approximation gap, which a q* short of the best overstates
    assert rows["approximation_gap"].endswith("lower bound on log p(x) − L[q*] for the fitted q*")
    assert rows["inference_gap"].endswith("lower bound on log p(x) − L[q]"), rows["inference_gap"]
    assert rows["amortization_gap"].endswith("estimate, neither bound") and rows["elbo_amortized"].endswith(
        "lower bound"
    )


def test_split_is_refused_for_an_estimator_on_simulated_data(two_runs, tmp_path):
    out = tmp_path / "never"
    result = CliRunner().invoke(
        cli, ["evaluate", str(two_runs[0]), "--estimator", "bdmc", "--split", "train", "--out", str(out)]
    )
    one_line_error(result, "--split does not apply to estimator 'bdmc': it scores data simulated from the model")
    assert not out.exists()


def test_multirun_compare_takes_the_estimators_own_options(two_runs, tmp_path):
    """compare RUN1 RUN2 --estimator ais had no --ais-steps or --num-chains (always T = 500 and
    16 chains); they are the flags evaluate takes, declared once."""
    a, b = two_runs
    runner = CliRunner()
    args = ["compare", str(a), str(b), "--estimator", "ais", "--ais-steps", "3", "--num-chains", "2"]
    result = runner.invoke(cli, [*args, "--num-datapoints", "4", "--out", str(tmp_path / "m"), "--no-progress"])
    assert result.exit_code == 0, result.output
    multi = results.load_netcdf(tmp_path / "m" / "multirun.nc")
    assert multi.attrs["estimator"] == "ais"
    assert {int(v) for k, v in multi.attrs.items() if k.endswith("num_steps")} == {3}, multi.attrs
    assert {int(v) for k, v in multi.attrs.items() if k.endswith("num_chains")} == {2}, multi.attrs
    # (refused where they do not apply: test_flags_that_do_not_apply_are_refused_before_any_work)
