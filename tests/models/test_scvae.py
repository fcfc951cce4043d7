"""scvae (Kim et al. 2017): Fire modules, shapes, the plain baseline, planted anomalies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ppl_vae.analysis.anomaly import anomaly_scores, detection_metrics, num_parameters, size_and_latency
from ppl_vae.config import TrainConfig
from ppl_vae.data.datasets import Dataset
from ppl_vae.errors import DataError
from ppl_vae.inference.importance import iw_log_px
from ppl_vae.inference.training import train
from ppl_vae.models import build_vae
from ppl_vae.models.scvae import Fire

# Training in these tests runs several times faster on one thread on a shared machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def planted_sensor_series(num_steps: int = 1600, seed: int = 0, anomaly_from: int = 0, num_anomalies: int = 12):
    """Three phase-shifted sines (period 16) with noise; after ``anomaly_from``, ``num_anomalies`` segments of
    16 steps are replaced by a sine of period 5 with the same amplitude (anomalies that only the
    shape, not the range of values, gives away). Returns (values (T, 3), labels (T,))."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_steps)[:, None]
    phase = np.array([0.0, 1.0, 2.0])
    values = np.sin(2 * np.pi * t / 16 + phase) + 0.05 * rng.standard_normal((num_steps, 3))
    labels = np.zeros(num_steps, dtype=np.int64)
    if anomaly_from:
        starts = rng.choice(np.arange(anomaly_from, num_steps - 16, 16), size=num_anomalies, replace=False)
        for s in starts:
            values[s : s + 16] = np.sin(2 * np.pi * t[s : s + 16] / 5 + phase)
            labels[s : s + 16] = 1
    return values, labels


def test_fire_module_concatenates_1x1_and_3x3_expands():
    fire = Fire(16, 4, 8, spatial_dims=2)
    out = fire(torch.randn(2, 16, 7, 7))
    assert out.shape == (2, 16, 7, 7)
    # squeeze 16*4+4, expand1 4*8+8, expand3 4*8*9+8
    assert num_parameters(fire) == (16 * 4 + 4) + (4 * 8 + 8) + (4 * 8 * 9 + 8)
    fire1d = Fire(5, 2, 3, spatial_dims=1)
    assert fire1d(torch.randn(4, 5, 12)).shape == (4, 6, 12)


@pytest.mark.parametrize("event_shape,likelihood", [((1, 28, 28), "bernoulli"), ((3, 16), "gaussian")])
@pytest.mark.parametrize("model", ["scvae", "scvae_plain"])
def test_shapes_with_particle_dims_and_finite_iw(model, event_shape, likelihood):
    vae = build_vae(model, event_shape, likelihood=likelihood, latent_dim=4, hidden_dim=8)
    x = torch.rand(5, *event_shape)
    if likelihood == "bernoulli":
        x = torch.bernoulli(x)
    loc, scale = vae.encode(torch.stack([x, x]))  # a particle dim in front
    assert loc.shape == scale.shape == (2, 5, 4)
    (logits,) = vae.decoder(torch.randn(3, 5, 4))[:1]
    assert logits.shape == (3, 5, *event_shape)
    assert vae.sample(7).shape == (7, *event_shape)
    log_px = iw_log_px(vae.model, vae.guide, x, num_samples=4)
    assert log_px.shape == (5,) and torch.isfinite(log_px).all()


def test_likelihood_support_is_checked():
    vae = build_vae("scvae", (1, 28, 28), likelihood="bernoulli", hidden_dim=8)
    with pytest.raises(DataError, match="needs data in \\[0, 1\\]"):
        vae.likelihood.check_support(torch.full((2, 1, 28, 28), 2.0))


@pytest.mark.parametrize("shape", [(1, 30, 30), (1, 28, 26), (3, 18), (1, 2, 28, 28), (28,)])
def test_wrong_sizes_are_one_line_value_errors(shape):
    with pytest.raises(ValueError, match="scvae") as info:
        build_vae("scvae", shape)
    assert "\n" not in str(info.value)


def test_fire_modules_cut_parameters_against_the_plain_conv_vae():
    fire = build_vae("scvae", (1, 28, 28), likelihood="bernoulli")
    plain = build_vae("scvae_plain", (1, 28, 28), likelihood="bernoulli")
    # same layers except Fire <-> 3x3 conv, so the same depth and the same layer shapes
    assert len([m for m in fire.modules() if isinstance(m, Fire)]) == 8
    assert num_parameters(fire) < 0.5 * num_parameters(plain)
    table = size_and_latency({"scvae": fire, "plain": plain}, torch.rand(2, 1, 28, 28), repeats=3, warmup=1)
    assert list(table["model"].values) == ["scvae", "plain"]
    assert (table["latency_median_s"] > 0).all()
    assert int(table["num_parameters"].sel(model="plain")) == num_parameters(plain)


def test_scvae_separates_planted_anomalies_in_sensor_windows():
    from ppl_vae.data.timeseries import sliding_windows

    values, labels = planted_sensor_series(anomaly_from=800)
    train_x = torch.from_numpy(sliding_windows(values[:800], 16, 4))
    test_x = torch.from_numpy(sliding_windows(values[800:], 16, 4))
    test_y = torch.from_numpy(sliding_windows(labels[800:, None].astype(np.float32), 16, 4).max(axis=(1, 2)))
    data = Dataset("planted", train_x, test_x)
    vae = build_vae("scvae", (3, 16), latent_dim=4, hidden_dim=8)
    train(vae, data, TrainConfig(epochs=25, batch_size=32, lr=1e-3, device="cpu"), progress=False)
    for score in ("neg_elbo", "reconstruction_probability"):
        scores = anomaly_scores(vae, test_x, score=score, num_samples=4)
        metrics = detection_metrics(scores, test_y)
        assert metrics["auroc"] > 0.9, (score, metrics)
        # a random ranking has AUPRC = share of anomalies
        assert metrics["auprc"] > 2 * float(test_y.float().mean())


def test_detection_metrics_known_answers_and_bad_labels():
    m = detection_metrics(torch.tensor([0.1, 0.2, 0.9, 0.8]), torch.tensor([0, 0, 1, 1]))
    assert m == {"auroc": 1.0, "auprc": 1.0}
    m = detection_metrics(torch.tensor([0.9, 0.1, 0.2, 0.8]), torch.tensor([0, 0, 1, 1]))
    assert m["auroc"] == pytest.approx(0.5)  # pairs (1,0) ranked right: (0.2>0.1, 0.8>0.1) of 4
    with pytest.raises(ValueError, match="both normal"):
        detection_metrics(torch.tensor([0.1, 0.2]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="normal_class"):
        detection_metrics(torch.tensor([0.1, 0.2]), torch.tensor([0, 3]))
