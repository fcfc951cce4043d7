"""`ppl-vae fit --model m2 --labels N` and `--model gmvae` through click's CliRunner: the split is
recorded in the run and seen again on load, class-conditional samples, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ppl_vae import pipeline, runs
from tests.conftest import drop_checkpoint_config, invoke, one_line_error

SMALL = ["--hidden-dim", "16", "--latent-dim", "2", "--train-size", "200", "--batch-size", "100", "--no-progress"]


@pytest.fixture(scope="module")
def m2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "m2"
    result = invoke(
        "fit", "--model", "m2", "--labels", "20", "--label-seed", "3", "--epochs", "1", "--out", out, *SMALL
    )
    assert result.exit_code == 0, result.output
    return out


def test_m2_run_records_its_labels_and_reloads_the_same_split(m2_run):
    config = json.loads((m2_run / "config.json").read_text())
    assert config["data"]["labels"] == 20 and config["data"]["label_seed"] == 3
    _, meta = runs.read_checkpoint(m2_run, tensors=False)
    saved = meta["extra"]["data_info"]["labelled_indices"]
    assert len(saved) == 20
    run = pipeline.load_run(m2_run)
    data = pipeline.load_data(run.config)
    assert np.flatnonzero(data.train_labels.numpy() >= 0).tolist() == saved
    assert np.bincount(data.train_labels.numpy()[saved]).tolist() == [2] * 10  # balanced: 2 per digit
    assert run.vae.num_labelled == 20 and run.vae.alpha == pytest.approx(0.1 * 200)


def test_m2_generates_the_same_style_under_every_class(m2_run, tmp_path):
    png = tmp_path / "grid.png"
    result = invoke("generate", m2_run, "--num-samples", "3", "--out", png)
    assert result.exit_code == 0, result.output
    assert Image.open(png).size[0] > 0


def test_gmvae_fits_from_the_command_line(tmp_path):
    result = invoke(
        "fit",
        "--model",
        "gmvae",
        "--prior",
        "mixture_of_gaussians",
        "--num-components",
        "4",
        "--epochs",
        "1",
        "--out",
        tmp_path / "gm",
        *SMALL,
    )
    assert result.exit_code == 0, result.output
    assert pipeline.load_run(tmp_path / "gm").vae.num_values == 4


def test_bad_label_options_give_one_line_errors(tmp_path):
    one_line_error(
        invoke("fit", "--model", "m2", "--labels", "5000", "--epochs", "1", "--out", tmp_path / "a", *SMALL),
        "larger than the training set",
    )
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(0).random((20, 1, 4, 4)).astype(np.float32))
    one_line_error(
        invoke(
            "fit",
            "--model",
            "m2",
            "--dataset",
            path,
            "--labels",
            "4",
            "--epochs",
            "1",
            "--out",
            tmp_path / "b",
            "--no-progress",
        ),
        "needs a dataset with labels",
    )
    one_line_error(
        invoke("fit", "--model", "m2", "--elbo", "mean_field", "--epochs", "1", "--out", tmp_path / "c", *SMALL),
        "cannot sum out the discrete site",
    )
    one_line_error(
        invoke("fit", "--model", "gmvae", "--prior", "vamp", "--epochs", "1", "--out", tmp_path / "d", *SMALL),
        "mixture_of_gaussians",
    )


def test_evaluate_scores_m2_on_x_alone(m2_run, tmp_path):
    """y is a latent site of M2: evaluate's IW scores log p(x) with y summed out (the guide samples
    y), which the per-class estimator meets; log p(x, y), what labels would give, is lower."""
    import torch
    import xarray as xr

    from ppl_vae.inference.enumerated import enumerated_estimate
    from ppl_vae.reports.common import select_datapoints

    result = invoke("evaluate", m2_run, "-k", "400", "--num-datapoints", "4", "--out", tmp_path, "--no-progress")
    assert result.exit_code == 0, result.output
    iw = xr.open_dataset(tmp_path / "evaluation.nc")
    run = pipeline.load_run(m2_run)
    sel = select_datapoints(run, "test", 4, 0)
    per_class = enumerated_estimate(
        run.vae.model, run.vae.guide, sel.x, site="y", num_values=10, num_samples=200, seed=0
    )
    se = np.sqrt(iw["log_px_stderr"].values ** 2 + per_class.log_px_stderr.numpy() ** 2)
    gap = iw["log_px"].values - per_class.log_px.numpy()
    assert (np.abs(gap) < 4 * se + 0.05).all(), (gap, se)
    labelled = per_class.log_joint.gather(-1, torch.as_tensor(sel.labels).unsqueeze(-1)).squeeze(-1).numpy()
    assert (labelled < iw["log_px"].values).all()


def test_resume_refuses_another_labelled_split(m2_run, tmp_path):
    import shutil

    copy = tmp_path / "m2"
    shutil.copytree(m2_run, copy)
    config = json.loads((copy / "config.json").read_text())
    config["data"]["label_seed"] = 4
    (copy / "config.json").write_text(json.dumps(config))
    one_line_error(invoke("fit", "--resume", copy, "--epochs", "2", "--no-progress"), "has 'data.label_seed' = 4")
    drop_checkpoint_config(copy)  # a run from before checkpoints kept their config: the split itself is compared
    one_line_error(invoke("fit", "--resume", copy, "--epochs", "2", "--no-progress"), "labelled training points differ")
    result = invoke("fit", "--resume", m2_run, "--epochs", "2", "--no-progress")  # the same split resumes
    assert result.exit_code == 0, result.output


def test_m2_alpha_and_the_relaxed_temperatures_are_model_options_kept_in_the_run(tmp_path):
    m2 = tmp_path / "m2"
    result = invoke(
        "fit", "--model", "m2", "--labels", "20", "--model-option", "alpha=7.5", "--epochs", "1", "--out", m2, *SMALL
    )
    assert result.exit_code == 0, result.output
    assert json.loads((m2 / "config.json").read_text())["model"]["model_options"] == {"alpha": 7.5}
    vae = pipeline.load_run(m2).vae
    assert vae.alpha == 7.5 and vae.classifier_weight == pytest.approx(7.5 / 20)

    relaxed = tmp_path / "relaxed"
    options = ["--model-option", "temperature=2", "--model-option", "min_temperature=0.25"]
    options += ["--model-option", "anneal_rate=0.01"]
    result = invoke("fit", "--model", "relaxed_gmvae", *options, "--epochs", "1", "--out", relaxed, *SMALL)
    assert result.exit_code == 0, result.output
    config = json.loads((relaxed / "config.json").read_text())
    assert config["model"]["model_options"] == {"temperature": 2, "min_temperature": 0.25, "anneal_rate": 0.01}
    vae = pipeline.load_run(relaxed).vae
    steps = int(vae.steps)  # 200 points in batches of 100: 2 steps
    assert steps == 2 and vae.temperature == pytest.approx(max(0.25, 2 * np.exp(-0.01 * steps)))

    # the exact gmvae has no temperature: refused in one line before anything is written
    result = invoke("fit", "--model", "gmvae", "--model-option", "temperature=2", "--out", tmp_path / "g", *SMALL)
    one_line_error(result, "has no option 'temperature'")
    assert not (tmp_path / "g").exists()


def test_labels_are_drawn_among_the_points_trained_on(tmp_path):
    """With --val-fraction the labels were drawn before the validation split: in --labels 20
    --val-fraction 0.5, 11 of the 20 went to validation, so 9 unbalanced labels were trained on
    while the run recorded 20. They are drawn from the training part now, balanced per class."""
    import torch

    from ppl_vae import runs
    from ppl_vae.inference.training import validation_split

    out = tmp_path / "m2"
    result = invoke(
        "fit", "--model", "m2", "--labels", "20", "--val-fraction", "0.5", "--epochs", "1", "--out", out, *SMALL
    )
    assert result.exit_code == 0, result.output
    info = runs.read_checkpoint(out, tensors=False)[1]["extra"]["data_info"]
    config = runs.load_config(out)
    trained, held_out = validation_split(info["num_train"], config.train)
    labelled = set(info["labelled_indices"])
    assert len(labelled) == 20 and labelled <= set(trained.tolist()) and not labelled & set(held_out.tolist())
    data = pipeline.load_data(config)
    counts = torch.bincount(data.train_labels[data.train_labels >= 0], minlength=10)
    assert counts.tolist() == [2] * 10  # balanced per class among the trained points


def test_m2_history_says_its_elbos_bound_log_p_x_y_where_scored_with_labels(m2_run):
    """Training scores M2's test points with their labels, so the test ELBO bounds log p(x, y);
    the output and history.nc said log p(x) (evaluate, which sums y out, does score log p(x))."""
    from ppl_vae.models.vae import bounds_of_training_elbos

    history = runs.load_history(m2_run)
    assert "lower bound on log p(x, y)" in history.test_elbo.attrs["description"]
    train = history.train_elbo.attrs["description"]
    assert "log p(x, y) on the labelled points and log p(x) on the others" in train
    run = pipeline.load_run(m2_run, history=False)
    bounds = bounds_of_training_elbos(run.vae)
    assert bounds["test_elbo"] == "log p(x, y)"
    assert bounds["val_elbo"] == bounds["train_elbo"]  # validation points come from the partly labelled split
    from ppl_vae.models.cvae import ConditionalVAE
    from ppl_vae.models.vae import VAE

    assert set(bounds_of_training_elbos(VAE).values()) == {"log p(x)"}
    assert set(bounds_of_training_elbos(ConditionalVAE).values()) == {"log p(x | y)"}
