"""Model options (``--model-option``, ``ModelConfig.model_options``) are checked against the
type and range each builder declares on its keyword-only parameters, with one-line errors that
name the model, the option and what it allows."""

from __future__ import annotations

import json
from typing import Annotated, List, Literal, Optional, Sequence, Tuple, Union

import pytest

from ppl_vae.models import build_vae
from ppl_vae.models.zoo import Choice, PositiveInt, UnitFraction, check_model_options, describe_type
from tests.conftest import invoke, one_line_error

SHAPE = (1, 4, 4)
M2_INFO = {"num_classes": 3, "num_train": 40, "num_labelled": 6}


def build(model: str, **options):
    info = M2_INFO if model == "m2" else {}
    hidden = {} if "hidden_dims" in options else {"hidden_dim": 8}  # both would be refused: one sets the sizes
    return build_vae(model, SHAPE, latent_dim=2, data_info=info, model_options=options, **hidden)


@pytest.mark.parametrize(
    "model,option,value,allowed",
    [
        ("two_layer", "hidden_dims", 5, "a list of"),
        ("two_layer", "kl_warmup_fractions", 0.5, "a list of finite numbers in (0, 1]"),
        ("two_layer", "kl_warmup_fractions", [0.5, 1.5], "a list of finite numbers in (0, 1]"),
        ("two_layer", "activation", [1], "one of"),
        ("two_layer", "activation", "swish", "one of"),
        ("two_layer", "z1_dim", 0, "an integer >= 1"),
        ("two_layer", "z1_dim", 2.5, "an integer >= 1"),
        ("two_layer", "hidden_dims", [[64], [0]], "integer >= 1"),
        ("ladder", "hidden_dims", "[[64],[32]]x", "a list of"),
        ("one_layer", "activation", 3, "one of"),
        ("m2", "alpha", [1], "a finite number >= 0"),
        ("m2", "alpha", float("nan"), "a finite number >= 0"),
        ("m2", "alpha", float("inf"), "a finite number >= 0"),
        ("relaxed_gmvae", "temperature", "abc", "a finite number > 0"),
        ("relaxed_gmvae", "anneal_rate", -1, "a finite number >= 0"),
        ("relaxed_gmvae", "uniform_weights", 1, "true or false"),
        ("gmvae", "uniform_weights", "no", "true or false"),
        ("gmvae", "uniform_weights", "false", "true or false"),
    ],
)
def test_bad_values_are_one_line_errors_naming_model_option_and_what_is_allowed(model, option, value, allowed):
    with pytest.raises(ValueError) as info:
        build(model, **{option: value})
    message = str(info.value)
    assert "\n" not in message
    assert f"model {model!r}" in message and f"option {option!r}" in message
    assert allowed in message, message
    assert repr(value) in message


@pytest.mark.parametrize(
    "model,options",
    [
        ("two_layer", {"hidden_dims": [[6], [4]], "z1_dim": 3, "activation": "relu"}),
        ("two_layer", {"hidden_dims": [6, 4], "kl_warmup_fractions": [0.5, 1]}),
        ("ladder", {"hidden_dims": [[6, 6], []], "kl_warmup_fractions": [1, 1], "z1_dim": None}),
        ("one_layer", {"activation": "identity"}),
        ("m2", {"alpha": 2}),
        ("m2", {"alpha": 0.5}),
        ("m2", {"alpha": None}),
        ("gmvae", {"uniform_weights": False}),
        ("relaxed_gmvae", {"temperature": 2, "min_temperature": 0.25, "anneal_rate": 0, "uniform_weights": True}),
    ],
)
def test_good_values_build(model, options):
    build(model, **options)


def test_json_from_the_command_line_is_checked_as_the_builder_declares():
    from ppl_vae.cli.fit import parse_model_options

    options = parse_model_options(["hidden_dims=[[64],[32]]", "uniform_weights=no", "temperature=abc"])
    assert options == {"hidden_dims": [[64], [32]], "uniform_weights": "no", "temperature": "abc"}
    build("two_layer", hidden_dims=options["hidden_dims"])


def test_the_checker_reads_typing_forms():
    def builder(
        a,
        b,
        c,
        d,
        e,
        *,
        i: int = 1,
        f: float = 1.0,
        s: Optional[str] = None,
        li: List[int] = (),
        t: Tuple[int, ...] = (),
        t2: Tuple[int, str] = (1, "a"),
        u: Union[int, Sequence[int]] = 1,
        lit: Literal["x", "y"] = "x",
        free=None,
        **data,
    ):
        raise AssertionError("not called")

    good = {"i": 3, "f": 2, "s": None, "li": [1, 2], "t": [], "t2": [1, "b"], "u": [1], "lit": "y", "free": object()}
    check_model_options("toy", builder, good)
    for option, value in [
        ("i", True),
        ("i", 1.0),
        ("f", "1"),
        ("f", float("-inf")),
        ("s", 1),
        ("li", "12"),
        ("li", [1, "2"]),
        ("t", 3),
        ("t2", [1, 2]),
        ("t2", [1]),
        ("u", [True]),
        ("lit", "z"),
    ]:
        with pytest.raises(ValueError, match=rf"model 'toy': option '{option}' must be "):
            check_model_options("toy", builder, {option: value})
    with pytest.raises(ValueError, match="has no option 'j'"):
        check_model_options("toy", builder, {"j": 1})


def test_descriptions_read_as_english():
    assert describe_type(Optional[Sequence[Union[PositiveInt, Sequence[PositiveInt]]]]) == (
        "null or a list of (an integer >= 1 or a list of integers >= 1)"
    )
    assert describe_type(bool) == "true or false"
    assert describe_type(Sequence[UnitFraction]) == "a list of finite numbers in (0, 1]"
    assert describe_type(Annotated[str, Choice({"a": 1, "b": 2})]) == "one of 'a', 'b'"


@pytest.mark.parametrize(
    "model, option, message",
    [
        ("two_layer", "hidden_dims=5", ("model 'two_layer': option 'hidden_dims' must be", "got 5")),
        ("gmvae", "uniform_weights=no", ("option 'uniform_weights' must be true or false, got 'no'",)),
    ],
)
def test_fit_with_a_bad_model_option_is_one_line_and_writes_nothing(tmp_path, model, option, message):
    out = tmp_path / "run"
    result = invoke(
        "fit",
        *("--model", model, "--model-option", option, "--epochs", "1", "--out", out),
        *("--latent-dim", "2", "--train-size", "100", "--no-progress"),
    )
    line = one_line_error(result, message[0])
    assert all(part in line for part in message[1:])
    assert result.exit_code == 1
    assert not out.exists()


def test_a_received_config_with_a_bad_option_is_one_line_on_evaluate(tmp_path):
    out = tmp_path / "run"
    result = invoke(
        "fit",
        "--model",
        "two_layer",
        "--epochs",
        "0",
        "--out",
        out,
        "--latent-dim",
        "2",
        "--hidden-dim",
        "8",
        "--train-size",
        "100",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    config["model"]["model_options"] = {"activation": [1]}
    (out / "config.json").write_text(json.dumps(config))
    result = invoke("evaluate", out, "--num-samples", "2")
    line = one_line_error(result, "model 'two_layer': option 'activation' must be one of")
    assert result.exit_code == 1
    assert "got [1]" in line
