"""Fixtures of the CLI tests."""

from __future__ import annotations

import pytest

from ppl_vae import pipeline
from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig


def tiny_run(tmp_path_factory, model: str = "gaussian_mlp", epochs: int = 2):
    """A tiny ``model`` run on the embedded digits (``epochs`` epochs on 200 training images)."""
    out = tmp_path_factory.mktemp("runs") / model
    config = RunConfig(
        model=ModelConfig(model=model, latent_dim=2, hidden_dim=16),
        data=DataConfig(dataset="digits", train_size=200),
        train=TrainConfig(epochs=epochs, batch_size=50, device="cpu"),
    )
    pipeline.fit(config, out, progress=False)
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny gaussian_mlp run on the embedded digits (2 epochs on 200 training images)."""
    return tiny_run(tmp_path_factory)
