"""The CUDA path: every tensor and module on the GPU. Skipped where no GPU is present."""

from __future__ import annotations

import ppl_vae
from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from tests.conftest import requires_cuda


@requires_cuda
def test_fit_on_cuda_keeps_everything_on_the_device(tmp_path):
    config = RunConfig(
        model=ModelConfig(model="bernoulli_mlp", latent_dim=4, hidden_dim=32),
        data=DataConfig(train_size=400),
        train=TrainConfig(epochs=2, device="cuda"),
    )
    run = ppl_vae.fit(config, tmp_path / "run", progress=False)
    assert all(p.is_cuda for p in run.vae.parameters())
    assert all(b.is_cuda for b in run.vae.buffers())
    assert run.history.test_elbo[-1] > run.history.test_elbo[0]
    loaded = ppl_vae.load_run(tmp_path / "run", device="cuda")
    assert next(loaded.vae.parameters()).is_cuda
