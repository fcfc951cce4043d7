"""Plain dataclass configs that round-trip through JSON (a run directory's ``config.json``).

Reading is strict: an unknown key, a missing section or a value of the wrong type is refused
with a :class:`~ppl_vae.errors.ConfigError` that names the field (``train.lr``), so a damaged
or hand-edited ``config.json`` never trains something other than what it says. Fields missing
*inside* a section take their defaults, so configs written before a field existed still load.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Type, TypeVar

from ppl_vae.errors import ConfigError

T = TypeVar("T")


@dataclass
class ModelConfig:
    """Which model to build; ``None`` takes the model's own default.

    ``guide``: the family of the amortized q(z|x) (a name from ``ppl_vae.models.GUIDES`` where
    registered; ``"diagonal_normal"`` is AEVB's), with ``guide_options`` for it. ``model_options``
    go to the model's builder (e.g. ``z1_dim``, ``hidden_dims`` of ``two_layer``).
    """

    model: str = "gaussian_mlp"
    prior: str = "standard_normal"
    likelihood: Optional[str] = None
    latent_dim: Optional[int] = None
    hidden_dim: Optional[int] = None
    prior_options: Dict[str, Any] = field(default_factory=dict)
    likelihood_options: Dict[str, Any] = field(default_factory=dict)
    guide: str = "diagonal_normal"
    guide_options: Dict[str, Any] = field(default_factory=dict)
    model_options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Which data to load (see :func:`ppl_vae.data.load_dataset`)."""

    dataset: str = "digits"
    data_dir: Optional[str] = None
    binarize: str = "none"
    test_fraction: float = 0.2
    split_seed: int = 0
    train_size: Optional[int] = None
    num_images: Optional[int] = None  # dsprites: size of the seeded random subset (None: 10,000)
    labels: Optional[int] = None  # keep this many training labels, balanced per class (semi-supervised)
    label_seed: int = 0  # which ones (see ppl_vae.data.labels.keep_labels)


@dataclass
class TrainConfig:
    """How to train: method, SVI objective, optimizer, schedule, device.

    ``method``: a name from :data:`ppl_vae.inference.training.METHODS` ("svi" is AEVB).
    ``elbo``: "trace" (AEVB's SGVB estimator A, Trace_ELBO) or "mean_field" (estimator B,
    analytic KL where one exists, TraceMeanField_ELBO). ``compile``: a ``torch.compile``
    backend ("inductor" is torch's default) for the fused SVI loss, or None (not compiled);
    it replaces Pyro's torch.jit-based ELBOs. ``kl_warmup_epochs``: the KL weight rises linearly from
    0 to 1 over this many epochs (0: no warm-up). ``fused_elbo``: for VAEs whose model and guide
    are the base class's, compute the same estimator without Pyro's tracing (faster, equal
    values; see :mod:`ppl_vae.inference.fused`); False always goes through Pyro.
    ``finite_check``: when SVI checks that the loss is finite — "step" (before every update,
    one host-device sync per step), "epoch" (tracked on the device, checked at each epoch's
    end: no per-step sync, but updates after a NaN step are wasted), "auto" (step on CPU,
    epoch on CUDA). Either way a NaN stops training with the step named and the last good
    checkpoint kept.
    ``train_eval_size``: the per-epoch ``train_elbo`` is computed on this many training points,
    a subset drawn once from ``seed`` (``None``: the whole training set). ``test_elbo`` always
    uses the whole test set.

    Training controls (see :func:`ppl_vae.inference.training.train`):
    ``lr_schedule``: the name of a ``torch.optim.lr_scheduler`` class (``"StepLR"``,
    ``"CosineAnnealingLR"``, ``"ReduceLROnPlateau"``, ...) built with ``lr_schedule_options``
    and stepped once per epoch; ``ReduceLROnPlateau`` is stepped with the validation ELBO (it
    needs ``val_fraction`` > 0; ``mode`` defaults to ``"max"``). ``clip_grad_norm``: the total
    gradient norm is clipped to this before every update (None: no clipping).
    ``val_fraction``: this fraction of the training data, drawn with ``seed``, is held out as a
    validation set (its ELBO is the history's ``val_elbo``; the model never trains on it).
    ``early_stopping_patience``: stop when the validation ELBO has not improved for this many
    epochs (None: never); with a validation set the best epoch's weights are also kept in
    ``checkpoint-best.safetensors``.
    ``kl_schedule``: the KL weight over the steps: ``"linear"`` (rises from 0 to ``kl_weight``
    over ``kl_warmup_epochs``; 0 epochs: ``kl_weight`` from the start), ``"cyclical"`` (Fu et al.
    2019: cycles of ``kl_cycle_epochs`` epochs, rising linearly over the first ``kl_cycle_ratio``
    of each, then held at ``kl_weight``) or ``"constant"`` (``kl_weight`` throughout).
    ``precision``: ``"fp32"``, or ``"bf16"`` (bfloat16 autocast of the loss; CUDA only).
    ``objective``: what the "svi" method maximizes: "elbo" (the method's own), or a disentangling
    objective from :data:`ppl_vae.inference.disentangle.OBJECTIVES` with its weights — "beta_vae"
    (``beta``), "capacity" (``gamma`` |KL - C|, C rising from 0 to ``capacity_max`` nats between
    ``capacity_start_epoch`` and ``capacity_end_epoch``), "beta_tc" (``tc_alpha``, ``tc_beta``,
    ``tc_gamma`` on mutual information, total correlation and dimension-wise KL, estimated by
    ``tc_estimator`` "mws" or "mss"), "free_bits" (a KL floor of ``free_bits`` nats per latent
    dimension, or per each of ``free_bits_groups`` groups).
    """

    method: str = "svi"
    epochs: int = 100
    batch_size: int = 100
    lr: float = 1e-3
    optimizer: str = "adam"
    elbo: str = "trace"
    num_particles: int = 1
    kl_warmup_epochs: int = 0
    seed: int = 0
    device: str = "auto"
    eval_num_particles: int = 1
    checkpoint_every: int = 1
    fused_elbo: bool = True
    finite_check: str = "auto"
    train_eval_size: Optional[int] = 1000
    compile: Optional[str] = None
    lr_schedule: Optional[str] = None
    lr_schedule_options: Dict[str, Any] = field(default_factory=dict)
    clip_grad_norm: Optional[float] = None
    val_fraction: float = 0.0
    early_stopping_patience: Optional[int] = None
    kl_schedule: str = "linear"
    kl_weight: float = 1.0
    kl_cycle_epochs: int = 10
    kl_cycle_ratio: float = 0.5
    precision: str = "fp32"
    # Disentangling objectives (ppl_vae.inference.disentangle; "elbo" is the method's own).
    objective: str = "elbo"
    beta: float = 1.0
    capacity_max: float = 25.0
    capacity_start_epoch: float = 0.0
    capacity_end_epoch: float = 10.0
    gamma: float = 1000.0
    tc_alpha: float = 1.0
    tc_beta: float = 1.0
    tc_gamma: float = 1.0
    tc_estimator: str = "mws"
    free_bits: float = 0.0
    free_bits_groups: Optional[int] = None


@dataclass
class RunConfig:
    """Everything needed to rebuild and continue a run.

    ``plugins``: modules imported before the run's parts are looked up (they register custom
    models, priors, likelihoods, ...), so evaluate/compare/resume see the same parts as fit.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    plugins: List[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from None
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Any) -> "RunConfig":
        """A RunConfig from plain data; unknown keys, missing sections and wrong types are refused."""
        if not isinstance(raw, dict):
            raise ConfigError("config must be a JSON object")
        sections = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
        unknown = sorted(set(raw) - set(sections) - {"plugins"})
        if unknown:
            raise ConfigError(
                f"config has unknown key(s): {', '.join(unknown)}; valid: {', '.join([*sections, 'plugins'])}"
            )
        missing = [name for name in sections if name not in raw]
        if missing:
            raise ConfigError(f"config lacks section(s): {', '.join(missing)}")
        plugins = raw.get("plugins", [])
        _check_type("plugins", plugins, List[str])
        return cls(
            **{name: _from_dict(kind, raw[name], name) for name, kind in sections.items()}, plugins=list(plugins)
        )


def _from_dict(cls: Type[T], raw: Any, section: str) -> T:
    if not isinstance(raw, dict):
        raise ConfigError(f"config section {section!r} must be a JSON object", field=section)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"config section {section!r} has unknown key(s): {', '.join(unknown)}", field=section)
    for key, value in raw.items():
        _check_type(f"{section}.{key}", value, hints[key])
    return cls(**raw)


def _check_type(name: str, value: Any, hint: Any) -> None:
    """Raise ConfigError unless the JSON value ``value`` fits the type hint ``hint``."""
    if not _fits(value, hint):
        raise ConfigError(f"{name} must be {_describe(hint)}, got {json.dumps(value)}", field=name)


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # JSON has no int/float split; NaN and infinities are never a setting
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, List):
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin in (dict, Dict):
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    raise AssertionError(f"unhandled config type {hint!r}")  # pragma: no cover - a new field's type


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    if origin in (list, List):
        return "a list of " + {str: "strings", int: "integers", float: "numbers"}.get(args[0], str(args[0]))
    if origin in (dict, Dict):
        return "an object"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(hint, str(hint))
