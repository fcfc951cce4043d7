"""The report layer: eval mode for Python callers, one selection rule for every split, warnings."""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch
import xarray as xr
from torch import nn

from ppl_vae import pipeline
from ppl_vae.analysis.diagnostics import collapse_diagnostics
from ppl_vae.analysis.gaps import gap_decomposition
from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ppl_vae.inference.modes import eval_mode
from ppl_vae.models.linear_gaussian import LinearGaussianVAE
from ppl_vae.reports.compare import estimate_warnings, select_datapoints

pytestmark = pytest.mark.usefixtures("one_thread")  # small loops: one thread is several times faster


def _dropout_model():
    torch.manual_seed(3)
    model = LinearGaussianVAE(x_dim=5, latent_dim=2, sigma=0.5)
    model.encoder.linear = nn.Sequential(nn.Dropout(0.5), model.encoder.linear)  # differs in training mode
    return model, torch.randn(6, 5)


@pytest.mark.slow
def test_analysis_scores_a_model_in_training_mode_as_in_eval_mode():
    model, x = _dropout_model()
    with torch.no_grad():
        model.train()
        assert not torch.equal(model.encoder(x)[0], model.encoder(x)[0])  # dropout is live
    options = dict(num_samples=50, progress=False, mean_field_options=dict(max_steps=20, polish_steps=20))
    out = {}
    for mode in ("train", "eval"):
        model.train(mode == "train")
        pyro.set_rng_seed(0)
        out[mode] = gap_decomposition(model.model, model.guide, x, **options)
        assert model.training == (mode == "train") and model.encoder.linear[0].training == (mode == "train")
    xr.testing.assert_allclose(out["train"], out["eval"])
    model.train()
    pyro.set_rng_seed(0)
    a = collapse_diagnostics(model.model, model.guide, x)
    model.eval()
    xr.testing.assert_allclose(a, collapse_diagnostics(model.model, model.guide, x))


def test_eval_mode_restores_each_submodule_and_survives_errors():
    model, _ = _dropout_model()
    model.train()
    model.decoder.eval()  # a mixed state must come back as it was
    with pytest.raises(RuntimeError):
        with eval_mode(model.model, model.guide):
            assert not any(m.training for m in model.modules())
            raise RuntimeError("boom")
    assert model.training and model.encoder.training and not model.decoder.training


@pytest.fixture(scope="module")
def dynamic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "dyn"
    config = RunConfig(
        model=ModelConfig(model="bernoulli_mlp", latent_dim=2, hidden_dim=8),
        data=DataConfig(dataset="digits", train_size=120, binarize="dynamic"),
        train=TrainConfig(epochs=1, batch_size=60, device="cpu"),
    )
    pipeline.fit(config, out, progress=False)
    return pipeline.load_run(out)


def test_every_split_is_scored_as_binary_data_under_dynamic_binarization(dynamic_run):
    train = select_datapoints(dynamic_run, "train", 40, seed=3)
    test = select_datapoints(dynamic_run, "test", 40, seed=3)
    raw = pipeline.load_data(dynamic_run.config).train[torch.as_tensor(train.index)]
    assert ((raw > 0) & (raw < 1)).any()  # the stored train split holds grey levels ...
    for sel in (train, test):  # ... but what is scored is binary, for both splits
        assert set(torch.unique(sel.x).tolist()) <= {0.0, 1.0}
    assert "Bernoulli" in train.preprocessing and "seed 3" in train.preprocessing
    # the draw is x ~ Bernoulli(grey level): fixed by the seed, and where the grey level is 0 or 1, equal to it
    again = select_datapoints(dynamic_run, "train", 40, seed=3)
    assert torch.equal(again.x, train.x)
    assert torch.equal(train.x[raw == 1], raw[raw == 1]) and torch.equal(train.x[raw == 0], raw[raw == 0])


def _gaps_for_warnings(converged, ess, khat, k=100):
    return xr.Dataset(
        {
            "meanfield_converged": ("datapoint", np.asarray(converged)),
            "ess_mixture": ("datapoint", np.asarray(ess, float)),
            "khat_mixture": ("datapoint", np.asarray(khat, float)),
        },
        attrs={"num_samples": k},
    )


def test_warnings_name_the_weak_estimates_and_what_to_do():
    n = 40
    fine = _gaps_for_warnings([True] * n, [150.0] * n, [0.2] * n)
    assert estimate_warnings(fine) == []
    weak = _gaps_for_warnings([False] + [True] * (n - 1), [1.5, 1.2] + [150.0] * (n - 2), [0.9] * 3 + [0.2] * (n - 3))
    text = " | ".join(estimate_warnings(weak))
    assert "did not converge for 1 of 40" in text and "--mf-steps" in text
    assert "effective sample size: for 2 of 40" in text and "--num-samples" in text
    assert "k̂ > 0.7 for 3 of 40" in text and "AIS" in text
    assert "Only 5 datapoints" in " ".join(estimate_warnings(_gaps_for_warnings([True] * 5, [150.0] * 5, [0.1] * 5)))


def test_profile_stages_record_wall_time_kernel_time_and_page_faults():
    """``--profile``'s stages: wall seconds, and the system time and minor page faults of the
    process while each ran. 64 MiB of fresh memory (above glibc's largest mmap threshold, so
    mapped from the kernel) written in a stage must show at least one fault per page: 32 if
    the kernel backs it with 2 MiB huge pages, 16,384 with 4 KiB ones."""
    resource = pytest.importorskip("resource")
    from ppl_vae.reports.common import Stages

    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt > 0
    stages = Stages({"import": 0.5})
    with stages.stage("scoring"):
        block = torch.ones(16 * 2**20)  # 64 MiB, every page written
    with stages.stage("scoring"):  # a stage entered twice adds up
        pass
    del block
    assert stages.faults["scoring"] >= 32 and stages.system["scoring"] >= 0.0
    assert stages.seconds["scoring"] > 0 and stages.scoring_began is not None
    lines = stages.lines()
    assert lines[0].split() == ["import", "0.50", "s"]  # measured before Stages existed: wall time only
    assert lines[1].startswith("scoring") and f"{stages.faults['scoring']:,} page faults" in lines[1]
    assert lines[2].startswith("total") and lines[3].startswith("scoring began")
