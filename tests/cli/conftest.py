"""Fixtures of the CLI tests."""

from __future__ import annotations

import pytest

from ppl_vae import pipeline
from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny gaussian_mlp run on the embedded digits (2 epochs on 200 training images)."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    config = RunConfig(
        model=ModelConfig(model="gaussian_mlp", latent_dim=2, hidden_dim=16),
        data=DataConfig(dataset="digits", train_size=200),
        train=TrainConfig(epochs=2, batch_size=50, device="cpu"),
    )
    pipeline.fit(config, out, progress=False)
    return out
