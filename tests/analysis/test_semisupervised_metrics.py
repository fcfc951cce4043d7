"""The label metrics a model declares (M2's test error, a GMVAE's cluster accuracy and clusters
used), checked on hand-computed examples, and the training loop's generic per-epoch hook."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ppl_vae.analysis.semisupervised import (
    LABEL_METRICS,
    cluster_accuracy,
    clusters_used,
    describe_label_metrics,
    epoch_label_metrics,
    label_metrics,
    majority_mapping,
)
from ppl_vae.models import MODELS


def test_cluster_accuracy_maps_each_cluster_to_its_majority_label():
    # cluster 0 holds labels 3, 3, 1 -> 3 (2 right); cluster 1 holds 2, 2 -> 2 (2 right);
    # cluster 2 holds 0 -> 0 (1 right); cluster 3 is empty (-1): 5 of 6 right
    clusters = np.array([0, 0, 0, 1, 1, 2])
    labels = np.array([3, 3, 1, 2, 2, 0])
    assert majority_mapping(clusters, labels, 4).tolist() == [3, 2, 0, -1]
    assert cluster_accuracy(clusters, labels, 4) == pytest.approx(5 / 6)
    assert clusters_used(clusters) == 3
    # two clusters mapped to one label is allowed (many-to-one): 1, 1 | 1, 0 -> both map to 1
    assert cluster_accuracy(np.array([0, 0, 1, 1]), np.array([1, 1, 1, 0]), 2) == pytest.approx(3 / 4)


class _Fixed(nn.Module):
    """A stand-in model whose q(c | x) puts its mass on the value x[:, 0] says."""

    def __init__(self, num_values: int, declared):
        super().__init__()
        self.num_values, self.label_metrics = num_values, tuple(declared)
        self.w = nn.Parameter(torch.zeros(()))

    def value_logits(self, x):
        return torch.log_softmax(10.0 * nn.functional.one_hot(x[:, 0].long(), self.num_values).float(), -1)


def test_label_metrics_are_those_declared_computed_from_argmax_q():
    x = torch.tensor([[0.0], [0.0], [1.0], [2.0], [2.0]])
    labels = torch.tensor([0, 1, 1, 2, 0])
    m2_like = _Fixed(3, ["test_error"])
    assert label_metrics(m2_like, x, labels) == {"test_error": pytest.approx(2 / 5)}
    gm_like = _Fixed(4, ["cluster_accuracy", "clusters_used"])
    # clusters 0: labels 0, 1 -> 0 (1 right); 1: 1 -> 1 (1 right); 2: 2, 0 -> 0 (tie: the smaller label, 1 right)
    assert label_metrics(gm_like, x, labels) == {"cluster_accuracy": pytest.approx(3 / 5), "clusters_used": 3.0}
    assert label_metrics(_Fixed(3, []), x, labels) == {}
    lines = describe_label_metrics(gm_like, {"cluster_accuracy": 0.6, "clusters_used": 3.0, "test_elbo": -1.0}, 5)
    se = math.sqrt(0.6 * 0.4 / 5)
    assert lines[0].startswith(f"cluster accuracy 0.6000 ± {se:.4f} (") and "n = 5 test images" in lines[0]
    assert lines[1].startswith("clusters used: 3 of 4 (")
    assert describe_label_metrics(m2_like, {"test_error": math.nan}, 5) == []  # not computed: not said


def test_epoch_metrics_need_a_declaration_and_labels():
    x = torch.zeros(4, 1)
    assert epoch_label_metrics(_Fixed(3, []), x, torch.zeros(4, dtype=torch.long)) is None
    assert epoch_label_metrics(_Fixed(3, ["test_error"]), x, None) is None
    assert epoch_label_metrics(_Fixed(3, ["test_error"]), x, torch.tensor([0, -1, 0, 0])) is None  # not class indices
    metrics = epoch_label_metrics(_Fixed(3, ["test_error"]), x, torch.tensor([0, 1, 0, 0]))
    assert metrics is not None and set(metrics.descriptions) == {"test_error"}
    assert metrics.compute(_Fixed(3, ["test_error"])) == {"test_error": pytest.approx(1 / 4)}


def test_every_declared_metric_is_registered():
    """The built-in models' declarations name registered metrics (a typo would fail at the first epoch)."""
    from ppl_vae.models.discrete import GaussianMixtureVAE, SemiSupervisedVAE
    from ppl_vae.models.vae import VAE

    assert SemiSupervisedVAE.label_metrics == ("test_error",) and VAE.label_metrics == ()
    for cls in (SemiSupervisedVAE, GaussianMixtureVAE):
        for name in cls.label_metrics:
            assert name in LABEL_METRICS
    assert MODELS.get("m2").uses_labels and not MODELS.get("gmvae").uses_labels


def test_the_training_loop_records_and_describes_epoch_metrics():
    """train(metrics=...) is generic: it records what compute returns, in eval mode, with descriptions."""
    from ppl_vae.config import TrainConfig
    from ppl_vae.data.datasets import Dataset
    from ppl_vae.inference.training import EpochMetrics, train
    from ppl_vae.models.zoo import build_vae

    gen = torch.Generator().manual_seed(0)
    data = Dataset("toy", torch.rand(20, 4, generator=gen), torch.rand(10, 4, generator=gen))
    vae = build_vae("gaussian_mlp", (4,), latent_dim=2, hidden_dim=8)
    modes = []

    def compute(model):
        modes.append(model.training)
        return {"answer": 42.0}

    config = TrainConfig(epochs=2, batch_size=10, device="cpu")
    history = train(vae, data, config, progress=False, metrics=EpochMetrics(compute, {"answer": "the answer"}))
    assert history["answer"].values.tolist() == [42.0, 42.0] and history["answer"].attrs["description"] == "the answer"
    assert modes == [False, False] and vae.training
    silent = train(vae, data, config, progress=False, evaluate=False, metrics=EpochMetrics(compute, {"answer": "x"}))
    assert np.isnan(silent["answer"].values).all() and len(modes) == 2
