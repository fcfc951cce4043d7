"""``ppl-vae calibrate`` through click's CliRunner: SBC and predictive checks of a tiny run, bad inputs included."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ppl_vae import pipeline, runs
from ppl_vae.analysis import results
from ppl_vae.analysis.predictive import IMAGES_IN_UNIT_INTERVAL
from ppl_vae.cli.main import cli
from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from tests.cli.conftest import tiny_run
from tests.conftest import one_line_error
from tests.models.test_scvae import planted_sensor_series

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
        "calibration.html",
    } <= names
    page = (out / "calibration.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<h2>Simulation-based calibration</h2>" in page
    assert page.count("data:image/png;base64,") == 3  # SBC, predictive p-values, worst-fitting datapoints
    assert "refined" not in page.split("</div>", 1)[1].split("Posterior predictive")[0]
    sbc = results.load_netcdf(out / "calibration_sbc.nc")
    for var in ("rank", "chi2_p_value", "ecdf_diff", "band_lower", "outside_band", "coverage", "coverage_se"):
        assert var in sbc, var
    assert sbc.sizes["simulation"] == 40 and sbc.attrs["num_posterior_samples"] == 19
    assert sbc.attrs["made_from"] == f"{bernoulli_run} at epoch {runs.checkpoint_epoch(bernoulli_run)}"
    assert {"z[0]", "z[1]", "|z|", "log p(x|z)"} <= {str(q) for q in sbc["quantity"].values}
    assert int(sbc["rank"].min()) >= 0 and int(sbc["rank"].max()) <= 19
    assert bool(((sbc["coverage"] >= 0) & (sbc["coverage"] <= 1)).all())
    ppc = results.load_netcdf(out / "calibration_ppc.nc")
    assert ppc.sizes["datapoint"] == 20 and ppc.sizes["replicate"] == 20
    assert bool(((ppc["p_value"] >= 0) & (ppc["p_value"] <= 1)).all())
    assert "coverage of central 90% intervals" in result.output
    assert "verdict:" in result.output and "mean p-value" in result.output and "extreme" in result.output
    # every PPC summary with its se over datapoints (QA: bare numbers), computed here independently
    pv = ppc["p_value"].isel(statistic=0).values
    share = float(np.mean(np.minimum(pv, 1 - pv) < 0.05))
    line = next(t for t in result.output.splitlines() if t.startswith(str(ppc["statistic"].values[0]) + " "))
    assert f"mean p-value {pv.mean():.3f} ± {pv.std(ddof=1) / np.sqrt(pv.size):.3f};" in line, line
    assert f"{share:.3f} ± {np.sqrt(share * (1 - share) / pv.size):.3f} (± se over datapoints)" in line, line
    assert "Meng 1994" in result.output
    # the page defines the p-value as computed: mid-p, P(>) + 0.5 P(=), not P(T(x_rep) >= T(x))
    ppc_part = page.split("<h2>Posterior predictive checks</h2>")[1]
    assert "P(T(x_rep) &gt; T(x_i)) + 0.5 P(T(x_rep) = T(x_i)) (mid-p)" in ppc_part and "≥" not in ppc_part
    assert ppc.attrs["p_value_convention"].startswith("mid-p")


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


@pytest.fixture(scope="module")
def m2_run(tmp_path_factory):
    """A tiny m2 run on the embedded digits (20 labels, 1 epoch on 200 training images)."""
    out = tmp_path_factory.mktemp("runs") / "m2"
    config = RunConfig(
        model=ModelConfig(model="m2", latent_dim=2, hidden_dim=16),
        data=DataConfig(dataset="digits", train_size=200, labels=20),
        train=TrainConfig(epochs=1, batch_size=50, device="cpu"),
    )
    pipeline.fit(config, out, progress=False)
    return out


def test_calibrate_m2_gets_its_discrete_site_calibrated_and_sir_beside_the_guide(m2_run, tmp_path):
    before = _hashes(m2_run)
    out = tmp_path / "out"
    args = ["calibrate", str(m2_run), *SMALL, "--out", str(out), "--sir", "40", "--discrete-num-samples", "20"]
    result = CliRunner().invoke(cli, [*args, "--ece-bins", "5", "--ece-binning", "equal-mass"])
    assert result.exit_code == 0, result.output
    assert _hashes(m2_run) == before
    names = {p.name for p in out.iterdir()}
    assert {
        "calibration_discrete.nc",
        "calibration_discrete.png",
        "calibration_sbc_sir.nc",
        "calibration_sbc.nc",
    } <= names
    d = results.load_netcdf(out / "calibration_discrete.nc")
    assert d.attrs["site"] == "y" and d.attrs["binning"] == "equal_mass" and d.attrs["num_bins"] == 5
    assert d.sizes["datapoint"] == 20 and d.sizes["value"] == 10 and d.attrs["num_samples"] == 20
    assert [str(c) for c in d["comparison"].values] == ["q(y|x) vs p(y|x)", "q(y|x) vs labels", "p(y|x) vs labels"]
    for var in ("q", "posterior", "posterior_se", "ece", "ece_se", "ce2", "ce2_se", "mean_tv", "mean_kl", "label"):
        assert var in d, var
    assert abs(float(d["posterior"].sum("value").max()) - 1) < 1e-6 and abs(float(d["q"].sum("value").min()) - 1) < 1e-6
    assert bool(((d["ece"] >= 0) & (d["ece"] <= 1)).all()) and 0 <= float(d["mean_tv"]) <= 1
    sir = results.load_netcdf(out / "calibration_sbc_sir.nc")
    sbc = results.load_netcdf(out / "calibration_sbc.nc")
    assert sir.attrs["posterior"] == "sir" and sir.attrs["sir_num_samples"] == 40 and sbc.attrs["posterior"] == "guide"
    assert sir.sizes["simulation"] == sbc.sizes["simulation"] == 40 and "sir_ess" in sir
    assert "discrete site 'y'" in result.output and "q(y|x) vs labels" in result.output
    assert "mean total variation" in result.output and "SBC of SIR from the guide (K = 40" in result.output


@pytest.mark.parametrize(
    "flags",
    [["--ece-bins", "5"], ["--ece-binning", "equal-mass"], ["--discrete-num-samples", "5", "--ece-bins", "10"]],
)
def test_the_discrete_sites_settings_are_refused_for_a_model_without_one(bernoulli_run, tmp_path, flags):
    """--discrete-num-samples, --ece-bins and --ece-binning set the calibration of a discrete site
    (M2's y, a GMVAE's c); given for a model with none they were accepted and ignored. Given at
    their default value they are still refused (what was typed, not what it equals)."""
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["calibrate", str(bernoulli_run), *SMALL, *flags, "--out", str(out)])
    named = [f for f in flags if f.startswith("--")]
    line = one_line_error(result, f"{', '.join(named)} apply to a model with a discrete latent site")
    assert "model 'bernoulli_mlp' has none" in line
    assert not out.exists()


def test_calibrate_refuses_too_few_sir_proposals_or_draws(m2_run, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    few = runner.invoke(cli, ["calibrate", str(m2_run), *SMALL, "--sir", "10", "--out", str(out)])
    one_line_error(few, "--sir must be 0 (off) or >= --num-posterior-samples (19)")
    for flag in ("--discrete-num-samples", "--ece-bins"):
        bad = runner.invoke(cli, ["calibrate", str(m2_run), *SMALL, flag, "0", "--out", str(out)])
        one_line_error(bad, flag)
    assert not out.exists()


def test_a_discrete_model_that_cannot_be_simulated_still_gets_its_discrete_site_calibrated(
    m2_run, tmp_path, monkeypatch
):
    from ppl_vae.reports import calibration

    def refuse(*args, **kwargs):
        raise ValueError("model 'm2' cannot be calibrated: (stand-in for a model that cannot be simulated)")

    monkeypatch.setattr(calibration, "check_simulable", refuse)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["calibrate", str(m2_run), *SMALL, "--discrete-num-samples", "5", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith("skipped: SBC and predictive checks of the continuous sites (model 'm2'")
    assert sorted(p.name for p in out.iterdir()) == [
        "calibration.html",
        "calibration_discrete.nc",
        "calibration_discrete.png",
    ]
    page = (out / "calibration.html").read_text()
    assert "Skipped:" in page and "Discrete site y" in page and "<h2>Simulation-based calibration</h2>" not in page


def test_a_discrete_site_that_cannot_be_calibrated_is_skipped_up_front_or_refused_when_asked_for(
    m2_run, tmp_path, monkeypatch
):
    """A pair whose discrete site cannot be clamped (no component=) crashed calibrate with a
    TypeError after the SBC work; it is now named up front: skipped with the reason, or refused
    in one line when the discrete site's settings were given."""
    from ppl_vae.analysis import calibration

    def refuse(*args, **kwargs):
        raise ValueError("the calibration of site 'y' clamps it with component= (stand-in)")

    monkeypatch.setattr(calibration, "check_discrete_calibratable", refuse)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["calibrate", str(m2_run), *SMALL, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "skipped: the calibration of the discrete site 'y' (the calibration of site 'y' clamps it" in result.output
    assert "calibration_discrete.nc" not in {p.name for p in out.iterdir()}
    asked = CliRunner().invoke(
        cli, ["calibrate", str(m2_run), *SMALL, "--ece-bins", "5", "--out", str(tmp_path / "o2")]
    )
    one_line_error(asked, "clamps it with component=")
    assert not (tmp_path / "o2").exists()


def test_calibrate_refine_ranks_the_refined_q_on_the_same_simulations_and_reports_the_gap(bernoulli_run, tmp_path):
    before = _hashes(bernoulli_run)
    out = tmp_path / "out"
    args = ["calibrate", str(bernoulli_run), *SMALL, "--out", str(out), "--refine", "5", "--sir", "40"]
    result = CliRunner().invoke(cli, [*args, "--refine-lr", "0.05", "--refine-num-samples", "2"])
    assert result.exit_code == 0, result.output
    assert _hashes(bernoulli_run) == before
    sbc = results.load_netcdf(out / "calibration_sbc.nc")
    refined = results.load_netcdf(out / "calibration_sbc_refined.nc")
    assert refined.attrs["posterior"] == "refined" and refined.attrs["refine_steps"] == 5
    assert refined.attrs["refine_lr"] == 0.05 and refined.attrs["refine_num_samples"] == 2
    assert refined.sizes["simulation"] == sbc.sizes["simulation"] == 40
    assert list(refined["quantity"].values) == list(sbc["quantity"].values)
    for var in ("rank", "chi2_p_value", "coverage", "outside_band", "refine_gap", "refine_gap_se"):
        assert var in refined, var
    gap = results.load_netcdf(out / "calibration_refine.nc")
    assert gap.sizes["datapoint"] == 20 and gap.attrs["refine_steps"] == 5 and gap.attrs["split"] == "test"
    for var in ("elbo_before", "elbo_after", "gap", "gap_stderr"):
        assert var in gap, var
    assert "SBC of the refined q (K = 5 Adam steps, lr 0.05, 2 draws per step" in result.output
    assert "amortization gap closed by the K steps" in result.output
    assert "coverage of central intervals pooled over the latent dimensions" in result.output
    page = (out / "calibration.html").read_text()
    for text in ("encoder q(z|x)", "refined q, K=5", "SIR, K=40", "Amortization gap closed by refinement",
                 "mean rank / L", "rank sd ratio", "gap closed by refinement"):  # fmt: skip
        assert text in page, text
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)  # every number on the page is defined

    # a later calibration without refinement or SIR replaces this one as a whole: the refined,
    # SIR and refinement files it does not write described the earlier page and are removed
    again = CliRunner().invoke(cli, ["calibrate", str(bernoulli_run), *SMALL, "--out", str(out), "--seed", "1"])
    assert again.exit_code == 0, again.output
    stale = {"calibration_sbc_refined.nc", "calibration_refine.nc", "calibration_sbc_sir.nc"}
    assert not stale & {p.name for p in out.iterdir()}
    assert {"calibration_sbc.nc", "calibration_ppc.nc", "calibration.html"} <= {p.name for p in out.iterdir()}
    removed = [line for line in again.output.splitlines() if line.startswith("removed the earlier calibration's")]
    assert len(removed) == 1 and all(name in removed[0] for name in stale), again.output
    assert "refined q" not in (out / "calibration.html").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--refine", "-1"], "--refine must be >= 0"),
        (["--refine", "5", "--refine-lr", "0"], "--refine-lr must be a positive number"),
        (["--refine", "5", "--refine-lr", "nan"], "--refine-lr must be a positive number"),
        (["--refine", "5", "--refine-num-samples", "0"], "--refine-num-samples must be >= 1"),
        (["--refine-lr", "0.1"], "--refine-lr apply to the refinement only: give --refine K"),
        (["--refine-num-samples", "3"], "--refine-num-samples apply to the refinement only"),
        (["--refine", "1000000"], "--refine 1000000 is far beyond"),
    ],
)
def test_calibrate_refuses_bad_refine_options_and_writes_nothing(bernoulli_run, tmp_path, extra, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["calibrate", str(bernoulli_run), *SMALL, "--out", str(out), *extra])
    one_line_error(result, message)
    assert not out.exists()


