"""`ppl-vae generate`, `inpaint` and `animate` through click's CliRunner, bad inputs included,
and the conv model's image-size error through `ppl-vae fit`."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from ppl_vae import runs
from tests.conftest import invoke, one_line_error

SMALL = ["--hidden-dim", "16", "--latent-dim", "2", "--train-size", "200", "--batch-size", "100", "--no-progress"]


@pytest.fixture(scope="module")
def cvae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cvae"
    result = invoke("fit", "--model", "cvae", "--epochs", "1", "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    # the label is given: every ELBO it prints and records bounds log p(x | y), not log p(x)
    assert "Monte Carlo estimates of lower bounds on log p(x | y);" in result.output
    history = runs.load_history(out)
    for name in ("train_elbo", "test_elbo", "val_elbo"):
        assert "lower bound on log p(x | y)" in history[name].attrs["description"], name
    return out


def test_generate_writes_one_row_per_label(cvae_run, tmp_path):
    png = tmp_path / "grid.png"
    result = invoke("generate", cvae_run, "--num-samples", "4", "--label", "3", "--label", "7", "--out", png)
    assert result.exit_code == 0, result.output
    assert "8 samples written" in result.output
    with Image.open(png) as im:
        assert im.format == "PNG"


def test_inpaint_reports_evidence_ess_and_inferred_labels(cvae_run, tmp_path):
    result = invoke(
        "inpaint",
        cvae_run,
        "--mask",
        "quadrant",
        "--num-images",
        "3",
        "--num-samples",
        "50",
        "--no-label",
        "--proposal",
        "encoder",
        "--out",
        tmp_path / "inp.png",
    )
    assert result.exit_code == 0, result.output
    assert "mean log p(x_obs)" in result.output and "of 500 weights" in result.output
    assert re.search(r"mean log p\(x_obs\) -?\d+\.\d\d ± \d+\.\d\d \(se over images\) nats", result.output)
    assert "(importance-weighted: a stochastic lower bound)" in result.output
    assert "label inferred from the observed part:" in result.output
    assert (tmp_path / "inp.png").is_file()


def test_animate_continues_the_run_and_writes_frames_and_a_gif(tmp_path):
    out = tmp_path / "mlp"
    assert invoke("fit", "--model", "bernoulli_mlp", "--epochs", "0", "--out", out, *SMALL).exit_code == 0
    result = invoke("animate", out, "--epochs", "2", "--num-samples", "4", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "epoch 2: test ELBO" in result.output and "3 frames" in result.output
    with Image.open(out / "samples.gif") as gif:
        assert gif.n_frames == 3
    from ppl_vae.runs import load_history

    assert list(load_history(out)["epoch"].values) == [1, 2]
    # other settings are refused in plain words (QA: "--every frame of one animation", the flag's
    # name replacing the English word)
    line = one_line_error(invoke("animate", out, "--epochs", "3", "--num-samples", "9"), "every frame of one animation")
    assert "--every frame" not in line


def test_animate_on_a_run_that_stopped_early_says_so_and_its_real_epoch(tmp_path):
    """QA: animate --epochs 6 on a run early-stopped at epoch 2 printed 'epoch 6: test ELBO ...'
    (epoch 2's) and trained nothing, where fit --resume says there is nothing to do."""
    out = tmp_path / "early"
    flags = ["--train-size", "100", "--epochs", "60", "--lr", "0.03", "--val-fraction", "0.5"]
    fitted = invoke("fit", *flags, "--early-stopping-patience", "1", "--out", out, "--device", "cpu", "--no-progress")
    assert fitted.exit_code == 0 and "stopped early after epoch" in fitted.output, fitted.output
    done = runs.checkpoint_epoch(out)
    assert done < 6
    result = invoke("animate", out, "--epochs", "6", "--no-progress")
    assert result.exit_code == 0, result.output
    assert f"nothing to train: {out} stopped early after epoch {done}" in result.output
    assert f"epoch {done}: test ELBO" in result.output and "epoch 6" not in result.output
    # the same run animated from epoch 1: it trains, then stops early in this call (not "nothing")
    again = tmp_path / "again"
    one = ["fit", *flags[:3], "1", *flags[4:], "--early-stopping-patience", "1", "--out", again, "--device", "cpu"]
    assert invoke(*one, "--no-progress").exit_code == 0
    result = invoke("animate", again, "--epochs", "6", "--no-progress")
    assert result.exit_code == 0, result.output
    assert f"stopped early after epoch {done}" in result.output and "nothing to train" not in result.output


def test_bad_inputs_give_one_line_errors(cvae_run, tmp_path):
    one_line_error(invoke("generate", cvae_run, "--label", "12"), "labels must lie in [0, 9]")
    one_line_error(invoke("inpaint", cvae_run, "--mask", "diagonal"), "unknown mask 'diagonal'")
    one_line_error(invoke("generate", tmp_path / "absent"), "run directory not found")
    one_line_error(invoke("animate", cvae_run, "--epochs", "0"), "--epochs must be >= the 1 the run has done, got 0")
    one_line_error(invoke("animate", cvae_run, "--epochs", "3", "--every", "0"), "--every must be >= 1, got 0")


def test_conv_on_8x8_digits_is_refused_before_a_run_dir_is_made(tmp_path):
    out = tmp_path / "conv"
    result = invoke("fit", "--model", "conv", "--epochs", "1", "--out", out, "--no-progress")
    one_line_error(result, "needs 28x28 images with event shape (channels, 28, 28)")
    assert "(1, 8, 8)" in result.output
    assert not out.exists()


def test_cvae_on_unlabelled_data_is_refused(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(0).random((20, 1, 4, 4)).astype(np.float32))
    result = invoke(
        "fit", "--model", "cvae", "--dataset", path, "--epochs", "1", "--out", tmp_path / "r", "--no-progress"
    )
    one_line_error(result, "needs labelled data")


@pytest.fixture(scope="module")
def two_layer_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "two_layer"
    result = invoke("fit", "--model", "two_layer", "--epochs", "0", "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    return out


def test_inpaint_on_a_two_layer_run(two_layer_run, tmp_path):
    png = tmp_path / "inp.png"
    for proposal in ("prior", "encoder"):
        result = invoke(
            "inpaint", two_layer_run, "--num-images", "2", "--num-samples", "20", "--proposal", proposal, "--out", png
        )
        assert result.exit_code == 0, result.output
        assert "mean log p(x_obs)" in result.output and "of 20 weights" in result.output
        assert png.is_file()


@pytest.mark.parametrize(
    "args,named",
    [
        (["--dim", "0"], ("--dim", "--traverse")),
        (["--num-steps", "5"], ("--num-steps", "--traverse")),
        (["--span", "2"], ("--span", "--traverse")),
        (["--traverse", "--label", "3"], ("--label", "--traverse")),
        (["--traverse", "--num-samples", "4"], ("--num-samples", "--traverse")),
        (["--traverse", "--seed", "4"], ("--seed", "--traverse")),
    ],
)
def test_generate_options_that_do_not_apply_are_errors_naming_both(two_layer_run, tmp_path, args, named):
    out = tmp_path / "grid.png"
    result = invoke("generate", two_layer_run, *args, "--out", out)
    line = one_line_error(result)
    # refused like every command refuses an option that does not apply: one line, exit 1, no usage text
    assert result.exit_code == 1 and "Usage:" not in result.output
    assert all(flag in line for flag in named), line
    assert not out.exists()


def test_inpaint_label_flag_on_an_unconditional_model_is_an_error(two_layer_run, tmp_path):
    out = tmp_path / "inp.png"
    for flag in ("--label", "--no-label"):
        result = invoke("inpaint", two_layer_run, "--num-images", "1", "--num-samples", "4", flag, "--out", out)
        line = one_line_error(result, "--label/--no-label")
        assert result.exit_code == 1 and "Usage:" not in result.output
        assert "two_layer" in line and "conditional" in line
        assert not out.exists()


def test_generate_label_on_an_unconditional_model_names_every_model_that_takes_labels(two_layer_run, tmp_path):
    result = invoke("generate", two_layer_run, "--label", "3", "--out", tmp_path / "grid.png")
    line = one_line_error(result, "cvae, m2")
    assert result.exit_code == 1 and "Usage:" not in result.output, line


def test_out_naming_a_folder_is_refused_and_missing_parents_are_created(two_layer_run, tmp_path):
    """--out dir/ wrote a PNG file called dir; --out missing/dir/x.png was refused by generate and
    inpaint while anomaly (and every folder --out) created the folders."""
    folder = tmp_path / "newdir"
    for command in (["generate"], ["inpaint", "--num-images", "1", "--num-samples", "4"]):
        result = invoke(*command[:1], two_layer_run, *command[1:], "--out", f"{folder}/")
        line = one_line_error(result, "names a folder")
        assert result.exit_code == 1 and not folder.exists(), line
    png = tmp_path / "missing" / "deep" / "grid.png"
    assert invoke("generate", two_layer_run, "--out", png).exit_code == 0 and png.is_file()
    png = tmp_path / "missing2" / "inp.png"
    result = invoke("inpaint", two_layer_run, "--num-images", "1", "--num-samples", "4", "--out", png)
    assert result.exit_code == 0 and png.is_file(), result.output
    # a refused command leaves no folder it made
    result = invoke("generate", two_layer_run, "--num-samples", "0", "--out", tmp_path / "missing3" / "x.png")
    assert result.exit_code == 1 and not (tmp_path / "missing3").exists(), result.output


def test_generate_titles_the_sample_grid(two_layer_run, cvae_run, tmp_path, monkeypatch):
    from ppl_vae.analysis import generation

    titles = []
    real = generation.save_figure

    def spy(fig, path, **kw):
        titles.append(fig.axes[0].get_title())
        return real(fig, path, **kw)

    monkeypatch.setattr(generation, "save_figure", spy)
    assert invoke("generate", two_layer_run, "--out", tmp_path / "a.png").exit_code == 0
    assert invoke("generate", cvae_run, "--num-samples", "2", "--out", tmp_path / "b.png").exit_code == 0
    assert titles[0] == "samples E[x | z], z ~ p(z)"
    assert titles[1].startswith("samples E[x | z, y], z ~ p(z)") and "label y" in titles[1]


def test_anomaly_refuses_a_conditional_model_in_one_line(cvae_run, tmp_path):
    """anomaly scores log p(x); a cvae's ELBO bounds log p(x | y). It failed while scoring with
    Pyro's advice to pass y and its table of trace shapes."""
    out = tmp_path / "s.nc"
    line = one_line_error(
        invoke("anomaly", cvae_run, "--normal-class", "3", "--out", out), "whose ELBO bounds log p(x | y)"
    )
    assert "Trace Shapes" not in line and not out.exists()


def test_errors_from_inside_a_pyro_program_lose_the_trace_shapes():
    from ppl_vae.errors import one_line

    exc = ValueError("the model needs labels: pass y\nTrace Shapes:\n Param Sites:\n Sample Sites:")
    assert one_line(exc) == "the model needs labels: pass y"
    assert one_line(ValueError("a\n  b")) == "a b" and one_line(ValueError()) == "ValueError"


def test_evaluate_of_a_conditional_model_says_it_estimates_log_p_x_given_y(cvae_run, tmp_path):
    result = invoke("evaluate", cvae_run, "-k", "5", "--num-datapoints", "10", "--out", tmp_path, "--no-progress")
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert first.startswith("log p(x | y) estimate ") and "below log p(x | y) in expectation" in first
    from ppl_vae.analysis import results

    assert results.load_netcdf(tmp_path / "evaluation.nc").attrs["evidence"] == "log p(x | y)"


def test_compare_of_a_conditional_run_draws_its_reconstructions_with_the_labels(cvae_run, tmp_path):
    """compare's report left the cvae's reconstructions out ("not drawn: the conditional model
    'cvae' needs labels"): they are decoded given each datapoint's label, as it is scored."""
    out = tmp_path / "cmp"
    result = invoke(
        "compare", cvae_run, "-k", "30", "--num-datapoints", "12", "--mf-steps", "5", "--out", out, "--no-progress"
    )
    assert result.exit_code == 0, result.output
    assert "not drawn" not in result.output
    assert "<h2>Reconstructions</h2>" in (out / "report.html").read_text()
