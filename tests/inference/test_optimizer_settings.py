"""Adam's (and Adamax's) eps and betas and weight decay, declared once, reach every optimizer a method builds."""

from __future__ import annotations

import pytest
import torch

from ppl_vae.config import ADAM_FAMILY, TrainConfig
from ppl_vae.errors import ConfigError
from ppl_vae.inference.training import METHODS, OPTIMIZERS, make_stepper, validate_train_config
from ppl_vae.models import build_vae


@pytest.mark.parametrize("optimizer_name", ADAM_FAMILY)
@pytest.mark.parametrize("method", METHODS.names())
def test_every_optimizer_of_every_method_takes_the_settings(method, optimizer_name):
    vae = build_vae("bernoulli_mlp", (1, 8, 8), latent_dim=2, hidden_dim=8)
    config = TrainConfig(
        method=method, optimizer=optimizer_name, adam_eps=1e-4, adam_beta1=0.5, adam_beta2=0.99, weight_decay=1e-3
    )
    stepper = make_stepper(vae, config)
    expected = {"adam": torch.optim.Adam, "adamax": torch.optim.Adamax}[optimizer_name]
    for optimizer in stepper.optimizers.values():
        assert isinstance(optimizer, expected)
        for group in optimizer.param_groups:
            assert group["eps"] == 1e-4 and tuple(group["betas"]) == (0.5, 0.99) and group["weight_decay"] == 1e-3
    sgd = make_stepper(vae, TrainConfig(method=method, optimizer="sgd", weight_decay=1e-3))
    assert all(g["weight_decay"] == 1e-3 for o in sgd.optimizers.values() for g in o.param_groups)


def test_defaults_are_torchs_so_training_is_unchanged_and_eps_moves_it():
    """Default settings give torch's Adam bit for bit; Burda et al.'s eps = 1e-4 gives other weights."""
    x = (torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) < 0.5).float()

    def trained(**settings):
        torch.manual_seed(1)
        vae = build_vae("bernoulli_mlp", (1, 8, 8), latent_dim=2, hidden_dim=8)
        stepper = make_stepper(vae, TrainConfig(**settings))
        for _ in range(5):
            stepper.step(x, num_data=16)
        return torch.cat([p.detach().flatten() for p in vae.parameters()])

    torch.manual_seed(1)
    reference = build_vae("bernoulli_mlp", (1, 8, 8), latent_dim=2, hidden_dim=8)
    stepper = make_stepper(reference, TrainConfig())
    stepper.optimizers["svi"] = torch.optim.Adam(reference.parameters(), lr=1e-3, fused=True)
    for _ in range(5):
        stepper.step(x, num_data=16)
    expected = torch.cat([p.detach().flatten() for p in reference.parameters()])
    assert torch.equal(trained(), expected)
    assert not torch.allclose(trained(adam_eps=1e-4), expected, rtol=0, atol=1e-7)


def test_the_adam_family_is_the_registered_optimizers_that_take_eps_and_betas():
    """ADAM_FAMILY (config.py) is declared by hand because the config does not import torch: it must
    be exactly the registered optimizers whose constructor takes betas, and every registered
    optimizer is named in --optimizer's help and the training docs."""
    import inspect
    import re
    from pathlib import Path

    from ppl_vae.config import declarations

    takes_betas = {n for n in OPTIMIZERS.names() if "betas" in inspect.signature(OPTIMIZERS.get(n)).parameters}
    assert takes_betas == set(ADAM_FAMILY)
    help_text = next(d.option.help for d in declarations() if d.path == "train.optimizer")
    docs = (Path(__file__).parents[2] / "docs" / "training.md").read_text()
    row = next(line for line in docs.splitlines() if line.startswith("| `--optimizer"))
    for name in OPTIMIZERS.names():
        word = re.compile(rf"\b{name}\b")
        assert word.search(help_text) and word.search(row), name


