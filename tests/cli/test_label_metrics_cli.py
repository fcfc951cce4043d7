"""`ppl-vae fit` records and prints the label metrics a model declares: M2's test error of
q(y|x), a GMVAE's cluster accuracy and clusters used; models without them (or data without
labels) have none, and the training curves still draw."""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import pytest
import xarray as xr

from ppl_vae import pipeline
from tests.conftest import invoke

SMALL = ["--hidden-dim", "16", "--latent-dim", "2", "--train-size", "200", "--batch-size", "100", "--no-progress"]
LABEL_VARS = {"test_error", "cluster_accuracy", "clusters_used"}


def _history(run_dir):
    with xr.open_dataset(run_dir / "history.nc") as h:
        return h.load()


def test_m2_records_and_prints_its_test_error(tmp_path):
    out = tmp_path / "m2"
    result = invoke("fit", "--model", "m2", "--labels", "20", "--epochs", "1", "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    history = _history(out)
    assert "test_error" in history and "argmax_y q(y|x)" in history["test_error"].attrs["description"]
    assert not {"cluster_accuracy", "clusters_used"} & set(history.data_vars)
    recorded = float(history["test_error"].values[-1])

    from ppl_vae.analysis.semisupervised import classification_error

    run = pipeline.load_run(out)
    data = pipeline.load_data(run.config)
    error, se = classification_error(run.vae, data.test, data.test_labels)  # computed again, from the saved weights
    assert recorded == error
    n = data.test.shape[0]
    line = next(li for li in result.output.splitlines() if "test error of q(y|x)" in li)
    assert f"test error of q(y|x) {error:.4f} ± {se:.4f} (argmax, n = {n} test images;" in line
    assert se == pytest.approx(math.sqrt(error * (1 - error) / n))

    # a resumed epoch appends its own value; the curves ignore the new column
    result = invoke("fit", "--resume", out, "--epochs", "2", "--no-progress")
    assert result.exit_code == 0, result.output
    history = _history(out)
    assert history["test_error"].sizes["epoch"] == 2 and history["test_error"].values[0] == recorded
    assert np.isfinite(history["test_error"].values).all() and "test error of q(y|x)" in result.output

    from ppl_vae.analysis.plots import plot_training_curves

    figure = plot_training_curves(history)
    assert {t.get_text() for t in figure.axes[0].get_legend().get_texts()} >= {"train", "test"}


def test_gmvae_records_cluster_accuracy_against_a_hand_computed_mapping(tmp_path):
    out = tmp_path / "gm"
    args = ["--prior", "mixture_of_gaussians", "--num-components", "4", "--epochs", "1", "--out", out]
    result = invoke("fit", "--model", "gmvae", *args, *SMALL)
    assert result.exit_code == 0, result.output
    history = _history(out)
    assert {"cluster_accuracy", "clusters_used"} <= set(history.data_vars) and "test_error" not in history

    run = pipeline.load_run(out)
    data = pipeline.load_data(run.config)
    clusters = run.vae.cluster(data.test).tolist()
    labels = data.test_labels.tolist()
    right = 0
    for c in set(clusters):  # each cluster's most frequent label (the smaller one on a tie), by hand
        members = Counter(label for k, label in zip(clusters, labels) if k == c)
        top = max(members.values())
        right += members[min(label for label, count in members.items() if count == top)]
    assert float(history["cluster_accuracy"].values[-1]) == pytest.approx(right / len(labels), abs=1e-12)
    assert int(history["clusters_used"].values[-1]) == len(set(clusters))
    assert re.search(r"cluster accuracy 0\.\d{4} ± 0\.\d{4} \(argmax_c q\(c\|x\)", result.output)
    assert f"clusters used: {len(set(clusters))} of 4 (" in result.output


def test_models_and_data_without_labels_have_no_label_metrics(tmp_path):
    result = invoke("fit", "--epochs", "1", "--out", tmp_path / "plain", *SMALL)
    assert result.exit_code == 0, result.output
    assert not LABEL_VARS & set(_history(tmp_path / "plain").data_vars)
    assert "test error" not in result.output and "cluster" not in result.output

    path = tmp_path / "x.npy"  # a GMVAE on data with no labels: nothing to score its clusters against
    np.save(path, (np.random.default_rng(0).random((60, 1, 4, 4)) < 0.5).astype(np.float32))
    result = invoke(
        "fit", "--model", "gmvae", "--dataset", path, "--hidden-dim", "8", "--latent-dim", "2", "--epochs", "1",
        "--batch-size", "20", "--out", tmp_path / "gm", "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not LABEL_VARS & set(_history(tmp_path / "gm").data_vars) and "cluster" not in result.output
