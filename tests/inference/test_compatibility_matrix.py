"""The compatibility matrix: every registered model x guide family x training method x objective.

Each combination is either refused up front (one line naming both sides, before a stepper is
built) or takes one training step that moves every parameter it should train. The loops read
the registries, so a new model, guide, method or objective is covered without editing this file.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, Optional, Tuple

import pytest
import torch

from ppl_vae.config import TrainConfig
from ppl_vae.errors import ConfigError
from ppl_vae.inference.capabilities import check_compatible
from ppl_vae.inference.training import METHODS, OBJECTIVES, TRAIN_LOSS, Stepper, make_stepper, num_trained_on
from ppl_vae.models import GUIDES, MODELS, build_vae
from ppl_vae.models.priors import PRIORS

NUM_CLASSES = 3
VOCAB = 5
N = 8

#: datapoint shape for the models whose builders need one of their own (else 8x8 images)
SHAPES: Dict[str, Tuple[int, ...]] = {"conv": (1, 28, 28), "chen_mlp": (1, 64, 64), "conv64": (1, 64, 64)}


def _shape(name: str) -> Tuple[int, ...]:
    if name.startswith("text"):
        return (16,)
    return SHAPES.get(name, (1, 8, 8))


def tiny(name: str, guide: str) -> Tuple[torch.nn.Module, torch.Tensor, Optional[torch.Tensor]]:
    """A small ``name`` with ``guide``, a minibatch its likelihood supports and labels (some -1)."""
    shape = _shape(name)
    info = {"num_classes": NUM_CLASSES, "vocab_size": VOCAB}
    torch.manual_seed(0)
    vae = build_vae(name, shape, latent_dim=3, hidden_dim=8, data_info=info, guide=guide)
    gen = torch.Generator().manual_seed(1)
    likelihood = MODELS.get(name).likelihood
    if name.startswith("text"):
        x = torch.randint(0, VOCAB, (N, *shape), generator=gen)
    elif likelihood == "bernoulli":
        x = (torch.rand((N, *shape), generator=gen) < 0.5).float()
    else:
        x = torch.rand((N, *shape), generator=gen)
    y = torch.tensor([0, 1, 2, -1, 0, -1, 1, -1])
    if vae.num_classes is not None and not hasattr(vae, "enumerated_sites"):
        y = y.clamp_min(0)  # a conditional model needs every label
    return vae, x, y


def configs():
    """Every (method, objective) with settings that exercise each one's own options."""
    for method in METHODS.names():
        for objective in OBJECTIVES.names():
            uses = OBJECTIVES.get(objective) or METHODS.get(method)
            options = dict(method=method, objective=objective, lr=1e-2, device="cpu")
            if "num_particles" in uses.uses:
                options["num_particles"] = 2
            options.update(
                {"beta_vae": {"beta": 4.0}, "free_bits": {"free_bits": 0.5, "free_bits_groups": 1}}.get(objective, {})
            )
            yield f"{method}/{objective}", TrainConfig(**options)


def one_line_naming(message: str, *names: str) -> bool:
    return "\n" not in message and all(n in message for n in names)


# Parameters a combination leaves alone by design, each with its reason. Empty today: every
# accepted combination trains every parameter its model has.
UNTRAINED: Dict[Tuple[str, str], str] = {}


@pytest.mark.parametrize("guide", GUIDES.names())
@pytest.mark.parametrize("model", MODELS.names())
def test_every_combination_trains_every_part_or_is_refused_up_front(model, guide, one_thread):
    try:
        tiny(model, guide)
    except ValueError as exc:  # a guide family the model does not offer: refused when building
        assert one_line_naming(str(exc), guide), exc
        return
    problems = []
    accepted = 0
    for label, config in configs():
        vae, x, y = tiny(model, guide)
        kwargs = {"y": y} if vae.num_classes is not None else {}
        try:
            check_compatible(vae, config, model=model, guide=guide)
        except ConfigError as exc:
            side = config.method if config.objective == "elbo" else config.objective
            if not one_line_naming(str(exc), side):
                problems.append(f"{label}: refusal does not name {side!r} on one line: {exc}")
            with pytest.raises(ConfigError):  # the stepper refuses it too, built directly or by name
                make_stepper(vae, config)
            continue
        accepted += 1
        stepper = make_stepper(vae, config)
        before = {k: v.detach().clone() for k, v in vae.named_parameters()}
        torch.manual_seed(2)
        loss = stepper.step(x, num_data=4 * N, kl_weight=0.5 if "kl_weight" in stepper.uses else 1.0, **kwargs)
        if not torch.isfinite(loss):
            problems.append(f"{label}: loss {float(loss)}")
        # a parameter the model froze (requires_grad False, e.g. the GMVAE's uniform p(c)) is not trained
        still = [k for k, v in vae.named_parameters() if v.requires_grad and torch.equal(v, before[k])]
        still = [k for k in still if (model, k.split(".")[0]) not in UNTRAINED]
        if still:
            problems.append(f"{label}: {len(still)} parameter(s) did not move: {', '.join(still[:6])}")
    assert not problems, f"{model} with guide {guide}:\n" + "\n".join(problems)
    assert accepted >= 1, "every method refused the model: at least svi/elbo should train it"