def test_adamax_steps_as_torchs_with_the_settings_and_a_resume_continues_exactly(tmp_path, one_thread):
    """Adamax with Burda-style settings: one step equals torch.optim.Adamax's bit for bit; the run
    records the settings and the optimizer, and 2 epochs + a resume to 4 equal 4 straight ones."""
    import json

    import ppl_vae
    from ppl_vae import runs
    from ppl_vae.config import DataConfig, ModelConfig, RunConfig

    settings = dict(optimizer="adamax", adam_eps=1e-4, adam_beta1=0.5, adam_beta2=0.99, weight_decay=1e-3)
    x = (torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    weights = []
    for reference in (False, True):
        torch.manual_seed(1)
        vae = build_vae("bernoulli_mlp", (1, 8, 8), latent_dim=2, hidden_dim=8)
        stepper = make_stepper(vae, TrainConfig(**settings))
        if reference:
            stepper.optimizers["svi"] = torch.optim.Adamax(
                vae.parameters(), lr=1e-3, eps=1e-4, betas=(0.5, 0.99), weight_decay=1e-3
            )
        for _ in range(3):
            stepper.step(x, num_data=16)
        weights.append(torch.cat([p.detach().flatten() for p in vae.parameters()]))
    assert torch.equal(weights[0], weights[1])

    def config(epochs):
        return RunConfig(
            model=ModelConfig(model="bernoulli_mlp", latent_dim=2, hidden_dim=8),
            data=DataConfig(dataset="digits", binarize="threshold", train_size=50),
            train=TrainConfig(epochs=epochs, batch_size=25, device="cpu", train_eval_size=10, **settings),
        )

    straight = ppl_vae.fit(config(4), tmp_path / "straight", progress=False)
    ppl_vae.fit(config(2), tmp_path / "split", progress=False)
    recorded = json.loads((tmp_path / "split" / "config.json").read_text())["train"]
    assert {k: recorded[k] for k in settings} == settings
    assert runs.read_checkpoint(tmp_path / "split")[1]["optimizers"]["svi"]["type"] == "Adamax"
    resumed = ppl_vae.resume(tmp_path / "split", epochs=4, progress=False)
    for (name, a), (_, b) in zip(straight.vae.state_dict().items(), resumed.vae.state_dict().items()):
        assert torch.equal(a, b), name
    assert resumed.history.test_elbo.values.tolist() == straight.history.test_elbo.values.tolist()


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"adam_eps": 0.0}, "train.adam_eps must be a positive number"),
        ({"adam_beta2": 1.0}, "train.adam_beta2 must be"),
        ({"weight_decay": -1.0}, "train.weight_decay must be a finite number >= 0"),
        (
            {"optimizer": "sgd", "adam_eps": 1e-4},
            "train.adam_eps applies to optimizer 'adam' or 'adamax' only; train.optimizer is 'sgd'",
        ),
        (
            {"optimizer": "adagrad", "adam_beta1": 0.5},
            "train.adam_beta1 applies to optimizer 'adam' or 'adamax' only; train.optimizer is 'adagrad'",
        ),
    ],
)
def test_bad_or_inapplicable_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        validate_train_config(TrainConfig(**settings))


def test_burdas_schedule_runs_3_to_the_i_epochs_per_stage_and_resumes(tmp_path, one_thread):
    """Burda et al. (2015): 3^i epochs at 1e-3 * 10^(-i/7); a resumed run continues the stages."""
    import ppl_vae
    from ppl_vae.config import DataConfig, ModelConfig, RunConfig

    def config(epochs):
        return RunConfig(
            model=ModelConfig(model="bernoulli_mlp", latent_dim=2, hidden_dim=8),
            data=DataConfig(dataset="digits", binarize="threshold", train_size=50),
            train=TrainConfig(
                epochs=epochs,
                batch_size=25,
                device="cpu",
                train_eval_size=10,
                adam_eps=1e-4,
                lr_schedule="BurdaLR",
                lr_schedule_options={"num_stages": 3},
            ),
        )

    r = 10 ** (-1 / 7)
    expected = [1e-3, 1e-3 * r, 1e-3 * r, 1e-3 * r, 1e-3 * r**2, 1e-3 * r**2, 1e-3 * r**2]
    whole = ppl_vae.fit(config(7), tmp_path / "whole", progress=False)
    assert whole.history.lr.values.tolist() == pytest.approx(expected, rel=1e-12)
    ppl_vae.fit(config(3), tmp_path / "split", progress=False)
    resumed = ppl_vae.resume(tmp_path / "split", epochs=7, progress=False)
    assert resumed.history.lr.values.tolist() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ConfigError, match="lr_schedule_options"):
        validate_train_config(TrainConfig(lr_schedule="BurdaLR", lr_schedule_options={"num_stages": 0}))
