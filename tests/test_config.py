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