def test_calibrate_mean_field_ranks_q_star_on_the_same_simulations(bernoulli_run, tmp_path):
    before = _hashes(bernoulli_run)
    out = tmp_path / "out"
    args = ["calibrate", str(bernoulli_run), *SMALL, "--out", str(out), "--mean-field", "--mf-steps", "60"]
    result = CliRunner().invoke(cli, [*args, "--sir", "40"])
    assert result.exit_code == 0, result.output
    assert _hashes(bernoulli_run) == before
    sbc = results.load_netcdf(out / "calibration_sbc.nc")
    q_star = results.load_netcdf(out / "calibration_sbc_meanfield.nc")
    assert q_star.attrs["posterior"] == "meanfield" and q_star.attrs["meanfield_max_steps"] == 60
    assert q_star.attrs["meanfield_init"] == "encoder"
    assert q_star.sizes["simulation"] == sbc.sizes["simulation"] == 40
    assert list(q_star["quantity"].values) == list(sbc["quantity"].values)
    for var in ("rank", "chi2_p_value", "coverage", "outside_band", "meanfield_gap", "meanfield_gap_se"):
        assert var in q_star, var
    assert q_star["meanfield_converged"].dtype == bool
    assert not (out / "calibration_sbc_refined.nc").exists()
    assert "SBC of the mean-field q* (a diagonal Gaussian fitted to each x alone" in result.output
    assert "ELBO gained by q* over the encoder on the simulated x" in result.output
    assert "coverage of central intervals pooled over the latent dimensions" in result.output
    page = (out / "calibration.html").read_text()
    for text in ("encoder q(z|x)", "mean-field q*", "SIR, K=40", "Mean-field q*: a diagonal Gaussian"):
        assert text in page, text
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mean-field", "--mf-steps", "0"], "--mf-steps must be >= 1"),
        (["--mf-steps", "50"], "--mf-steps applies to the mean-field q* only: give --mean-field too"),
        (["--mean-field", "--mf-steps", "1000000"], "--mf-steps 1000000 is far beyond"),
        (["--mean-field", "--mf-steps", "x"], "--mf-steps"),
    ],
)
def test_calibrate_refuses_bad_mean_field_options_and_writes_nothing(bernoulli_run, tmp_path, extra, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["calibrate", str(bernoulli_run), *SMALL, "--out", str(out), *extra])
    one_line_error(result, message)
    assert not out.exists()


