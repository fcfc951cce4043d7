"""What models, guides, methods and objectives need and offer, and the one check of a combination.

A model (with its guide family) *offers* capabilities, derived from what it declares
(``has_fast_path``, ``encoder_is_guide``, ``enumerated_sites``, ``kl_weight_per_site``,
``Prior.uses_encoder``; never from which class a method came from). A training method or
objective (a :class:`~ppl_vae.inference.training.Stepper` class) declares what it
``requires``, whether it runs ``data_parallel``, whether it is ``compilable``, which
method-specific ``train`` fields it ``uses`` and, for an objective, the ``methods`` it composes
with. :func:`check_compatible` compares the two before anything is built or written, for
``fit``, ``fit --resume``, ``--nproc`` and torchrun alike, and refuses a mismatch in one line
that names both sides. A new registry entry is covered by declaring these, nothing else.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, FrozenSet, Optional, Tuple

import torch

from ppl_vae.config import TrainConfig, declarations, replace_between
from ppl_vae.errors import ConfigError
from ppl_vae.registry import Registry

#: ``train`` fields that only some methods or objectives read (each declares those it does in
#: ``Stepper.uses``); a non-default value of one that the chosen one does not read is refused.
METHOD_FIELDS = ("elbo", "num_particles", "fused_elbo", "kl_warmup_epochs", "kl_schedule", "kl_weight")
#: the fields of the KL weight's schedule (a method without a KL term reads none of them)
KL_FIELDS = frozenset({"kl_warmup_epochs", "kl_schedule", "kl_weight"})

#: ``train.method`` -> a :class:`~ppl_vae.inference.training.Stepper` class
# Stepper lives in training.py, which imports this module: the registries hold its classes as Any
METHODS: Registry[Any] = Registry("method")

#: ``train.objective`` -> a Stepper class; "elbo" is the method's own objective, the disentangling
#: ones live in :mod:`ppl_vae.inference.disentangle`. An objective class declares the ``methods``
#: it composes with.
OBJECTIVES: Registry[Any] = Registry("objective")
OBJECTIVES.register("elbo", doc="the training method's own objective (svi: the ELBO)")(None)


def stepper_class(config: TrainConfig) -> Any:
    """The Stepper class that ``config.method`` and ``config.objective`` name."""
    objective = OBJECTIVES.get(config.objective)
    return METHODS.get(config.method) if objective is None else objective


#: the largest latent dimension MCEM's HMC E-step is meant for (AEVB appendix E, figure 3)
MAX_MCEM_LATENT_DIM = 20


def _factorized_prior(vae) -> bool:
    prior = getattr(vae, "prior", None)
    if prior is None:
        return False
    prior = prior()
    return (
        isinstance(prior, torch.distributions.Independent)
        and isinstance(prior.base_dist, torch.distributions.Normal)
        and prior.reinterpreted_batch_ndims == 1
    )


def _fast_path(vae) -> bool:
    from ppl_vae.inference.latents import declares_fast_path

    return declares_fast_path(vae)


def _declared(name: str, default):
    """A capability read from a declared attribute; a pair written by hand that declares nothing
    offers the conservative default (a module that is no :class:`~ppl_vae.models.VAE` at all)."""
    return lambda vae: getattr(vae, name, default)


#: capability -> (what it means, read in an error as "needs a model whose ...", how a model offers it)
CAPABILITIES: Dict[str, Tuple[str, Callable[[Any], bool]]] = {
    "fast_path": (
        "model and guide offer per-datapoint log densities and guide draws (has_fast_path)",
        _fast_path,
    ),
    "enumerated_fast_path": (
        "discrete sites are summed out in one batched tensor computation (has_enumerated_fast_path)",
        lambda vae: (
            bool(_declared("has_enumerated_fast_path", False)(vae))
            and bool(tuple(_declared("enumerated_sites", ())(vae)))
            and callable(getattr(vae, "enumerated_elbo", None))
        ),
    ),
    "encoder_guide": (
        "guide is the encoder's Gaussian (encoder_is_guide; not a flow, not a hierarchy's chain)",
        lambda vae: bool(_declared("encoder_is_guide", False)(vae)),
    ),
    "reparameterized": (
        "latent sites are all continuous and reparameterized (no enumerated discrete site)",
        lambda vae: not tuple(_declared("enumerated_sites", ())(vae)),
    ),
    "one_kl_weight": (
        "latent sites share one KL weight (no per-layer warm-up, kl_weight_per_site)",
        lambda vae: not _declared("kl_weight_per_site", False)(vae),
    ),
    "prior_apart_from_encoder": (
        "prior does not evaluate the encoder (Prior.uses_encoder is False; the VampPrior does)",
        lambda vae: hasattr(vae, "prior") and not getattr(vae.prior, "uses_encoder", True),
    ),
    "factorized_prior": (
        "prior has independent latent dimensions (a diagonal Normal)",
        _factorized_prior,
    ),
    "small_latent": (
        f"latent dimension is at most {MAX_MCEM_LATENT_DIM} (an HMC E-step per datapoint)",
        lambda vae: getattr(vae, "latent_dim", MAX_MCEM_LATENT_DIM + 1) <= MAX_MCEM_LATENT_DIM,
    ),
}


def model_capabilities(vae) -> FrozenSet[str]:
    """The capabilities ``vae`` (a model with its guide) offers."""
    return frozenset(name for name, (_, offers) in CAPABILITIES.items() if offers(vae))


def offers(vae, *names: str) -> bool:
    """Whether ``vae`` offers every capability ``names`` (read as :data:`CAPABILITIES` reads it:
    the one place a declared flag is read)."""
    return all(CAPABILITIES[name][1](vae) for name in names)


def describe_model(vae, model: Optional[str] = None, guide: Optional[str] = None) -> str:
    """``model 'two_layer' (guide 'diagonal_normal')`` or the class name where the names are unknown."""
    if model is None:
        return f"model {type(vae).__name__}"
    return f"model {model!r}" + (f" with guide {guide!r}" if guide not in (None, "diagonal_normal") else "")


def _side(config: TrainConfig) -> str:
    return f"method {config.method!r}" if config.objective == "elbo" else f"objective {config.objective!r}"


def check_compatible(
    vae,
    config: TrainConfig,
    *,
    world_size: int = 1,
    num_train: Optional[int] = None,
    model: Optional[str] = None,
    guide: Optional[str] = None,
    stepper: Any = None,
) -> Any:
    """Raise :class:`ConfigError` (one line naming both sides) unless ``config``'s method and
    objective can train ``vae`` as configured; returns the stepper class.

    Checked: the objective composes with the method; the model offers every capability the
    method or objective requires; ``train.compile`` only for a compilable loss; ``world_size``
    > 1 only for a data-parallel step; a method-specific field (:data:`METHOD_FIELDS`) set away
    from its default only where the method reads it; and, given ``num_train`` (the points
    trained on, the validation split left out), no minibatch smaller than the objective's estimator can use. ``stepper``: the
    class to check when it is built directly (default: the one ``config`` names).
    """
    cls = stepper_class(config) if stepper is None else stepper
    side = getattr(cls, "label", None) or _side(config)
    what = describe_model(vae, model, guide)
    objective = OBJECTIVES.get(config.objective) if stepper is None else None
    if objective is not None and config.method not in getattr(objective, "methods", ()):
        raise ConfigError(
            f"train.objective {config.objective!r} replaces the loss of method(s) "
            f"{', '.join(map(repr, objective.methods))} only; train.method is {config.method!r}",
            field="train.objective",
        )
    if stepper is None:
        _check_options(config, objective)
    offered = model_capabilities(vae)
    for need in sorted(cls.requires(config) - offered):
        raise ConfigError(
            f"{side} needs a model whose {CAPABILITIES[need][0]}; {what} is not such a model",
            field="train.objective" if objective is not None else "train.method",
        )
    if config.compile is not None and not cls.compiles(vae, config):
        raise ConfigError(
            f"train.compile applies to a loss written in plain torch; {side} on {what} runs through Pyro's "
            "traces, which torch.compile cannot capture: drop train.compile",
            field="train.compile",
        )
    if world_size > 1 and not cls.data_parallel:
        raise ConfigError(
            f"{side} cannot run data-parallel (its step is not one loss over all parameters that DDP can "
            f"average); {processes(world_size)}: {one_process()}",
            field="nproc",
        )
    if world_size > 1 and isinstance(vae, torch.nn.Module) and _has_batch_norm(vae):
        raise ConfigError(
            f"{what} normalises its batches (batch normalisation), and data-parallel training with "
            f"{processes(world_size)} would normalise each process's share of a batch on its own: another gradient than one "
            "process's, and running statistics that differ between processes (torch has no SyncBatchNorm on the "
            f"CPU); {one_process()} (or, for a new run, model option batch_norm=false)",
            field="nproc",
        )
    defaults = TrainConfig()
    for name in METHOD_FIELDS:
        if name not in cls.uses and getattr(config, name) != getattr(defaults, name):
            reason = "it optimizes no KL term" if name in KL_FIELDS else "it does not read it"
            raise ConfigError(
                f"train.{name} does not apply to {side} ({reason}); got {getattr(config, name)!r}, "
                f"leave it at {getattr(defaults, name)!r}",
                field=f"train.{name}",
            )
    if getattr(vae, "kl_weight_per_site", False) and _constant_kl_weight(config) >= 1.0:
        raise ConfigError(
            "model option kl_warmup_fractions sets when each layer's KL weight reaches 1 during a KL warm-up; "
            f"the KL weight is {_constant_kl_weight(config):g} from the first step (train.kl_schedule "
            f"{config.kl_schedule!r}, train.kl_warmup_epochs {config.kl_warmup_epochs}), so it would change "
            "nothing: give train.kl_warmup_epochs > 0 (train.kl_schedule 'linear')",
            field="train.kl_warmup_epochs",
        )
    if config.elbo == "mean_field" and "elbo" in cls.uses and offers(vae, "reparameterized"):  # else enumerated
        reason = _no_closed_form_kl(vae, traced=not cls.computes_kl_itself(vae, config))
        if reason:
            raise ConfigError(
                f"train.elbo 'mean_field' (AEVB's estimator B, the KL in closed form) does not apply to {what}: "
                f"{reason}; use train.elbo 'trace'",
                field="train.elbo",
            )
    if config.elbo == "enum" and "elbo" in cls.uses and offers(vae, "reparameterized"):
        raise ConfigError(
            f"train.elbo 'enum' sums out the discrete sites a model declares in enumerated_sites; {what} declares "
            "none (a site marked infer={'enumerate': 'parallel'} must be declared there too), so it would train "
            "as train.elbo 'trace': use 'trace'",
            field="train.elbo",
        )
    min_batch = getattr(cls, "min_batch_size", 1)
    if num_train is not None and min_batch > 1:
        _check_last_batch(config, num_train, min_batch, side, world_size)
    return cls


def _constant_kl_weight(config: TrainConfig) -> float:
    """The KL weight when it never changes during training (no warm-up, no cycle), else -inf."""
    if config.kl_schedule == "constant" or (config.kl_schedule == "linear" and config.kl_warmup_epochs == 0):
        return float(config.kl_weight)
    return float("-inf")


def closed_form_kl(vae) -> bool:
    """Whether the KL of the encoder's Gaussian q(z|x) to the prior is known in closed form (torch's
    ``kl_divergence``), which is what a loss that computes the KL itself (the fused ELBO, the
    disentangling objectives) needs for estimator B: an encoder guide and a prior with a KL."""
    if not offers(vae, "encoder_guide") or not hasattr(vae, "prior"):
        return False
    from pyro import distributions as dist

    prior = vae.prior()
    param = next(iter(vae.parameters()), None)
    loc = torch.zeros(prior.event_shape, device=None if param is None else param.device)
    try:
        torch.distributions.kl_divergence(dist.Normal(loc, 1.0).to_event(1), prior)
    except NotImplementedError:
        return False
    return True


def _no_closed_form_kl(vae, traced: bool) -> str:
    """Why no latent site's KL would be in closed form ("" when one is): on Pyro's traces,
    TraceMeanField_ELBO's own rule for each site (``kl_divergence`` of the guide's distribution
    to the model's, probed on two zero datapoints); else :func:`closed_form_kl`."""
    if not traced:
        return (
            ""
            if closed_form_kl(vae)
            else "its prior has no closed-form KL from the encoder's Gaussian (estimator A would train)"
        )
    import pyro.poutine as poutine
    from pyro.poutine.util import site_is_subsample
    from torch.distributions import kl_divergence

    shape = tuple(getattr(vae, "event_shape", ()) or ())
    if not shape:
        return ""  # a pair written by hand without an event shape: not probed
    param = next(iter(vae.parameters()), None)
    x = torch.zeros((2, *shape), device=None if param is None else param.device)
    kwargs = {"y": torch.zeros(2, dtype=torch.long, device=x.device)} if getattr(vae, "num_classes", None) else {}
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():  # the caller's random stream untouched
        guide = poutine.trace(vae.guide).get_trace(x, **kwargs)
        model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x, **kwargs)
    sites = [
        n for n, s in model.nodes.items() if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
    ]
    order = [n for n in guide.nodes if n in sites]
    if order != sites:  # TraceMeanField_ELBO's own requirement (it only warns): else a biased objective
        return (
            f"its guide samples {', '.join(order)} and its model {', '.join(sites)}, and a KL in closed form "
            "given the sampled parents needs the model's order (Pyro's mean-field restriction; else a biased objective)"
        )
    for name in sites:
        try:
            kl_divergence(guide.nodes[name]["fn"], model.nodes[name]["fn"])
            return ""
        except (NotImplementedError, KeyError):
            continue
    return (
        f"at no latent site ({', '.join(sites)}) is the KL of the guide's distribution to the model's known "
        "(estimator A would train)"
    )