def test_iaf_flows_train_under_every_objective(one_thread):
    """The bug this matrix was written for: objectives scored the encoder's Gaussian and left the
    flows without a gradient, while the run recorded guide 'iaf'."""
    for objective in OBJECTIVES.names():
        vae, x, _ = tiny("bernoulli_mlp", "iaf")
        fb = {"free_bits": 0.5, "free_bits_groups": 1} if objective == "free_bits" else {}
        config = TrainConfig(objective=objective, lr=1e-2, **fb)
        if objective == "beta_tc":
            with pytest.raises(ConfigError, match="objective 'beta_tc' needs a model whose guide is the encoder's"):
                make_stepper(vae, config)
            continue
        stepper = make_stepper(vae, config)
        before = [p.detach().clone() for p in vae.flows.parameters()]
        stepper.step(x, num_data=N)
        moved = [not torch.equal(p, b) for p, b in zip(vae.flows.parameters(), before)]
        assert all(moved), (objective, moved)


def test_refusals_name_both_sides(tmp_path):
    vae, _, _ = tiny("two_layer", "diagonal_normal")
    with pytest.raises(ConfigError) as info:
        check_compatible(vae, TrainConfig(objective="beta_tc"), model="two_layer")
    assert str(info.value).startswith("objective 'beta_tc' needs a model whose guide is the encoder's Gaussian")
    assert "model 'two_layer'" in str(info.value)
    vae, _, _ = tiny("bernoulli_mlp", "diagonal_normal")
    with pytest.raises(ConfigError, match=r"objective 'capacity' cannot run data-parallel .* nproc 2: use nproc 1"):
        check_compatible(vae, TrainConfig(objective="capacity"), world_size=2)
    # QA: the ladder's batch norm normalised each process's share on its own under --nproc 2 (no
    # SyncBatchNorm on the CPU), a gradient other than one process's: refused, naming both sides
    ladder, _, _ = tiny("ladder", "diagonal_normal")
    with pytest.raises(ConfigError, match=r"model 'ladder' normalises its batches .* nproc 2 would normalise") as bn:
        check_compatible(ladder, TrainConfig(), model="ladder", world_size=2)
    assert "\n" not in str(bn.value) and "for a new run, model option batch_norm=false" in str(bn.value)
    check_compatible(ladder, TrainConfig(), model="ladder")  # one process: as before
    # on a resume the refusal is this command's --nproc, not config.json's (QA review)
    import ppl_vae
    from ppl_vae.config import DataConfig, ModelConfig, RunConfig

    run = RunConfig(ModelConfig(model="ladder", latent_dim=2, hidden_dim=8), DataConfig(train_size=50),
                    TrainConfig(epochs=1, batch_size=50, device="cpu"))  # fmt: skip
    ppl_vae.fit(run, tmp_path / "ladder", progress=False)
    with pytest.raises(ConfigError, match="normalises its batches") as resumed:
        ppl_vae.resume(tmp_path / "ladder", epochs=2, nproc=2, progress=False)
    assert "config.json" not in str(resumed.value) and resumed.value.field == "nproc"
    with pytest.raises(ConfigError, match=r"train.num_particles does not apply to method 'wake-sleep'"):
        check_compatible(vae, TrainConfig(method="wake-sleep", num_particles=3))
    with pytest.raises(ConfigError, match=r"train.compile applies to a loss written in plain torch; method 'iwae'"):
        check_compatible(vae, TrainConfig(method="iwae", compile="eager"))
    m2, _, _ = tiny("m2", "diagonal_normal")
    check_compatible(m2, TrainConfig(compile="eager"), model="m2")  # the batched enumerated ELBO is plain torch
    with pytest.raises(ConfigError, match=r"train.compile .* method 'svi' on model 'm2'"):
        check_compatible(m2, TrainConfig(compile="eager", fused_elbo=False), model="m2")