def test_too_few_posterior_draws_for_a_central_interval_are_refused(bernoulli_run, tmp_path):
    """With L = 9 draws the central 90% interval held all ten ranks: 'coverage 1.000 ± 0.000' on
    every dimension, by construction. L is refused below the 19 draws the interval needs, and a
    level whose interval would leave nothing out (95% at L = 19) is not reported."""
    from ppl_vae.analysis import results

    out = tmp_path / "out"
    small = [a if a != "19" else "9" for a in SMALL]
    one_line_error(
        CliRunner().invoke(cli, ["calibrate", str(bernoulli_run), *small, "--out", str(out)]),
        "--num-posterior-samples must be >= 19: a central 90% interval of L draws leaves a draw out",
    )
    assert not out.exists()
    result = CliRunner().invoke(cli, ["calibrate", str(bernoulli_run), *SMALL, "--out", str(out)])
    assert result.exit_code == 0, result.output
    sbc = results.load_netcdf(out / "calibration_sbc.nc")
    assert list(sbc["level"].values) == [0.5, 0.8, 0.9]
    assert (sbc["nominal"].values < 1).all()


@pytest.fixture(scope="module")
def non_image_runs(tmp_path_factory):
    """Runs whose data are not images in [0, 1]: scvae on standardized sensor windows, and
    text_hybrid_historyless on character indices."""
    tmp = tmp_path_factory.mktemp("nonimage")
    values, labels = planted_sensor_series(num_steps=600)
    csv = tmp / "sensors.csv"
    csv.write_text(
        "a,b,c,label\n" + "\n".join(",".join([f"{v:.5f}" for v in row] + [str(k)]) for row, k in zip(values, labels))
    )
    words = ["red", "cat", "sat", "on", "mat", "blue", "tree", "far"]
    rng = np.random.default_rng(0)
    lines = tmp / "lines.txt"
    lines.write_text("\n".join(" ".join(rng.choice(words, 4)) for _ in range(200)) + "\n")
    runs = {}
    for name, model, data in (
        ("sensors", "scvae", ["timeseries-csv", str(csv)]),
        ("text", "text_hybrid_historyless", ["text-lines", str(lines)]),
    ):
        runs[name] = tmp / name
        result = CliRunner().invoke(
            cli,
            [
                "fit",
                "--model",
                model,
                "--dataset",
                data[0],
                "--data-dir",
                data[1],
                "--hidden-dim",
                "8",
                "--latent-dim",
                "4",
            ]
            + ["--epochs", "1", "--batch-size", "50", "--no-progress", "--out", str(runs[name])],
        )
        assert result.exit_code == 0, result.output
    return runs