def _check_options(config: TrainConfig, objective: Any) -> None:
    """``train.method_options`` against the method's keyword-only constructor parameters (their
    annotations give types and ranges, as a model builder's do), ``train.objective_options``
    against the objective's."""
    from ppl_vae.models.zoo import check_keyword_options

    checks = [("method_options", f"method {config.method!r}", METHODS.get(config.method), config.method_options)]
    if objective is not None:
        checks.append(("objective_options", f"objective {config.objective!r}", objective, config.objective_options))
    elif config.objective_options:
        raise ConfigError(
            "train.objective_options: options of an objective that replaces the method's loss, but train.objective is 'elbo'",
            field="train.objective_options",
        )
    for name, owner, cls, options in checks:
        if objective is not None and name == "method_options" and options:
            raise ConfigError(
                f"train.method_options are options of the own loss of {owner}, which objective "
                f"{config.objective!r} replaces; give the objective's options as train.objective_options",
                field="train.method_options",
            )
        try:
            check_keyword_options(owner, cls.__init__, options)
        except ValueError as exc:
            raise ConfigError(f"train.{name}: {exc}", field=f"train.{name}") from None


def _under_torchrun() -> bool:
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def processes(world_size: int) -> str:
    """The process count as the user set it: torchrun's (WORLD_SIZE set above 1), else ``--nproc``."""
    return f"{world_size} torchrun processes" if _under_torchrun() else f"nproc {world_size}"