def test_a_last_minibatch_too_small_for_the_estimator_is_refused_up_front():
    vae, _, _ = tiny("bernoulli_mlp", "diagonal_normal")
    config = TrainConfig(objective="beta_tc", tc_estimator="mss", batch_size=100)
    with pytest.raises(ConfigError, match="leaves one of 1"):
        check_compatible(vae, config, num_train=201)
    check_compatible(vae, config, num_train=202)
    assert num_trained_on(201, replace(config, val_fraction=0.005)) == 200  # one point held out: no remainder


@pytest.mark.parametrize("objective", [o for o in OBJECTIVES.names() if o != "elbo"])
def test_compile_reaches_every_objective(objective, one_thread):
    """``--compile`` was recorded for every method but read by svi alone; now the one step calls
    the compiled loss of every method whose loss is plain torch ('eager': dynamo's capture only)."""
    vae, x, _ = tiny("bernoulli_mlp", "diagonal_normal")
    config = TrainConfig(objective=objective, compile="eager", batch_size=N)
    stepper = make_stepper(vae, config)
    calls = []
    compiled = stepper.loss_fn
    stepper.loss_fn = lambda *a, **k: calls.append(1) or compiled(*a, **k)
    stepper.step(x, num_data=N)
    assert calls == [1]
    torch.manual_seed(4)
    a = compiled(x, num_data=N)
    torch.manual_seed(4)
    b = stepper.loss(x, num_data=N)
    a, b = (v[0] if isinstance(v, tuple) else v for v in (a, b))
    assert torch.allclose(a, b, rtol=1e-5)


# -- the same through the run layer: a sample of accepted combinations fits, evaluates and resumes,
# -- refused ones write nothing (in-process, tiny sizes)

SAMPLE = [
    *[("bernoulli_mlp", "diagonal_normal", m, "elbo") for m in METHODS.names()],
    *[("bernoulli_mlp", "diagonal_normal", "svi", o) for o in OBJECTIVES.names() if o != "elbo"],
    ("bernoulli_mlp", "iaf", "svi", "beta_vae"),
    ("bernoulli_mlp", "iaf", "dreg", "elbo"),
    ("two_layer", "diagonal_normal", "svi", "capacity"),
    ("m2", "diagonal_normal", "rws", "elbo"),
]


def _run_config(model: str, guide: str, method: str, objective: str, epochs: int = 1):
    from ppl_vae.config import DataConfig, ModelConfig, RunConfig

    train = dict(method=method, objective=objective, epochs=epochs, batch_size=25, lr=1e-2, device="cpu")
    if "num_particles" in (OBJECTIVES.get(objective) or METHODS.get(method)).uses:
        train["num_particles"] = 2
    if objective == "free_bits":
        train["free_bits"] = 0.5  # a floor: with none the objective is the ELBO, and refused
    return RunConfig(
        model=ModelConfig(model=model, guide=guide, latent_dim=2, hidden_dim=8),
        data=DataConfig(dataset="digits", binarize="threshold", train_size=50, labels=20 if model == "m2" else None),
        train=TrainConfig(train_eval_size=20, **train),
    )


@pytest.mark.parametrize("model,guide,method,objective", SAMPLE)
def test_a_sample_fits_evaluates_and_resumes(tmp_path, model, guide, method, objective, one_thread):
    import ppl_vae
    from ppl_vae.reports.evaluation import evaluate_run

    run = ppl_vae.fit(_run_config(model, guide, method, objective), tmp_path / "run", progress=False)
    assert run.config.model.guide == guide and run.config.train.objective == objective
    # the history says what its train_loss is for this method (it gave svi's and IW's meaning for MCEM's
    # -log p(x, z), wake-sleep's wake phase and the objectives); each one declares its own
    stepper = OBJECTIVES.get(objective) or METHODS.get(method)
    assert run.history.train_loss.attrs["description"] == TRAIN_LOSS + stepper.loss_meaning
    assert (method, objective) == ("svi", "elbo") or stepper.loss_meaning != Stepper.loss_meaning, stepper
    evaluation = evaluate_run(run.run_dir, num_samples=4, num_datapoints=10, out_dir=tmp_path / "eval", progress=False)
    values = evaluation.dataset["log_px"].values if "log_px" in evaluation.dataset else None
    assert values is None or bool((values < 0).all())
    more = ppl_vae.resume(run.run_dir, epochs=2, progress=False)
    assert more.new_epochs == 1 and more.epochs_done == 2