@pytest.mark.parametrize("data, why", [("sensors", "not in [0, 1]"), ("text", "not images")])
def test_predictive_checks_are_skipped_with_a_note_on_data_that_are_not_images(non_image_runs, tmp_path, data, why):
    """mean_intensity and active_pixels (elements > 0.5) mean nothing for standardized sensor
    windows or character indices: calibrate says so and writes no predictive results, nor the
    worst-datapoints image figure; SBC still runs."""
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["calibrate", str(non_image_runs[data]), *SMALL, "--out", str(out)])
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.output.splitlines() if line.startswith("skipped: posterior predictive checks")]
    assert len(skipped) == 1 and IMAGES_IN_UNIT_INTERVAL.description in skipped[0] and why in skipped[0], result.output
    assert "mean p-value" not in result.output
    names = {p.name for p in out.iterdir()}
    assert {"calibration_sbc.nc", "calibration_sbc.png", "calibration.html"} <= names
    assert not names & {"calibration_ppc.nc", "calibration_ppc.png", "calibration_worst.png"}
    page = (out / "calibration.html").read_text()
    assert "<b>Skipped:</b> posterior predictive checks" in page and "<h2>Posterior predictive checks</h2>" not in page


def test_the_docs_name_the_data_the_predictive_statistics_apply_to():
    docs = (Path(__file__).parents[2] / "docs" / "calibration.md").read_text()
    assert IMAGES_IN_UNIT_INTERVAL.description in " ".join(docs.split())


