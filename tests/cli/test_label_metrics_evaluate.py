"""evaluate and multi-run compare print the label metrics a model declares beside log p̂(x)
(M2's test error of q(y|x) with its binomial standard error), computed on the scored datapoints."""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner

from ppl_vae import pipeline
from ppl_vae.analysis import results
from ppl_vae.analysis.semisupervised import classification_error
from ppl_vae.cli.main import cli
from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ppl_vae.reports.common import select_datapoints

pytestmark = pytest.mark.usefixtures("one_thread")


def _m2(out, seed=0):
    config = RunConfig(
        model=ModelConfig(model="m2", latent_dim=2, hidden_dim=16),
        data=DataConfig(dataset="digits", train_size=200, labels=40),
        train=TrainConfig(epochs=1, batch_size=50, device="cpu", seed=seed),
    )
    pipeline.fit(config, out, progress=False)
    return out


@pytest.fixture(scope="module")
def m2_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("m2")
    return _m2(root / "a"), _m2(root / "b", seed=1)


def test_evaluate_reports_the_test_error_beside_log_px(m2_runs, tmp_path):
    a, _ = m2_runs
    result = CliRunner().invoke(
        cli, ["evaluate", str(a), "-k", "5", "--num-datapoints", "40", "--out", str(tmp_path), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    ds = results.load_netcdf(tmp_path / "evaluation.nc")
    run = pipeline.load_run(a)
    sel = select_datapoints(run, "test", 40, 0)
    error, se = classification_error(run.vae, sel.x, sel.labels)
    assert ds.attrs["label_metric_test_error"] == pytest.approx(float(error))
    assert math.isclose(float(se), math.sqrt(error * (1 - error) / 40), rel_tol=1e-6)
    (line,) = [ln for ln in result.output.splitlines() if "test error of q(y|x)" in ln]
    assert f"{float(error):.4f} ± {float(se):.4f}" in line and "n = 40 test datapoints" in line


def test_multirun_compare_reports_each_runs_test_error(m2_runs, tmp_path):
    a, b = m2_runs
    result = CliRunner().invoke(
        cli,
        ["compare", str(a), str(b), "--estimator", "iw", "-k", "5", "--num-datapoints", "30"]
        + ["--out", str(tmp_path), "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.output.splitlines() if "test error of q(y|x)" in ln]
    assert len(lines) == 2 and lines[0].startswith("a: ") and lines[1].startswith("b: ")
    html = (tmp_path / "report.html").read_text()
    assert "Label metrics" in html and "test error of q(y|x)" in html


def test_a_model_without_label_metrics_prints_none(tmp_path_factory, tmp_path):
    from tests.cli.conftest import tiny_run

    run = tiny_run(tmp_path_factory, epochs=1)
    result = CliRunner().invoke(
        cli, ["evaluate", str(run), "-k", "5", "--num-datapoints", "10", "--out", str(tmp_path), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert "test error" not in result.output and "cluster accuracy" not in result.output


def test_the_train_split_is_named_in_every_label_metric_line(tmp_path):
    """A GMVAE evaluated on --split train said 'at least one test image, n = 10 train datapoints'."""
    config = RunConfig(
        model=ModelConfig(model="gmvae", latent_dim=2, hidden_dim=16),
        data=DataConfig(dataset="digits", train_size=200),
        train=TrainConfig(epochs=1, batch_size=50, device="cpu"),
    )
    run = pipeline.fit(config, tmp_path / "gm", progress=False).run_dir
    args = ["evaluate", str(run), "-k", "5", "--num-datapoints", "20", "--split", "train", "--no-progress"]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith(("cluster accuracy", "clusters used"))]
    assert len(lines) == 2 and all("n = 20 train datapoints" in ln and "test" not in ln for ln in lines), lines
