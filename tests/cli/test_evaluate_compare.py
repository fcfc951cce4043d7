"""``ppl-vae evaluate`` and ``ppl-vae compare`` through click's CliRunner, bad inputs included."""

from __future__ import annotations

import re

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

from ppl_vae import pipeline
from ppl_vae.analysis import results
from ppl_vae.cli.main import cli
from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from tests.conftest import one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")  # small loops: one thread is several times faster


def test_evaluate_prints_and_saves_estimates(run_dir, tmp_path):
    result = CliRunner().invoke(
        cli,
        [
            "evaluate",
            str(run_dir),
            "--num-samples",
            "20",
            "--num-datapoints",
            "15",
            "--out",
            str(tmp_path),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "num_samples=20" in result.output and "log p̂(x) (iw)" in result.output
    ds = results.load_netcdf(tmp_path / "evaluation.nc")
    # the first line's mean carries its se over datapoints too (QA: it was a bare number)
    se = float(ds["log_px"].std(ddof=1)) / np.sqrt(15)
    assert result.output.startswith(f"log p(x) estimate {float(ds['log_px'].mean()):.3f} ± {se:.3f} (iw")
    assert ds.sizes["datapoint"] == 15 and ds.attrs["num_samples"] == 20
    # the IW estimate is the log of a mean of weights, so it is at least their log-mean (the ELBO)
    assert bool((ds["log_px"] >= ds["elbo"] - 1e-9).all())
    assert bool(((ds["ess"] >= 1 - 1e-9) & (ds["ess"] <= 20 + 1e-9)).all())
    csv = (tmp_path / "evaluation.csv").read_text().splitlines()
    assert len(csv) == 16 and "log_px" in csv[0]


def test_compare_writes_self_contained_report_and_tables(run_dir, tmp_path):
    result = CliRunner().invoke(
        cli,
        [
            "compare",
            str(run_dir),
            "--num-samples",
            "20",
            "--num-datapoints",
            "12",
            "--num-draws",
            "5",
            "--mf-steps",
            "30",
            "--out",
            str(tmp_path),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "amortization gap" in result.output
    # every number printed says what it is
    for line in result.output.splitlines()[1:9]:
        assert line.rstrip().endswith(("lower bound", "upper bound", "neither")), line
    html = (tmp_path / "report.html").read_text()
    assert html.index("What the gaps mean") < html.index("<table")  # the report opens with the explanation
    assert "stochastic lower bound" in html and "multiple-importance-sampling" in html
    assert "comes from the amortized guide" not in html
    assert html.count("src='data:image/png;base64,") >= 7  # incl. the 2-D manifold and latent scatter
    assert "http://" not in html and "https://" not in html
    gaps = results.load_netcdf(tmp_path / "gaps.nc")
    assert set(gaps["estimate"].dims) == {"datapoint", "estimator"}
    np.testing.assert_allclose(
        gaps["amortization_gap"],
        gaps["estimate"].sel(estimator="elbo_meanfield") - gaps["estimate"].sel(estimator="elbo_amortized"),
    )
    assert list(gaps["bound"].values) == ["lower bound"] * 5
    assert gaps["meanfield_converged"].dtype == bool
    table = (tmp_path / "gap_table.csv").read_text()
    assert "approximation_gap" in table and "mc_se" in table and "bound" in table
    idata = results.load_inference_data(tmp_path / "inference_data.nc")
    assert idata.posterior["z_meanfield"].shape == (1, 5, 12, 2)
    assert xr.open_dataset(tmp_path / "diagnostics.nc", engine="h5netcdf").sizes["latent"] == 2


def test_compare_train_split_with_dynamic_binarization_scores_binary_data(tmp_path_factory, tmp_path):
    run = tmp_path_factory.mktemp("runs") / "dyn"
    config = RunConfig(
        model=ModelConfig(model="bernoulli_mlp", latent_dim=2, hidden_dim=8),
        data=DataConfig(dataset="digits", train_size=100, binarize="dynamic"),
        train=TrainConfig(epochs=1, batch_size=50, device="cpu"),
    )
    pipeline.fit(config, run, progress=False)
    result = CliRunner().invoke(
        cli,
        [
            "compare",
            str(run),
            "--split",
            "train",
            "-k",
            "10",
            "--num-datapoints",
            "8",
            "--num-draws",
            "2",
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
    gaps = results.load_netcdf(tmp_path / "gaps.nc")
    assert "Bernoulli" in gaps.attrs["preprocessing"] and gaps.attrs["split"] == "train"
    # binary data under a Bernoulli likelihood: log p(x|z) <= 0, so every ELBO is negative
    assert bool((gaps["estimate"] < 0).all())


@pytest.mark.parametrize("command", ["evaluate", "compare"])
def test_out_naming_an_existing_file_is_refused_and_left_alone(run_dir, tmp_path, command):
    target = tmp_path / "afile.txt"
    target.write_text("keep me")
    for out in (target, target / "sub"):
        result = CliRunner().invoke(
            cli, [command, str(run_dir), "-k", "5", "--num-datapoints", "3", "--out", str(out), "--no-progress"]
        )
        line = one_line_error(result)
        assert "afile.txt" in line and line.startswith("Error: --out ")  # the flag the user typed
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("command", ["evaluate", "compare"])
def test_bad_inputs_give_one_line_errors(run_dir, tmp_path, command):
    runner = CliRunner()
    cases = [
        ([command, str(tmp_path / "missing")], "run directory not found"),
        ([command, str(run_dir), "--num-samples", "0"], "--num-samples must be >= 1"),
        ([command, str(run_dir), "--num-samples", "-3"], "--num-samples must be >= 1"),
    ]
    for args, message in cases:
        result = runner.invoke(cli, args + ["--no-progress"])
        assert result.exit_code != 0
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], result.output


def test_a_refusal_names_the_estimator_the_model_and_the_run_and_hints_skip_estimators_that_refuse(
    tmp_path_factory, tmp_path
):
    """QA: the relaxed GMVAE's simplex site was refused by ais/mis/appendix_d and compare with
    "latent site 'c' has support Simplex() ...", naming neither the estimator nor the model nor
    (in a multi-run compare) the run; and evaluate's IW warning advised 'e.g. ais', which is
    refused for that model."""
    from tests.cli.conftest import tiny_run

    run = tiny_run(tmp_path_factory, "relaxed_gmvae", epochs=1)
    runner = CliRunner()
    small = ["--num-datapoints", "8", "--no-progress", "--out", str(tmp_path / "o")]
    for estimator in ("ais", "mis"):
        result = runner.invoke(cli, ["evaluate", str(run), "--estimator", estimator, *small])
        one_line_error(result, f"estimator {estimator!r} on model 'relaxed_gmvae' (run {run}): latent site 'c'")
    result = runner.invoke(cli, ["compare", str(run), *small])
    one_line_error(result, f"the gap decomposition (mean-field q* and MIS) on model 'relaxed_gmvae' (run {run})")
    assert not (tmp_path / "o").exists()
    from ppl_vae.reports import evaluation
    from ppl_vae.reports.common import select_datapoints

    hints = {}
    for path in (run, tiny_run(tmp_path_factory, "gaussian_mlp", epochs=1)):
        loaded = pipeline.load_run(path, history=False)
        hints[loaded.config.model.model] = evaluation._hints(loaded, select_datapoints(loaded, "test", 4, 0))
    assert hints["gaussian_mlp"] == {} and "not ais, mis or appendix_d" in hints["relaxed_gmvae"]["estimator"]
    hint = hints["relaxed_gmvae"]
    ds = xr.Dataset({"log_px": ("datapoint", np.zeros(4)), "ess": ("datapoint", np.ones(4))},
                    attrs={"estimator": "iw", "num_samples": 100})  # fmt: skip
    ds["log_px_stderr"] = ds["log_px"]
    lines = evaluation.evaluation_warnings(ds, hint)  # ESS 1 of 100: advises another estimator
    assert any("or use another --estimator that applies to this model (not ais" in line for line in lines), lines


def test_compare_of_a_cvae_names_its_evidence_log_p_x_given_y(tmp_path_factory, tmp_path):
    """QA: compare labelled a cvae's estimates log p̂(x), where evaluate (rightly) says log p(x | y)."""
    from tests.cli.conftest import tiny_run

    run = tiny_run(tmp_path_factory, "cvae", epochs=1)
    result = CliRunner().invoke(cli, ["compare", str(run), "-k", "5", "--num-datapoints", "6", "--no-progress",
                                      "--out", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "log p̂(x | y) (MIS, ½q + ½q*)" in result.output and "log p̂(x) (" not in result.output
    assert "stochastic lower bound on its target (log p(x | y) or a gap)" in result.output
    assert "log p̂(x | y)" in (tmp_path / "report.html").read_text()
    # QA: the rest of the page, the files and the figures still said log p(x) and q(z|x)
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", (tmp_path / "report.html").read_text())
    for unconditional in ("log p(x)", "log p̂(x)", "q(z|x)", "q(z_u|x)"):
        assert unconditional not in text, unconditional
    gaps = results.load_netcdf(tmp_path / "gaps.nc")
    meanings = [str(m) for m in gaps["meaning"].values] + [
        str(gaps[g].attrs["meaning"]) for g in ("approximation_gap",)
    ]
    assert all("log p(x)" not in m for m in meanings) and any("log p(x | y)" in m for m in meanings)
    assert "log p(x)," not in (tmp_path / "gap_table.csv").read_text()
    diagnostics = results.load_netcdf(tmp_path / "diagnostics.nc")
    assert diagnostics["kl"].attrs["long_name"].endswith("KL(q(z_u|x, y) || p(z_u))")
    evaluated = CliRunner().invoke(cli, ["evaluate", str(run), "-k", "5", "--num-datapoints", "6", "--no-progress",
                                         "--out", str(tmp_path / "ev")])  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    ev = results.load_netcdf(tmp_path / "ev" / "evaluation.nc")
    assert "log p(x | y)" in ev["log_px"].attrs["long_name"] and "log p(x)" not in ev["log_px"].attrs["long_name"]


def test_results_say_which_weights_and_a_resume_names_the_results_it_left_behind(tmp_path_factory):
    """QA: after `fit --resume`, evaluation.nc and report.html beside the new checkpoint described
    the old weights, and nothing said so (log p̂(x) -2.5 beside a test ELBO of +16.6)."""
    from tests.cli.conftest import tiny_run

    run = tiny_run(tmp_path_factory, epochs=1)
    runner = CliRunner()
    for command in (["evaluate", "--num-samples", "5"], ["compare", "--num-samples", "5", "--mf-steps", "5"]):
        out = runner.invoke(cli, [command[0], str(run), *command[1:], "--num-datapoints", "6", "--no-progress"])
        assert out.exit_code == 0, out.output
    assert results.load_netcdf(run / "evaluation.nc").attrs["made_from"] == f"{run} at epoch 1"
    assert results.load_netcdf(run / "gaps.nc").attrs["made_from"] == f"{run} at epoch 1"
    assert results.load_netcdf(run / "diagnostics.nc").attrs["made_from"] == f"{run} at epoch 1"
    assert results.load_inference_data(run / "inference_data.nc").attrs["made_from"] == f"{run} at epoch 1"
    assert f"<code>{run}</code>, the weights after epoch 1;" in (run / "report.html").read_text()
    resumed = runner.invoke(cli, ["fit", "--resume", str(run), "--epochs", "2", "--no-progress"])
    assert resumed.exit_code == 0, resumed.output
    note = [line for line in resumed.output.splitlines() if line.startswith("note:")]
    assert len(note) == 1, resumed.output
    for name in ("evaluation.nc", "evaluation.csv", "gaps.nc", "report.html"):
        assert name in note[0]
    assert "history.nc" not in note[0] and "config.json" not in note[0] and "checkpoint" not in note[0]
    assert "not epoch 2's" in note[0] and (run / "evaluation.nc").is_file()  # kept: the user's files
    # scored again, the result names the new weights, and a resume with nothing left behind says nothing
    again = runner.invoke(cli, ["evaluate", str(run), "--num-samples", "5", "--num-datapoints", "6", "--no-progress"])
    assert again.exit_code == 0, again.output
    assert results.load_netcdf(run / "evaluation.nc").attrs["made_from"] == f"{run} at epoch 2"
    fresh = tiny_run(tmp_path_factory, epochs=1)
    assert pipeline.resume(fresh, epochs=2, progress=False).made_from == f"{fresh} at epoch 2"  # a Run fit returns
    quiet = runner.invoke(cli, ["fit", "--resume", str(fresh), "--epochs", "3", "--no-progress"])
    assert quiet.exit_code == 0 and "note:" not in quiet.output, quiet.output