def test_the_ecdf_p_values_floor_is_printed_as_a_bound(bernoulli_run, tmp_path):
    """At its Monte Carlo floor 1 / (1 + B) the ECDF p-value is a bound: the summary prints
    "≤ 1.0e-04" for it, as the page does, and the estimate itself elsewhere."""
    out = tmp_path / "out"
    small = [*SMALL]
    small[1] = "100"  # --num-simulations: enough for the 1-epoch guide to fail at the floor
    result = CliRunner().invoke(cli, ["calibrate", str(bernoulli_run), *small, "--out", str(out)])
    assert result.exit_code == 0, result.output
    sbc = results.load_netcdf(out / "calibration_sbc.nc")
    floor = 1 / (1 + sbc.attrs["num_band_simulations"])
    at_floor = np.isclose(sbc["ecdf_p_value"].values, floor)
    assert at_floor.any() and not at_floor.all()  # both kinds are printed
    lines = result.output.splitlines()
    for quantity, p, bound in zip(sbc["quantity"].values, sbc["ecdf_p_value"].values, at_floor):
        (row,) = [line for line in lines if line.startswith(f"{quantity} ")]
        cells = row[len(str(quantity)) :].split()  # chi2 p-value, ECDF p-value, coverage ± se
        if bound:
            assert cells[1:3] == ["≤", "1.0e-04"], row
        else:
            assert float(cells[1]) == pytest.approx(p, rel=0.06, abs=6e-4), row
    page = (out / "calibration.html").read_text()
    assert page.count(">≤ 1.0e-04<") == int(at_floor.sum())


