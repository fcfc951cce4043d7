"""config.json is read strictly: what it does not say exactly is refused, naming the field."""

import json

import pytest

from ppl_vae.config import RunConfig
from ppl_vae.errors import ConfigError


def _raw():
    return json.loads(RunConfig().to_json())


def test_defaults_round_trip():
    config = RunConfig()
    config.plugins = ["my_plugin"]
    config.model.guide_options = {"num_flows": 2}
    assert RunConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    "edit, field, message",
    [
        (lambda r: r.clear() or r.update(foo=1), None, "unknown key.*foo"),
        (lambda r: r.pop("train"), None, "lacks section.*train"),
        (lambda r: r["train"].update(lr="fast"), "train.lr", 'train.lr must be a finite number, got "fast"'),
        (lambda r: r["train"].update(epochs=1.5), "train.epochs", "train.epochs must be an integer"),
        (lambda r: r["train"].update(epochs=True), "train.epochs", "train.epochs must be an integer"),
        (lambda r: r["train"].update(fused_elbo=1), "train.fused_elbo", "true or false"),
        (lambda r: r["model"].update(latent_dim="3"), "model.latent_dim", "an integer or null"),
        (lambda r: r["model"].update(prior_options=[1]), "model.prior_options", "an object"),
        (lambda r: r["data"].update(binarize=None), "data.binarize", "a string"),
        (lambda r: r.update(plugins="x"), "plugins", "a list of strings"),
        (lambda r: r.update(model=3), "model", "must be a JSON object"),
        (lambda r: r["data"].update(datset="digits"), "data", "unknown key.*datset"),
    ],
)
def test_bad_configs_are_refused_naming_the_field(edit, field, message):
    raw = _raw()
    edit(raw)
    with pytest.raises(ConfigError, match=message) as info:
        RunConfig.from_json(json.dumps(raw))
    assert info.value.field == field
    assert "\n" not in str(info.value)


def test_nan_is_refused_and_missing_fields_take_defaults():
    raw = _raw()
    del raw["train"]["train_eval_size"]  # a config written before the field existed
    assert RunConfig.from_json(json.dumps(raw)).train.train_eval_size == RunConfig().train.train_eval_size
    raw["train"]["lr"] = float("nan")
    with pytest.raises(ConfigError, match="train.lr"):
        RunConfig.from_json(json.dumps(raw))
    with pytest.raises(ConfigError, match="not valid JSON"):
        RunConfig.from_json("{")


@pytest.mark.parametrize(
    "edit, field, message",
    [
        (lambda r: r["train"].update(beta=float("nan")), "train.beta", r"^train.beta must be a finite number > 0, got nan$"),
        (lambda r: r["train"].update(lr=-1), "train.lr", r"^train.lr must be a positive number, got -1$"),
        (lambda r: r["train"].update(kl_cycle_ratio=0), "train.kl_cycle_ratio", r"^train.kl_cycle_ratio must be in \(0, 1\], got 0$"),
        (
            lambda r: r["train"].update(beta=4.0),
            "train.beta",
            r"^train.beta applies to objective 'beta_vae' only; train.objective is 'elbo'$",
        ),
        (
            lambda r: r["data"].update(labels=20),
            "data.labels",
            r"^data.labels applies to a model that trains on labels \(m2\) only; model.model is 'gaussian_mlp'$",
        ),
        (
            lambda r: r["model"].update(prior_options={"num_components": 3}),
            "model.prior_options",
            r"^model.prior_options.num_components applies to prior 'mixture_of_gaussians' or 'vamp' only",
        ),
    ],
)  # fmt: skip
def test_a_received_config_out_of_range_or_not_applying_is_refused_at_load(edit, field, message):
    raw = _raw()
    edit(raw)
    text = json.dumps(raw)  # Python's json writes NaN, as a hand-edited file might hold it
    with pytest.raises(ConfigError, match=message) as info:
        RunConfig.from_json(text)
    assert info.value.field == field and "\n" not in str(info.value)


def test_a_config_that_sets_what_applies_round_trips(tmp_path):
    from ppl_vae import runs
    from ppl_vae.config import DataConfig, ModelConfig, TrainConfig

    config = RunConfig(
        model=ModelConfig(model="m2", prior="mixture_of_gaussians", prior_options={"num_components": 3}),
        data=DataConfig(labels=20, label_seed=1),
        train=TrainConfig(
            objective="beta_tc", tc_beta=6.0, tc_estimator="mss", kl_schedule="cyclical", kl_cycle_epochs=3
        ),
    )
    assert RunConfig.from_json(config.to_json()) == config
    runs.save_config(tmp_path, RunConfig())
    assert runs.load_config(tmp_path) == RunConfig()  # defaults, through a run directory's config.json


def test_config_json_with_a_key_twice_or_an_empty_data_path_is_refused():
    """QA: '"lr": 0.001, "lr": 0.5' was read as 0.5 without a word, and a data_dir of "" read the
    current folder (a text run scored every .txt file where the command ran)."""
    import json

    from ppl_vae.config import RunConfig
    from ppl_vae.errors import ConfigError

    text = RunConfig().to_json().replace('"lr": 0.001', '"lr": 0.001, "lr": 0.5')
    assert '"lr": 0.5' in text
    with pytest.raises(ConfigError, match="config names 'lr' twice in one object; keep one"):
        RunConfig.from_json(text)
    raw = json.loads(RunConfig().to_json())
    for name in ("data_dir", "dataset"):
        raw["data"][name] = " "
        with pytest.raises(ConfigError, match=f"data.{name} is an empty name"):
            RunConfig.from_dict(json.loads(json.dumps(raw)))
        raw["data"][name] = "digits" if name == "dataset" else None
