"""docs/extending.md's objective and method, run as written: one class plus its registration each,
options declared once on the constructor, and everything else (the step, the checks, the run
record) the library's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import ppl_vae
from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ppl_vae.errors import ConfigError
from ppl_vae.inference.training import METHODS, OBJECTIVES, make_stepper
from ppl_vae.models import build_vae

DOC = Path(__file__).resolve().parents[2] / "docs" / "extending.md"


@pytest.fixture
def extended(monkeypatch):
    """The doc's python blocks executed, their registrations undone after the test."""
    for registry in (METHODS, OBJECTIVES):
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
        monkeypatch.setattr(registry, "_docs", dict(registry._docs))
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 2
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), {"__name__": "extending_doc"})
    return OBJECTIVES.get("tempered_elbo"), METHODS.get("svi_k_steps")


def _config(tmp_path, **train):
    return RunConfig(
        model=ModelConfig(model="bernoulli_mlp", latent_dim=2, hidden_dim=8),
        data=DataConfig(dataset="digits", binarize="threshold", train_size=50),
        train=TrainConfig(epochs=1, batch_size=25, device="cpu", train_eval_size=20, **train),
    )


def test_the_doc_objective_trains_with_its_option_recorded_and_resumes(tmp_path, extended, one_thread):
    run = ppl_vae.fit(
        _config(tmp_path, objective="tempered_elbo", objective_options={"temperature": 2.0}),
        tmp_path / "run",
        progress=False,
    )
    assert run.config.train.objective_options == {"temperature": 2.0}
    assert ppl_vae.resume(run.run_dir, epochs=2, progress=False).epochs_done == 2


def test_the_doc_objective_at_temperature_one_is_the_elbo(extended):
    """Its loss equals the fused ELBO's at T = 1 (same draw), and scales the likelihood by 1/T."""
    from ppl_vae.inference.fused import fused_elbo_loss

    vae = build_vae("bernoulli_mlp", (1, 8, 8), latent_dim=2, hidden_dim=8)
    x = (torch.rand(6, 1, 8, 8) < 0.5).float()
    stepper = make_stepper(vae, TrainConfig(objective="tempered_elbo"))
    torch.manual_seed(0)
    ours, terms = stepper.loss(x, num_data=6)
    torch.manual_seed(0)
    assert torch.allclose(ours, fused_elbo_loss(vae, x, num_data=6), rtol=1e-6)
    hot = make_stepper(vae, TrainConfig(objective="tempered_elbo", objective_options={"temperature": 2.0}))
    torch.manual_seed(0)
    loss, t = hot.loss(x, num_data=6)
    assert torch.allclose(loss, -(t["log_lik"] / 2 - t["kl"]).sum(), rtol=1e-6)


@pytest.mark.parametrize(
    "train,message",
    [
        ({"objective": "tempered_elbo", "objective_options": {"temperature": 0}}, "must be a finite number > 0"),
        ({"objective": "tempered_elbo", "objective_options": {"temperature": "abc"}}, "got 'abc'"),
        (
            {"objective": "tempered_elbo", "objective_options": {"temp": 2}},
            "has no option 'temp'; it takes temperature",
        ),
        (
            {"method": "svi_k_steps", "method_options": {"num_updates": 0}},
            "option 'num_updates' must be an integer >= 1",
        ),
        ({"method_options": {"num_updates": 2}}, "method 'svi' has no option 'num_updates'; it takes no options"),
        ({"objective_options": {"temperature": 2}}, "train.objective is 'elbo'"),
        (
            {"method": "svi_k_steps", "num_particles": 1, "elbo": "mean_field"},
            "train.elbo does not apply to method 'svi_k_steps'",
        ),
    ],
)
def test_bad_options_are_refused_before_any_folder(tmp_path, extended, train, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ppl_vae.fit(_config(tmp_path, **train), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_the_doc_method_takes_its_updates_in_one_step(extended, one_thread):
    vae = build_vae("bernoulli_mlp", (1, 8, 8), latent_dim=2, hidden_dim=8)
    x = (torch.rand(6, 1, 8, 8) < 0.5).float()
    stepper = make_stepper(vae, TrainConfig(method="svi_k_steps", method_options={"num_updates": 3}))
    steps = []
    stepper.optimizers["svi"].register_step_post_hook(lambda *a: steps.append(1))
    stepper.step(x, num_data=6)
    assert len(steps) == 3 and stepper.step_count == 1


def test_mcem_options_are_reachable_and_checked(tmp_path, one_thread):
    """MCEM's HMC settings were keyword arguments only Python could pass; now method options."""
    vae = build_vae("bernoulli_mlp", (1, 8, 8), latent_dim=2, hidden_dim=8)
    stepper = make_stepper(vae, TrainConfig(method="mcem", method_options={"num_leapfrog_steps": 3, "warmup_steps": 2}))
    assert (stepper.num_leapfrog_steps, stepper.warmup_steps) == (3, 2)
    with pytest.raises(ConfigError, match=r"train.method_options: method 'mcem': option 'target_accept_prob'"):
        make_stepper(vae, TrainConfig(method="mcem", method_options={"target_accept_prob": 1.5}))


def test_a_received_run_of_a_plugin_objective_loads_when_trusted_and_names_the_flag_when_not(
    tmp_path, monkeypatch, one_thread
):
    """config.json's method and objective were checked against the registries before the run's
    plugins were imported, so `--trust-plugins evaluate` (and `fit --resume`) of a run whose plugin
    registers its objective failed with 'must be one of ...', and without the flag the message
    naming --plugin never came. Checked as a new process sees it: plugin not imported yet."""
    import sys

    from ppl_vae import plugins
    from ppl_vae.errors import PplVaeError

    for registry in (METHODS, OBJECTIVES):
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
        monkeypatch.setattr(registry, "_docs", dict(registry._docs))
    monkeypatch.setattr(plugins, "_LOADED", dict(plugins._LOADED))
    block = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)[0]  # the objective's
    (tmp_path / "doc_objective_plugin.py").write_text(block)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = _config(tmp_path, objective="tempered_elbo", objective_options={"temperature": 2.0})
    config.plugins = ["doc_objective_plugin"]
    run_dir = ppl_vae.fit(config, tmp_path / "run", progress=False).run_dir

    def as_a_new_process():
        OBJECTIVES._entries.pop("tempered_elbo", None)
        OBJECTIVES._docs.pop("tempered_elbo", None)
        sys.modules.pop("doc_objective_plugin", None)
        plugins._LOADED.pop("doc_objective_plugin", None)

    as_a_new_process()
    with pytest.raises(PplVaeError, match="names plugin 'doc_objective_plugin'.*--plugin doc_objective_plugin"):
        ppl_vae.load_run(run_dir)
    assert ppl_vae.load_run(run_dir, trust_plugins=True).config.train.objective == "tempered_elbo"
    as_a_new_process()
    assert ppl_vae.resume(run_dir, epochs=2, trust_plugins=True, progress=False).epochs_done == 2