def one_process() -> str:
    """How to train in one process: under torchrun the count is the launcher's, not ``--nproc``'s."""
    return "launch it as one process (without torchrun)" if _under_torchrun() else "use nproc 1"


def _has_batch_norm(vae: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in vae.modules())


def _check_last_batch(config: TrainConfig, num_train: int, min_batch: int, side: str, world_size: int) -> None:
    batch = min(config.batch_size, num_train)
    last = num_train % batch or batch
    if batch < min_batch or last < min_batch:
        size = batch if batch < min_batch else last
        raise ConfigError(
            f"{side} needs minibatches of at least {min_batch} points; train.batch_size {config.batch_size} "
            f"on {num_train} training points leaves one of {size}: choose a batch size that leaves no remainder "
            f"below {min_batch}",
            field="train.batch_size",
        )


DECLARATIONS_BEGIN = "<!-- declarations table: generated by ppl_vae.inference.capabilities.declarations_table -->"
DECLARATIONS_END = "<!-- end of declarations table -->"


def declarations_table() -> str:
    """A markdown table of every registered method and objective: what it needs of a model, the
    method-specific settings it reads, whether it runs data-parallel and compiles, its own options
    (from its constructor's keyword-only parameters), read from the declarations themselves."""
    import inspect

    from ppl_vae.models.zoo import _option_hints, describe_type

    rows = [
        "| name | kind | needs a model whose ... | reads | data-parallel | compiles | its options |",
        "|---|---|---|---|---|---|---|",
    ]
    entries = [("method", n, METHODS.get(n)) for n in METHODS.names()]
    entries += [("objective", n, OBJECTIVES.get(n)) for n in OBJECTIVES.names() if OBJECTIVES.get(n) is not None]
    for kind, name, cls in entries:
        needs = "; ".join(CAPABILITIES[c][0] for c in sorted(cls.requires(TrainConfig()))) or "anything"
        reads = ", ".join(f"`{f}`" for f in METHOD_FIELDS if f in cls.uses) or "none"
        if kind == "objective":
            needs += f" (objective of {', '.join(map(repr, cls.methods))})"
        compiles = cls.compile_note or ("yes" if cls.compilable else "no")
        hints = _option_hints(cls.__init__)
        params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]
        own = [f"`{p.name}` ({describe_type(hints.get(p.name, Any))}, {p.default!r})" for p in params]
        # a built-in objective's weights are config fields declared to apply to it (docs/options.md)
        fields = [
            f"`{d.flag}`"
            for d in declarations(("train",))
            if kind == "objective"
            and d.option.applies is not None
            and d.option.applies.field == "train.objective"
            and d.option.applies.test(name)
        ]
        options = ", ".join(own + fields) or "none"
        rows.append(
            f"| `{name}` | {kind} | {needs} | {reads} | {'yes' if cls.data_parallel else 'no'} | {compiles} | {options} |"
        )
    return "\n".join(rows) + "\n"


def render_declarations_doc(text: str) -> str:
    """``text`` with the part between the declarations table's markers replaced by :func:`declarations_table`."""
    return replace_between(text, DECLARATIONS_BEGIN, DECLARATIONS_END, declarations_table(), "declarations table")


__all__ = [
    "CAPABILITIES",
    "KL_FIELDS",
    "MAX_MCEM_LATENT_DIM",
    "METHODS",
    "METHOD_FIELDS",
    "OBJECTIVES",
    "check_compatible",
    "declarations_table",
    "describe_model",
    "model_capabilities",
    "offers",
    "stepper_class",
]