def test_the_docs_give_the_mf_steps_default_that_calibrate_uses():
    """docs/calibration.md said (500); the default is ADAM_STEPS_BEFORE_POLISH, as --help says."""
    from ppl_vae.estimator_options import ADAM_STEPS_BEFORE_POLISH

    docs = " ".join((Path(__file__).parents[2] / "docs" / "calibration.md").read_text().split())
    stated = re.findall(r"`--mf-steps` \((\d+)\)", docs)
    assert stated == [str(ADAM_STEPS_BEFORE_POLISH)]
    result = CliRunner().invoke(cli, ["calibrate", "--help"])
    assert f"(default: {ADAM_STEPS_BEFORE_POLISH})" in " ".join(result.output.split())


def test_the_train_split_of_a_semi_supervised_run_scores_the_labels_it_was_given(m2_run, tmp_path):
    """QA: on M2 fitted with --labels, evaluate --split train printed no label metric and
    calibrate --split train dropped its comparisons with the labels, without a word (the hidden
    labels are -1). evaluate now scores the labelled points and says so; calibrate says why."""
    from ppl_vae.reports.common import label_metric_lines, select_datapoints

    run = pipeline.load_run(m2_run, history=False)
    sel = select_datapoints(run, "train", 200, 0)
    given = int((sel.labels >= 0).sum())
    assert 0 < given < 200
    values, lines = label_metric_lines(run, sel)
    (line,) = lines
    assert line.startswith("train error of q(y|x)") and f"n = {given} train datapoints" in line
    assert f"[on the {given} of the 200 train datapoints whose labels the run was given" in line
    keep = (sel.labels >= 0).nonzero().squeeze(-1)  # independently: argmax q(y|x) on those points
    with torch.no_grad():
        logits = run.vae.value_logits(sel.x[keep])
    error = float((logits.argmax(-1) != sel.labels[keep]).double().mean())
    assert values["test_error"] == pytest.approx(error)
    out = tmp_path / "cal"
    result = CliRunner().invoke(cli, ["calibrate", str(m2_run), *SMALL, "--split", "train", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "skipped: the comparisons of q(y|x) and p(y|x) with the labels" in result.output


def test_no_cluster_accuracy_against_anomaly_flags(tmp_path):
    """QA: a GMVAE on sensor windows with 0/1 anomaly labels printed a 'cluster accuracy' of 0.8532,
    the share of normal windows; anomaly flags are no classes."""
    values, labels = planted_sensor_series(num_steps=800, anomaly_from=400)
    csv = tmp_path / "sensors.csv"
    csv.write_text(
        "a,b,c,label\n" + "\n".join(",".join([f"{v:.5f}" for v in row] + [str(k)]) for row, k in zip(values, labels))
    )
    out = tmp_path / "gm"
    data = ["--dataset", "timeseries-csv", "--data-dir", str(csv), "--likelihood", "gaussian"]
    result = CliRunner().invoke(cli, ["fit", "--model", "gmvae", *data, "--epochs", "1", "--no-progress",
                                      "--hidden-dim", "8", "--latent-dim", "2", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "cluster accuracy" not in result.output and "clusters used" not in result.output
    assert "cluster_accuracy" not in results.load_netcdf(out / "history.nc")


def test_multirun_compare_saves_each_runs_label_metric_as_a_number(m2_run, tmp_path):
    """QA: multirun.nc kept the label metrics as one line of text only, where the docs promise
    label_metric_<name> numbers."""
    from ppl_vae.reports.common import label_metric_lines, select_datapoints
    from ppl_vae.reports.multirun import compare_runs

    multi = compare_runs([m2_run, m2_run], estimator="iw", num_samples=5, num_datapoints=12, out_dir=tmp_path,
                         progress=False)  # fmt: skip
    saved = results.load_netcdf(tmp_path / "multirun.nc")
    run = pipeline.load_run(m2_run, history=False)
    expected = label_metric_lines(run, select_datapoints(run, "test", 12, 0))[0]["test_error"]
    assert saved["label_metric_test_error"].dims == ("run",)
    assert saved["label_metric_test_error"].values.tolist() == [expected, expected]
    assert multi.values["label_metric_test_error"].values.tolist() == [expected, expected]