@pytest.mark.parametrize(
    "args,names",
    [
        (["--model", "two_layer", "--objective", "beta_tc"], ["objective 'beta_tc'", "model 'two_layer'"]),
        (["--method", "wake-sleep", "--num-particles", "3"], ["train.num_particles", "method 'wake-sleep'"]),
        (["--objective", "capacity", "--nproc", "2"], ["objective 'capacity'", "nproc"]),
        (["--method", "iwae", "--compile", "eager"], ["compile", "method 'iwae'"]),
        (["--model", "m2", "--labels", "20", "--method", "mcem"], ["method 'mcem'", "model 'm2'"]),
    ],
)
def test_refused_combinations_write_nothing(tmp_path, args, names):
    from click.testing import CliRunner

    from ppl_vae.cli.main import cli

    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["fit", "--epochs", "1", "--train-size", "50", "--out", str(out), *args])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert not out.exists()
    for name in names:
        flag_or_field = name.replace("train.num_particles", "--num-particles")
        assert name in lines[0] or flag_or_field in lines[0], (name, lines[0])


@pytest.mark.slow
@pytest.mark.parametrize("method,objective", [("iwae", "elbo"), ("svi", "beta_vae")])
def test_data_parallel_sample_trains_on_two_processes(tmp_path, method, objective):
    import ppl_vae

    run = ppl_vae.fit(_config_for_two(method, objective), tmp_path / "run", nproc=2, progress=False)
    assert run.epochs_done == 1 and bool(torch.isfinite(torch.tensor(run.history.train_elbo.values)).all())


def _config_for_two(method: str, objective: str):
    config = _run_config("bernoulli_mlp", "diagonal_normal", method, objective)
    config.train = replace(config.train, batch_size=24)  # a global batch each of 2 ranks takes half of
    return config


def _elbo_objectives():
    return [o for o in OBJECTIVES.names() if "elbo" in (OBJECTIVES.get(o) or METHODS.get("svi")).uses]


@pytest.mark.parametrize("guide", GUIDES.names())
@pytest.mark.parametrize("model", MODELS.names())
def test_estimator_b_is_refused_or_changes_what_is_trained(model, guide, one_thread):
    """train.elbo 'mean_field' (AEVB's estimator B: the KL in closed form) is refused up front where
    no KL term has one, and wherever it is accepted the loss differs from estimator A's at the
    same weights and draws. It was recorded and silently ignored for the hierarchies' fused loss,
    IAF guides and the mixture, Vamp and flow priors (estimator A trained, bit for bit)."""
    try:
        tiny(model, guide)
    except ValueError:  # a guide family the model does not offer
        return
    priors = PRIORS.names() if model == "gaussian_mlp" and guide == "diagonal_normal" else ["standard_normal"]
    for prior in priors:
        for objective in _elbo_objectives():
            # (free bits small enough that no group's KL sits at its floor, where both estimators give the floor)
            options = {"beta_vae": {"beta": 4.0}, "free_bits": {"free_bits": 1e-3, "free_bits_groups": 1}}
            config = TrainConfig(objective=objective, elbo="mean_field", lr=1e-2, **options.get(objective, {}))
            vae, x, y = _tiny_with_prior(model, guide, prior)
            kwargs = {"y": y} if vae.num_classes is not None else {}
            try:
                check_compatible(vae, config, model=model, guide=guide)
                make_stepper(vae, config)  # an enumerating model's stepper refuses it (enumerating_elbo)
            except ConfigError as exc:
                assert "\n" not in str(exc) and "mean_field" in str(exc) or "needs" in str(exc), exc
                continue
            losses = []
            for elbo in ("trace", "mean_field"):
                vae, x, y = _tiny_with_prior(model, guide, prior)
                stepper = make_stepper(vae, replace(config, elbo=elbo))
                torch.manual_seed(2)
                losses.append(float(stepper.step(x, num_data=N, **kwargs)))
            assert losses[0] != losses[1], (model, guide, prior, objective, losses)


def _tiny_with_prior(model: str, guide: str, prior: str):
    vae, x, y = tiny(model, guide)
    if prior != "standard_normal":
        torch.manual_seed(0)
        vae = build_vae(model, _shape(model), latent_dim=3, hidden_dim=8, guide=guide, prior=prior)
    return vae, x, y


