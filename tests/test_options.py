"""Every setting is declared once (ppl_vae.config): its type, default, range, flag and what it
applies to. The CLI's options, FIELD_FLAGS and RUN_OPTIONS are generated from the declarations,
and a setting that does not apply, a value out of range and a learning-rate schedule that
fails or turns the learning rate negative only after some epochs are refused before any file
is written."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import click
import pytest

from ppl_vae.cli import fit as fit_module
from ppl_vae.cli.fit import FIELD_FLAGS, RESUME_SETTINGS, RUN_OPTIONS, fit, run_config
from ppl_vae.config import (
    OPTION,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    check_config,
    declarations,
)
from ppl_vae.errors import ConfigError
from tests.conftest import invoke, one_line_error

TINY = ["--epochs", "1", "--train-size", "50", "--batch-size", "25", "--device", "cpu", "--no-progress"]
TINY += ["--latent-dim", "2", "--hidden-dim", "8", "--train-eval-size", "0"]

# For each flag whose field has an applies-to rule: a valid value away from the default, and the
# flags that make the rule hold. Built from the declarations' flags, so a new rule fails the
# completeness test below until it is listed here (and so tested both ways).
RULES = {
    "--num-components": ("3", ["--prior", "mixture_of_gaussians"]),
    "--num-images": ("60", ["--dataset", "dsprites"]),
    "--labels": ("20", ["--model", "m2"]),
    "--label-seed": ("3", ["--model", "m2", "--labels", "20"]),
    "--kl-warmup": ("2", ["--kl-schedule", "linear"]),
    "--lr-schedule-options": ('{"step_size": 2}', ["--lr-schedule", "StepLR"]),
    "--early-stopping-patience": ("2", ["--val-fraction", "0.2"]),
    "--kl-cycle-epochs": ("5", ["--kl-schedule", "cyclical"]),
    "--kl-cycle-ratio": ("0.3", ["--kl-schedule", "cyclical"]),
    "--beta": ("4", ["--objective", "beta_vae"]),
    "--capacity-max": ("5", ["--objective", "capacity"]),
    "--capacity-start-epoch": ("1", ["--objective", "capacity"]),
    "--capacity-end-epoch": ("5", ["--objective", "capacity"]),
    "--gamma": ("10", ["--objective", "capacity"]),
    "--tc-alpha": ("2", ["--objective", "beta_tc"]),
    "--tc-beta": ("6", ["--objective", "beta_tc"]),
    "--tc-gamma": ("2", ["--objective", "beta_tc"]),
    "--tc-estimator": ("mss", ["--objective", "beta_tc"]),
    "--free-bits": ("0.5", ["--objective", "free_bits"]),
    "--free-bits-groups": ("2", ["--objective", "free_bits", "--free-bits", "0.5"]),
    "--adam-eps": ("1e-4", ["--optimizer", "adam"]),
    "--adam-beta1": ("0.5", ["--optimizer", "adam"]),
    "--adam-beta2": ("0.99", ["--optimizer", "adam"]),
}
# Where the default does not let a rule hold, the flags that make it fail.
BREAKS = {
    "--kl-warmup": ["--kl-schedule", "constant"],
    "--adam-eps": ["--optimizer", "sgd"],
    "--adam-beta1": ["--optimizer", "adagrad"],
    "--adam-beta2": ["--optimizer", "sgd"],
}


def config_of(*args: str) -> RunConfig:
    """The checked RunConfig that ``ppl-vae fit ARGS`` describes (parsed by click, nothing run)."""
    return run_config(fit.make_context("fit", list(args)).params)


# -- the declarations ----------------------------------------------------------------------------


def test_config_imports_neither_torch_nor_click():
    code = "import sys, ppl_vae.config; assert not {'torch', 'click'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_field_is_declared_with_help_and_every_rule_names_a_field():
    paths = {d.path for d in declarations()}
    for cls in (ModelConfig, DataConfig, TrainConfig):
        for f in cls.__dataclass_fields__.values():
            assert OPTION in f.metadata, f"{cls.__name__}.{f.name} is not declared with option()"
    for d in declarations():
        assert d.option.help.strip(), d.path
        if d.option.applies is not None:
            assert d.option.applies.field in paths, d.path
            assert d.option.applies(RunConfig()) in (True, False)


def test_the_flags_are_generated_from_the_declarations_and_keep_their_names():
    params = {p.name: p for p in fit.params if isinstance(p, click.Option)}
    for d in declarations():
        if d.flag is None:
            assert d.path not in FIELD_FLAGS
            continue
        param = params[d.param]
        assert param.opts == [d.flag] and FIELD_FLAGS[d.path] == d.flag
        assert param.help == d.option.help
        if not d.option.key and d.option.flag_type is None:
            assert param.default == d.default, d.path
    # today's flags, exactly (a flag a user types must not change name)
    assert FIELD_FLAGS["train.kl_warmup_epochs"] == "--kl-warmup"
    assert FIELD_FLAGS["model.prior_options"] == "--num-components"
    assert FIELD_FLAGS["model.prior_options.num_components"] == "--num-components"
    assert FIELD_FLAGS["model.model_options"] == "--model-option"
    assert FIELD_FLAGS["train.lr_schedule_options"] == "--lr-schedule-options"
    assert list(params["binarize"].type.choices) == ["none", "dynamic", "threshold"]
    # options that are not config fields stay hand-written
    assert {"out", "resume", "sample_grids", "log", "nproc", "dist_timeout", "progress"} <= set(params)


def test_run_options_are_every_config_flag_a_resume_cannot_change():
    assert RESUME_SETTINGS == ("lr", "optimizer", "device")
    assert "out" in RUN_OPTIONS and not {"epochs", "lr", "optimizer", "device"} & set(RUN_OPTIONS)
    flagged = {d.param for d in declarations() if d.flag is not None}
    assert set(RUN_OPTIONS) == (flagged - {"epochs", "lr", "optimizer", "device"}) | {"out"}
    assert {"kl_warmup", "num_components", "model_option", "lr_schedule_options"} <= set(RUN_OPTIONS)


def test_flags_become_the_fields_they_declare():
    config = config_of(
        "--train-eval-size", "0", "--num-components", "4", "--prior", "mixture_of_gaussians",
        "--model-option", "z1_dim=3", "--model-option", "name=x", "--lr-schedule", "StepLR",
        "--lr-schedule-options", '{"step_size": 2}', "--data-dir", "some/dir", "--kl-warmup", "3",
    )  # fmt: skip
    assert config.train.train_eval_size is None  # 0: the whole training set
    assert config.model.prior_options == {"num_components": 4}
    assert config.model.model_options == {"z1_dim": 3, "name": "x"}
    assert config.train.lr_schedule_options == {"step_size": 2}
    assert config.data.data_dir == "some/dir" and config.train.kl_warmup_epochs == 3
    assert config_of() == RunConfig(plugins=config_of().plugins)  # no flags: the declared defaults


# -- applies to ----------------------------------------------------------------------------------


def test_every_rule_has_a_case_here():
    ruled = {d.flag for d in declarations() if d.option.applies is not None and d.flag is not None}
    assert ruled == set(RULES)


@pytest.mark.parametrize("flag", sorted(RULES))
def test_a_setting_is_refused_where_it_does_not_apply_and_accepted_where_it_does(flag):
    value, holds = RULES[flag]
    declared = next(d for d in declarations() if d.flag == flag)
    with pytest.raises(ConfigError, match=rf"^{declared.label} applies to .* only; ") as info:
        config_of(flag, value, *BREAKS.get(flag, []))
    assert info.value.field == declared.path and "\n" not in str(info.value)
    rule = declared.option.applies
    assert f"applies to {rule.description} only; {rule.field} is " in str(info.value)
    config = config_of(flag, value, *holds)
    assert declared.is_set(getattr(config, declared.section))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--beta", "4"], "--beta applies to objective 'beta_vae' only; --objective is 'elbo'"),
        (["--kl-cycle-epochs", "5"], "--kl-cycle-epochs applies to --kl-schedule 'cyclical' only; --kl-schedule is 'linear'"),
        (["--labels", "20"], "--labels applies to a model that trains on labels (m2) only; --model is 'gaussian_mlp'"),
        (["--num-components", "3"], "--num-components applies to prior 'mixture_of_gaussians' or 'vamp' only; --prior is"),
        (["--early-stopping-patience", "2"], "--early-stopping-patience applies to a validation set (--val-fraction > 0)"),
        (["--lr-schedule-options", '{"step_size": 2}'], "--lr-schedule-options applies to a learning-rate schedule"),
        (["--beta", "nan"], "--beta must be a finite number > 0, got nan"),
        (["--objective", "beta_vae", "--beta", "-inf"], "--beta must be a finite number > 0, got -inf"),
        (["--capacity-max", "inf"], "--capacity-max must be a finite number >= 0, got inf"),
        (["--kl-cycle-ratio", "1.5", "--kl-schedule", "cyclical"], "--kl-cycle-ratio must be in (0, 1], got 1.5"),
        (["--val-fraction", "nan"], "--val-fraction must be a finite number in [0, 1), got nan"),
        (["--clip-grad-norm", "inf"], "--clip-grad-norm must be a finite number > 0 or null, got inf"),
        (["--labels", "0", "--model", "m2"], "--labels must be >= 1 or null, got 0"),
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
        (["--num-components", "0", "--prior", "vamp"], "--num-components must be >= 1, got 0"),
        (["--model-option", "z1_dim"], "--model-option must be KEY=VALUE"),
        (["--lr-schedule", "StepLR", "--lr-schedule-options", "[1]"], "--lr-schedule-options must be a JSON object"),
    ],
)  # fmt: skip
def test_the_cli_refuses_in_one_line_naming_the_flags_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "run"
    result = invoke("fit", *args, *TINY, "--out", out)
    line = one_line_error(result, message)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "train." not in line and "model." not in line and "data." not in line, line
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_settings_train_where_they_apply(tmp_path):
    out = tmp_path / "beta"
    result = invoke("fit", "--objective", "beta_vae", "--beta", "4", *TINY, "--out", out)
    assert result.exit_code == 0, result.output
    config = RunConfig.from_json((out / "config.json").read_text())
    assert (config.train.objective, config.train.beta) == ("beta_vae", 4.0)
    cyclical = ["--kl-schedule", "cyclical", "--kl-cycle-epochs", "2", "--kl-cycle-ratio", "0.5"]
    result = invoke("fit", *cyclical, *TINY, "--out", tmp_path / "cyc")
    assert result.exit_code == 0, result.output


# -- learning-rate schedules ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule, options, message",
    [
        ("StepLR", '{"step_size": "abc"}', "do not fit StepLR: stepping it after epoch 1 fails (TypeError"),
        ("StepLR", '{"step_size": 0}', "do not fit StepLR: stepping it after epoch 1 fails (ZeroDivisionError"),
        ("CosineAnnealingLR", '{"T_max": 0}', "do not fit CosineAnnealingLR: stepping it after epoch 1 fails (ZeroDivisionError"),
        ("ExponentialLR", '{"gamma": -1}', "make ExponentialLR set the learning rate to -0.001 after epoch 1"),
        ("ExponentialLR", '{"gamma": NaN}', "make ExponentialLR set the learning rate to nan after epoch 1"),
        ("OneCycleLR", '{"max_lr": 0.01, "total_steps": 3}', "stepping it after epoch 4 fails (ValueError"),
    ],
)  # fmt: skip
def test_lr_schedules_that_fail_when_stepped_are_refused_up_front(tmp_path, schedule, options, message):
    out = tmp_path / "run"
    epochs = ["--epochs", "5"] if schedule == "OneCycleLR" else []
    result = invoke("fit", *TINY, *epochs, "--lr-schedule", schedule, "--lr-schedule-options", options, "--out", out)
    line = one_line_error(result, message)
    assert line.startswith("Error: --lr-schedule-options ") and result.exit_code == 1, line
    assert not out.exists()


def test_a_plateau_schedule_is_stepped_with_a_constant_and_accepted(tmp_path):
    from ppl_vae.inference.training import validate_train_config

    plateau = dict(lr_schedule="ReduceLROnPlateau", val_fraction=0.2, device="cpu", epochs=50)
    validate_train_config(TrainConfig(**plateau, lr_schedule_options={"patience": 1, "factor": 0.5}))
    validate_train_config(TrainConfig(lr_schedule="CosineAnnealingLR", lr_schedule_options={"T_max": 10}, device="cpu"))
    with pytest.raises(ConfigError, match="train.lr_schedule_options do not fit ReduceLROnPlateau"):
        validate_train_config(TrainConfig(**plateau, lr_schedule_options={"factor": 2.0}))


# -- configs built in Python ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, field, message",
    [
        (lambda: TrainConfig(lr="fast"), "train.lr", 'train.lr must be a finite number, got "fast"'),
        (lambda: TrainConfig(epochs=2.5), "train.epochs", "train.epochs must be an integer, got 2.5"),
        (lambda: TrainConfig(fused_elbo=1), "train.fused_elbo", "true or false"),
        (lambda: DataConfig(data_dir=Path("x")), "data.data_dir", "data.data_dir must be a string or null"),
        (lambda: ModelConfig(prior_options=[3]), "model.prior_options", "an object"),
        (lambda: RunConfig(train=DataConfig()), "train", "train must be a TrainConfig"),
        (lambda: RunConfig(plugins="x"), "plugins", "a list of strings"),
    ],
)
def test_configs_built_in_python_have_their_types_checked(make, field, message):
    with pytest.raises(ConfigError, match=message) as info:
        make()
    assert info.value.field == field


def test_check_config_checks_what_was_set_after_building():
    config = RunConfig()
    config.train.lr = "fast"  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="train.lr must be a finite number"):
        check_config(config)
    config.train.lr = math.inf
    with pytest.raises(ConfigError, match=r"^train.lr must be a finite number > 0, got inf$"):
        check_config(config)
    config = RunConfig(model=ModelConfig(model="m2"), data=DataConfig(labels=20, label_seed=2))
    check_config(config)
    config.model.model = "gaussian_mlp"
    with pytest.raises(ConfigError, match=r"^data.labels applies to .* \(m2\) only; model.model is 'gaussian_mlp'$"):
        check_config(config)


def test_labels_apply_to_the_models_that_declare_them(monkeypatch):
    """data.labels follows ModelSpec.uses_labels, not a table of names: a plugin model may declare it."""
    from dataclasses import replace

    from ppl_vae.models import MODELS

    monkeypatch.setitem(MODELS._entries, "labelled_plugin", replace(MODELS.get("gaussian_mlp"), uses_labels=True))
    check_config(RunConfig(model=ModelConfig(model="labelled_plugin"), data=DataConfig(labels=20)))
    assert not MODELS.get("gaussian_mlp").uses_labels and MODELS.get("m2").uses_labels
    with pytest.raises(ValueError, match="unknown model 'nosuch'"):
        check_config(RunConfig(model=ModelConfig(model="nosuch"), data=DataConfig(labels=20)))


def test_fit_module_keeps_its_helpers():
    assert fit_module.parse_model_options(["a=1", "b=x"]) == {"a": 1, "b": "x"}
    with pytest.raises(ValueError, match="^--model-option must be KEY=VALUE"):
        fit_module.parse_model_options(["a"])