def test_estimator_b_refusals_name_the_setting_and_the_model():
    vae, _, _ = tiny("bernoulli_mlp", "iaf")
    with pytest.raises(
        ConfigError,
        match=r"^train.elbo 'mean_field' \(AEVB's estimator B, .*\) does not apply to model 'bernoulli_mlp' "
        r"with guide 'iaf': at no latent site \(z\) is the KL",
    ):
        check_compatible(vae, TrainConfig(elbo="mean_field"), model="bernoulli_mlp", guide="iaf")
    torch.manual_seed(0)
    vamp = build_vae("gaussian_mlp", (1, 8, 8), latent_dim=3, hidden_dim=8, prior="vamp")
    with pytest.raises(ConfigError, match=r"does not apply to model 'gaussian_mlp': at no latent site"):
        check_compatible(vamp, TrainConfig(elbo="mean_field"), model="gaussian_mlp")
    two, _, _ = tiny("two_layer", "diagonal_normal")
    with pytest.raises(ConfigError, match=r"its guide samples z1, z2 and its model z2, z1"):
        check_compatible(two, TrainConfig(elbo="mean_field"), model="two_layer")
    ladder, _, _ = tiny("ladder", "diagonal_normal")  # through Pyro's TraceMeanField_ELBO, not the fused loss
    assert not make_stepper(ladder, TrainConfig(elbo="mean_field")).fused and make_stepper(ladder, TrainConfig()).fused


def test_the_closed_form_probe_leaves_the_random_stream_alone():
    """The check of estimator B traces the model and guide once; the draws it makes must not shift
    training's (a run with the check and one without would differ)."""
    ladder, _, _ = tiny("ladder", "diagonal_normal")
    torch.manual_seed(5)
    before = torch.get_rng_state()
    check_compatible(ladder, TrainConfig(elbo="mean_field"), model="ladder")
    assert torch.equal(torch.get_rng_state(), before)


def test_refusals_under_torchrun_name_the_launcher(monkeypatch):
    """Under torchrun the process count is the launcher's: a refusal advising --nproc 1 sent users to
    a flag they had not given (QA)."""
    from ppl_vae.inference.distributed import check_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    vae, _, _ = tiny("bernoulli_mlp", "diagonal_normal")
    with pytest.raises(ConfigError) as info:
        check_compatible(vae, TrainConfig(objective="capacity"), world_size=2)
    assert str(info.value).endswith("2 torchrun processes: launch it as one process (without torchrun)")
    assert "nproc" not in str(info.value)
    ladder, _, _ = tiny("ladder", "diagonal_normal")
    with pytest.raises(ConfigError, match="with 2 torchrun processes would normalise") as bn:
        check_compatible(ladder, TrainConfig(), model="ladder", world_size=2)
    assert "nproc" not in str(bn.value)
    with pytest.raises(ConfigError) as method:
        check_config(TrainConfig(method="wake-sleep"), 2)
    assert "(2 torchrun processes): it needs" in str(method.value) and "nproc" not in str(method.value)


@pytest.mark.parametrize("prior", PRIORS.names())
@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_trains_every_prior_or_refuses_it(method, prior, one_thread):
    """Each method with each prior on the MLP VAE is refused up front in one line, or its first
    step moves every parameter, the prior's own (mixture means, pseudo-inputs, flow weights)
    included. QA: mcem with the flow prior was accepted and then failed at its first step ("backward
    through the graph a second time"): its M-steps scored the same z again through the flow's
    cache of (x, y) pairs, whose graph the first backward had freed."""
    vae, x, _ = _tiny_with_prior("gaussian_mlp", "diagonal_normal", prior)
    config = TrainConfig(method=method, lr=1e-2, device="cpu")
    try:
        check_compatible(vae, config, model="gaussian_mlp")
    except ConfigError as exc:
        assert "\n" not in str(exc), exc
        return
    stepper = make_stepper(vae, config)
    before = {name: p.detach().clone() for name, p in vae.named_parameters() if p.requires_grad}
    torch.manual_seed(3)
    stepper.step(x, num_data=N)
    still = [name for name, p in vae.named_parameters() if name in before and torch.equal(p, before[name])]
    assert not still, (method, prior, still)


def test_method_options_under_an_objective_are_refused_in_plain_words():
    vae, _, _ = tiny("bernoulli_mlp", "diagonal_normal")
    config = TrainConfig(objective="beta_vae", beta=2.0, method_options={"sa_steps": 2})
    with pytest.raises(ConfigError) as info:
        check_compatible(vae, config, model="bernoulli_mlp")
    assert "options of the own loss of method 'svi', which objective 'beta_vae' replaces" in str(info.value)
    assert "''" not in str(info.value)  # QA: "method 'svi''s own loss"
