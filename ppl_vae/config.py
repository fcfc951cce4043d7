"""Plain dataclass configs that round-trip through JSON (a run directory's ``config.json``).

Every setting is **declared once**, as its dataclass field made with :func:`option`: the field's
annotation is its type; the declaration gives its default, help text, ``ppl-vae fit`` flag, the
values it allows (:class:`Range`, :class:`OneOf`) and what it applies to (:class:`Applies`). The
CLI's options (:func:`ppl_vae.cli.options.config_options`), the checks (:func:`check_config`) and
the docs table (:func:`options_table`, docs/options.md) are generated from these declarations.

Reading is strict: an unknown key, a missing section or a value of the wrong type is refused
with a :class:`~ppl_vae.errors.ConfigError` that names the field (``train.lr``), so a damaged
or hand-edited ``config.json`` never trains something other than what it says. Fields missing
*inside* a section take their defaults, so configs written before a field existed still load.
A config built in Python has its types checked when it is made (``TrainConfig(lr="fast")`` is
refused); :func:`check_config` adds the ranges and what each field applies to: a field set away
from its default where it does not apply (``beta`` with objective ``elbo``) is an error.

Importing this module imports neither torch nor click.
"""

from __future__ import annotations

import json
import math
import re
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Type,
    TypeVar,
    Union,
)

from ppl_vae.errors import ConfigError

T = TypeVar("T")

#: the key of a dataclass field's ``metadata`` that holds its :class:`Option`
OPTION = "ppl_vae.option"
FLOAT32_MAX = 3.4028234663852886e38  # float32 parameters: a larger learning rate overflows in the optimizer


# -- how a setting is declared ---------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """The numbers a field allows: ``low``/``high`` bound it (None: unbounded), ``low_open`` /
    ``high_open`` exclude the bound itself; ``high_why`` says where an upper bound comes from.
    A float must also be finite."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    high_why: str = ""

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def bounds(self) -> str:
        """``"> 0"``, ``">= 1"``, ``"in (0, 1]"``, ``"<= 5"`` (empty when unbounded; an upper bound
        with its own reason, ``high_why``, is left to :meth:`describe`)."""
        if self.low is not None and self.high is not None and not self.high_why:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None and not self.high_why:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return ""

    def describe(self, is_float: bool, upper: bool = True) -> str:
        """What ``must be`` says: ``"a positive number"``, ``">= 1"``, ``"a finite number in (0, 1]"``
        (``upper=False``: without an upper bound that has its own reason)."""
        if is_float and self.low == 0 and self.low_open and (self.high is None or self.high_why):
            text = "a positive number"
        elif is_float and not (self.low is not None and self.high is not None and not self.high_why):
            text = f"a finite number {self.bounds()}".rstrip()  # an interval says it is finite
        else:
            text = self.bounds() or "an integer"
        if upper and self.high is not None and self.high_why:
            text += f", at most {_short(self.high)} ({self.high_why})"
        return text

    def error(self, value: Any, is_float: bool) -> Optional[str]:
        """What ``must be`` says when ``value`` is outside the range (None: it is inside)."""
        if is_float and not math.isfinite(value):
            return f"a finite number {self.bounds()}".rstrip()
        if value in self:
            return None
        if self.high is not None and self.high_why and value > self.high:
            return f"at most {_short(self.high)} ({self.high_why})"
        return self.describe(is_float, upper=False)


@dataclass(frozen=True)
class OneOf:
    """A string field that takes one of ``values`` (a fixed list; names from a registry that
    plugins extend are checked against the registry instead)."""

    values: Tuple[str, ...]

    def describe(self, is_float: bool = False) -> str:
        return "one of " + ", ".join(self.values)

    def error(self, value: Any, is_float: bool = False) -> Optional[str]:
        return None if value in self.values else self.describe()


Check = Union[Range, OneOf]


@dataclass(frozen=True)
class Applies:
    """What a field applies to: ``test`` of the value of the setting ``field`` (``"train.objective"``)
    holds; ``description`` says it in words (``"objective 'beta_vae'"``) for messages and docs."""

    description: str
    field: str
    test: Callable[[Any], bool]

    def __call__(self, config: "RunConfig") -> bool:
        return bool(self.test(config_value(config, self.field)))


def when(setting: str, *values: Any, description: Optional[str] = None) -> Applies:
    """Applies where ``setting`` (``"train.objective"``) is one of ``values``."""
    name = setting.split(".")[-1]
    return Applies(description or f"{name} {' or '.join(map(repr, values))}", setting, lambda v: v in values)


def positive(is_float: bool = True, high: Optional[float] = None, high_why: str = "") -> Range:
    """``> 0`` for a float, ``>= 1`` for an integer."""
    return Range(0.0, high, low_open=True, high_why=high_why) if is_float else Range(1)


NONNEGATIVE = Range(0)
AT_LEAST_1 = Range(1)


@dataclass(frozen=True)
class Option:
    """A field's declaration (see :func:`option`)."""

    help: str
    flag: Optional[str] = ""
    check: Optional[Check] = None
    applies: Optional[Applies] = None
    key: Optional[str] = None
    flag_type: Any = None
    from_flag: Optional[Callable[[Any], Any]] = None
    metavar: Optional[str] = None
    multiple: bool = False
    resumable: bool = False


def option(
    default: Any = MISSING,
    *,
    help: str,
    default_factory: Any = MISSING,
    flag: Optional[str] = "",
    check: Optional[Check] = None,
    applies: Optional[Applies] = None,
    key: Optional[str] = None,
    flag_type: Any = None,
    from_flag: Optional[Callable[[Any], Any]] = None,
    metavar: Optional[str] = None,
    multiple: bool = False,
    resumable: bool = False,
) -> Any:
    """Declare a config field: ``name: TYPE = option(DEFAULT, help=..., check=..., applies=...)``.

    ``flag``: the ``ppl-vae fit`` flag ("": ``--`` and the name with dashes; None: no flag, set
    it in Python or config.json). ``check``: the values allowed (a :class:`Range` or
    :class:`OneOf`). ``applies``: what the field applies to (:func:`when`, :class:`Applies`);
    set away from its default elsewhere, it is an error. ``key``: the flag sets this key of a
    dict field (``--num-components`` fills ``prior_options["num_components"]``); the check and
    the rule then concern that key. ``flag_type``: the flag's type where it differs from the
    field's; ``from_flag``: turns the flag's value into the field's (a ValueError names the
    field). ``metavar``, ``multiple``: as click's. ``resumable``: ``fit --resume`` may change it.
    """
    meta = {
        OPTION: Option(
            help=help,
            flag=flag,
            check=check,
            applies=applies,
            key=key,
            flag_type=flag_type,
            from_flag=from_flag,
            metavar=metavar,
            multiple=multiple,
            resumable=resumable,
        )
    }
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# -- what the flags' values become -------------------------------------------------------------------


def zero_is_none(value: Optional[int]) -> Optional[int]:
    """``--train-eval-size 0``: the whole training set (None)."""
    return value or None


def loads(text: str) -> Any:
    """``json.loads``, with JSON nested too deeply for Python's parser as a one-line ValueError
    (a RecursionError, which no ValueError handler catches, gave a traceback)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("is JSON nested too deeply") from None


def json_object(text: Optional[str]) -> Dict[str, Any]:
    """A JSON object given as text (None: ``{}``)."""
    if text is None:
        return {}
    try:
        value = loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"must be a JSON object, got {text}")
    return value


def key_values(items: Sequence[str]) -> Dict[str, Any]:
    """``KEY=VALUE`` strings -> {KEY: VALUE}, VALUE read as JSON (a bare word stays a string)."""
    out: Dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"must be KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def keyword_options(flag: str, help: str) -> Any:
    """A dict of keyword options for a builder or constructor, given as repeatable ``FLAG KEY=VALUE``
    (VALUE read as JSON); what they may be is declared by the function they go to."""
    return option(
        default_factory=dict,
        help=help,
        flag=flag,
        flag_type=str,
        from_flag=key_values,
        metavar="KEY=VALUE",
        multiple=True,
    )


def _one_key(key: str) -> Callable[[Any], Dict[str, Any]]:
    return lambda value: {} if value is None else {key: value}


# -- what settings apply to ----------------------------------------------------------------------------


def _uses_labels(model: Any) -> bool:
    """Whether the registered model ``model`` declares that it trains on labels
    (:attr:`ppl_vae.models.zoo.ModelSpec.uses_labels`); an unknown name is refused naming the valid ones."""
    from ppl_vae.models import MODELS  # at check time only: the model zoo imports torch

    return MODELS.get(model).uses_labels


# The built-in priors whose constructor takes num_components (ppl_vae.models.priors).
COMPONENT_PRIORS = ("mixture_of_gaussians", "vamp")

#: the optimizers that take Adam's eps and betas (train.adam_eps, adam_beta1, adam_beta2): Adam and
#: Adamax (Kingma & Ba 2015, section 7.1); declared here once, read by the optimizer's construction
#: (ppl_vae.inference.training.optimizer_options) and by these fields' applies-to rule
ADAM_FAMILY = ("adam", "adamax")
_ADAM = when("train.optimizer", *ADAM_FAMILY)
_UNIT_OPEN_ABOVE = Range(0.0, 1.0, high_open=True)
_BETA_VAE = when("train.objective", "beta_vae")
_CAPACITY = when("train.objective", "capacity")
_BETA_TC = when("train.objective", "beta_tc")
_FREE_BITS = when("train.objective", "free_bits")
# The models that train on partly labelled data (data.labels, data.label_seed): each declares it
# (ModelSpec.uses_labels), so a plugin model may too; m2 is the built-in one.
_LABELLED = Applies("a model that trains on labels (m2)", "model.model", _uses_labels)


# -- the configs -----------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Which model to build; ``None`` takes the model's own default.

    ``guide``: the family of the amortized q(z|x) (a name from ``ppl_vae.models.GUIDES`` where
    registered; ``"diagonal_normal"`` is AEVB's), with ``guide_options`` for it. ``model_options``
    go to the model's builder (e.g. ``z1_dim``, ``hidden_dims`` of ``two_layer``).
    """

    model: str = option("gaussian_mlp", help="Registered model (see `ppl-vae models`).")
    prior: str = option(
        "standard_normal", help="Prior over z: standard_normal, mixture_of_gaussians, vamp, flow or a plugin's."
    )
    likelihood: Optional[str] = option(None, help="Likelihood of x (default: the model's own).")
    latent_dim: Optional[int] = option(None, help="Size of z (default: the model's).", check=AT_LEAST_1)
    hidden_dim: Optional[int] = option(None, help="Hidden units per layer (default: the model's).", check=AT_LEAST_1)
    prior_options: Dict[str, Any] = option(
        default_factory=dict,
        help="Components of the mixture_of_gaussians or vamp prior (the prior's option num_components; "
        "other prior options: Python or config.json).",
        flag="--num-components",
        key="num_components",
        flag_type=int,
        from_flag=_one_key("num_components"),
        check=AT_LEAST_1,
        applies=when("model.prior", *COMPONENT_PRIORS, description=f"prior {' or '.join(map(repr, COMPONENT_PRIORS))}"),
    )
    likelihood_options: Dict[str, Any] = option(
        default_factory=dict, help="Options of the likelihood's constructor.", flag=None
    )
    guide: str = option(
        "diagonal_normal",
        help="Family of the amortized q(z|x): diagonal_normal (AEVB) or a flow (see `ppl-vae models`).",
    )
    guide_options: Dict[str, Any] = option(default_factory=dict, help="Options of the guide family.", flag=None)
    model_options: Dict[str, Any] = keyword_options(
        "--model-option",
        "An option of the model's builder, VALUE in JSON (e.g. z1_dim=64, hidden_dims='[[64],[32]]', "
        "kl_warmup_fractions='[0.5,1]'); repeatable. See `ppl-vae models`.",
    )

    def __post_init__(self) -> None:
        check_types(self, "model")


@dataclass
class DataConfig:
    """Which data to load (see :func:`ppl_vae.data.load_dataset`)."""

    dataset: str = option(
        "digits",
        help="digits (embedded), mnist, fashion-mnist, frey-face, dsprites (generated), or a .npy/.npz/.csv path.",
    )
    data_dir: Optional[str] = option(
        None, help="Folder holding the dataset's files (a new run records a relative path as absolute).", metavar="PATH"
    )
    binarize: str = option(
        "none",
        help="none, dynamic (x ~ Bernoulli(pixel), drawn each epoch) or threshold (x > 0.5).",
        check=OneOf(("none", "dynamic", "threshold")),
    )
    test_fraction: float = option(
        0.2,
        help="Held-out share when the source has no test split (seeded by split_seed).",
        flag=None,
        check=Range(0.0, 1.0, low_open=True, high_open=True),
    )
    split_seed: int = option(0, help="Seed of the train/test split.", flag=None, check=NONNEGATIVE)
    train_size: Optional[int] = option(None, help="Use only the first N training points.", check=AT_LEAST_1)
    num_images: Optional[int] = option(
        None,
        help="dsprites: render (or read) a seeded random subset of this many images (default 10,000).",
        check=AT_LEAST_1,
        applies=when("data.dataset", "dsprites"),
    )
    labels: Optional[int] = option(
        None,
        help="Semi-supervised (m2): keep N training labels, balanced per class, the rest unlabelled.",
        check=AT_LEAST_1,
        applies=_LABELLED,
    )
    label_seed: int = option(
        0,
        help="Which N points keep labels (--labels; see ppl_vae.data.labels.keep_labels).",
        check=NONNEGATIVE,
        applies=Applies("a semi-supervised split (labels N)", "data.labels", lambda v: v is not None),
    )

    def __post_init__(self) -> None:
        check_types(self, "data")
        for name in ("dataset", "data_dir"):  # "" would read the current folder, wherever a command runs
            value = getattr(self, name)
            if isinstance(value, str) and not value.strip():
                raise ConfigError(f"data.{name} is an empty name; give a path (or null)", field=f"data.{name}")


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

    Each field's range and what it applies to are declared with it (docs/options.md).
    """

    method: str = option("svi", help="Training method: svi (AEVB); see `ppl-vae models` for the others.")
    epochs: int = option(100, help="Epochs to train (a resume may raise it).", check=NONNEGATIVE, resumable=True)
    batch_size: int = option(100, help="Datapoints per minibatch.", check=AT_LEAST_1)
    lr: float = option(
        1e-3,
        help="Learning rate.",
        check=positive(high=FLOAT32_MAX, high_why="the largest float32"),
        resumable=True,
    )
    optimizer: str = option("adam", help="adam, adamax, adagrad or sgd (see `ppl-vae models`).", resumable=True)
    adam_eps: float = option(
        1e-8,
        help="Adam's (and Adamax's) epsilon (torch's default 1e-8; Burda et al. 2015 train with 1e-4).",
        check=positive(),
        applies=_ADAM,
    )
    adam_beta1: float = option(
        0.9,
        help="Adam's (and Adamax's) beta1, the decay of its first-moment average.",
        check=_UNIT_OPEN_ABOVE,
        applies=_ADAM,
    )
    adam_beta2: float = option(
        0.999,
        help="Adam's beta2, the decay of its second-moment average (Adamax's: of its infinity norm).",
        check=_UNIT_OPEN_ABOVE,
        applies=_ADAM,
    )
    weight_decay: float = option(
        0.0, help="L2 weight decay of the optimizer (every optimizer takes it).", check=NONNEGATIVE
    )
    elbo: str = option(
        "trace",
        help="trace (SGVB estimator A, Monte Carlo KL), mean_field (estimator B, analytic KL) or enum "
        "(discrete sites summed out; what trace means for M2 and the GMVAE).",
    )
    num_particles: int = option(1, help="Samples of z per datapoint per step.", check=AT_LEAST_1)
    kl_warmup_epochs: int = option(
        0,
        help="Epochs over which the KL weight rises to --kl-weight (linear schedule).",
        flag="--kl-warmup",
        check=NONNEGATIVE,
        applies=when("train.kl_schedule", "linear"),
    )
    seed: int = option(0, help="Seed of every random draw.", check=NONNEGATIVE)
    device: str = option(
        "auto", help="cpu, cuda, cuda:N or auto (a resume may move a run: a GPU run on to a CPU).", resumable=True
    )
    eval_num_particles: int = option(
        1, help="Samples of z per datapoint in the per-epoch ELBOs.", flag=None, check=AT_LEAST_1
    )
    checkpoint_every: int = option(1, help="Write a checkpoint every N epochs.", flag=None, check=AT_LEAST_1)
    fused_elbo: bool = option(
        True,
        help="Compute the ELBO without Pyro's tracing where the model offers it (a fast-path pair, or a model "
        "that sums its discrete site in one batched computation): equal values, faster.",
        flag=None,
    )
    finite_check: str = option(
        "auto",
        help="When SVI checks the loss is finite: step, epoch, or auto (step on CPU, epoch on CUDA).",
        flag=None,
        check=OneOf(("auto", "step", "epoch")),
    )
    train_eval_size: Optional[int] = option(
        1000,
        help="Training points (a fixed seeded subset) the per-epoch train ELBO uses; 0 (null in config.json): "
        "all of them.",
        check=AT_LEAST_1,
        from_flag=zero_is_none,
    )
    compile: Optional[str] = option(
        None,
        help="Compile the SVI loss with torch.compile (e.g. inductor); parts-based VAEs only.",
        metavar="BACKEND",
    )
    lr_schedule: Optional[str] = option(
        None,
        help="A torch.optim.lr_scheduler class, stepped per epoch (StepLR, CosineAnnealingLR, ...; "
        "ReduceLROnPlateau watches the validation ELBO).",
        metavar="NAME",
    )
    lr_schedule_options: Dict[str, Any] = option(
        default_factory=dict,
        help="Keyword arguments of the scheduler as a JSON object, e.g. '{\"step_size\": 10}'.",
        flag_type=str,
        from_flag=json_object,
        metavar="JSON",
        applies=Applies("a learning-rate schedule (lr_schedule)", "train.lr_schedule", lambda v: v is not None),
    )
    clip_grad_norm: Optional[float] = option(
        None, help="Clip the total gradient norm to this before each update.", check=positive()
    )
    val_fraction: float = option(
        0.0,
        help="Hold out this fraction of the training data (seeded) for the validation ELBO.",
        check=Range(0.0, 1.0, high_open=True),
    )
    early_stopping_patience: Optional[int] = option(
        None,
        help="Stop after this many epochs without a better validation ELBO (needs --val-fraction).",
        check=AT_LEAST_1,
        applies=Applies("a validation set (val_fraction > 0)", "train.val_fraction", lambda v: v > 0),
    )
    kl_schedule: str = option(
        "linear",
        help="KL weight over the steps: linear (rises over --kl-warmup epochs), cyclical (Fu et al. 2019) or constant.",
    )
    kl_weight: float = option(1.0, help="The KL weight a schedule rises to (or holds, constant).", check=NONNEGATIVE)
    kl_cycle_epochs: int = option(
        10, help="Epochs per cycle (cyclical).", check=AT_LEAST_1, applies=when("train.kl_schedule", "cyclical")
    )
    kl_cycle_ratio: float = option(
        0.5,
        help="Fraction of each cycle over which the weight rises (cyclical).",
        check=Range(0.0, 1.0, low_open=True),
        applies=when("train.kl_schedule", "cyclical"),
    )
    precision: str = option(
        "fp32", help="bf16: bfloat16 autocast of the training loss (CUDA only).", check=OneOf(("fp32", "bf16"))
    )
    # Disentangling objectives (ppl_vae.inference.disentangle; "elbo" is the method's own).
    objective: str = option(
        "elbo",
        help="What svi maximizes: elbo, beta_vae, capacity, beta_tc or free_bits (see docs/disentanglement.md).",
    )
    beta: float = option(1.0, help="beta_vae: the KL weight beta.", check=positive(), applies=_BETA_VAE)
    capacity_max: float = option(
        25.0, help="capacity: the final capacity C, nats.", check=NONNEGATIVE, applies=_CAPACITY
    )
    capacity_start_epoch: float = option(
        0.0, help="capacity: C starts rising from 0 at this epoch.", check=NONNEGATIVE, applies=_CAPACITY
    )
    capacity_end_epoch: float = option(
        10.0, help="capacity: C reaches --capacity-max at this epoch.", check=NONNEGATIVE, applies=_CAPACITY
    )
    gamma: float = option(1000.0, help="capacity: the weight gamma of |KL - C|.", check=positive(), applies=_CAPACITY)
    tc_alpha: float = option(
        1.0, help="beta_tc: weight of the mutual information.", check=NONNEGATIVE, applies=_BETA_TC
    )
    tc_beta: float = option(1.0, help="beta_tc: weight of the total correlation.", check=positive(), applies=_BETA_TC)
    tc_gamma: float = option(1.0, help="beta_tc: weight of the dimension-wise KL.", check=NONNEGATIVE, applies=_BETA_TC)
    tc_estimator: str = option(
        "mws",
        help="beta_tc: mws (minibatch-weighted sampling) or mss (minibatch-stratified sampling).",
        check=OneOf(("mws", "mss")),
        applies=_BETA_TC,
    )
    free_bits: float = option(
        0.0,
        help="free_bits: the KL floor lambda, nats per latent dimension (or group).",
        check=NONNEGATIVE,
        applies=_FREE_BITS,
    )
    free_bits_groups: Optional[int] = option(
        None,
        help="free_bits: split z into this many groups (default: one per dimension).",
        check=AT_LEAST_1,
        applies=_FREE_BITS,
    )
    # Options a method or objective declares itself, as keyword-only constructor parameters (e.g.
    # MCEM's HMC settings, an objective added in one file): checked against that declaration by
    # ppl_vae.inference.capabilities.check_compatible, as model_options are against the builder.
    method_options: Dict[str, Any] = keyword_options(
        "--method-option",
        "An option of the training method, VALUE in JSON (e.g. mcem's num_leapfrog_steps=20); repeatable. See docs/extending.md.",
    )
    objective_options: Dict[str, Any] = keyword_options(
        "--objective-option",
        "An option of an objective that declares its own (a plugin's), VALUE in JSON; repeatable. "
        "See docs/extending.md.",
    )

    def __post_init__(self) -> None:
        check_types(self, "train")


SECTIONS: Dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


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

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(
                    f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}", field=name
                )
        _check_type("plugins", self.plugins, List[str])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        try:
            raw = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from None
        except RecursionError:  # a RuntimeError, which no ValueError handler catches
            raise ConfigError("config is not valid JSON: it is nested too deeply") from None
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Any) -> "RunConfig":
        """A RunConfig from plain data; unknown keys, missing sections, wrong types, values out of
        range and settings that do not apply (:func:`check_config`) are refused."""
        if not isinstance(raw, dict):
            raise ConfigError("config must be a JSON object")
        unknown = sorted(set(raw) - set(SECTIONS) - {"plugins"})
        if unknown:
            raise ConfigError(
                f"config has unknown key(s): {', '.join(unknown)}; valid: {', '.join([*SECTIONS, 'plugins'])}"
            )
        missing = [name for name in SECTIONS if name not in raw]
        if missing:
            raise ConfigError(f"config lacks section(s): {', '.join(missing)}")
        plugins = raw.get("plugins", [])
        _check_type("plugins", plugins, List[str])
        config = cls(
            **{name: _from_dict(kind, raw[name], name) for name, kind in SECTIONS.items()}, plugins=list(plugins)
        )
        check_config(config)
        return config

    @classmethod
    def from_flags(cls, values: Mapping[str, Any], plugins: Sequence[str] = ()) -> "RunConfig":
        """The RunConfig that flag values describe: ``values`` maps a field (``"train.beta"``) to
        its flag's value, which the field's ``from_flag`` turns into the field's value; absent
        fields take their defaults. The result passes :func:`check_config`."""
        by_path = {d.path: d for d in declarations()}
        sections: Dict[str, Dict[str, Any]] = {name: {} for name in SECTIONS}
        for path, value in values.items():
            declared = by_path[path]
            if declared.option.from_flag is not None:
                try:
                    value = declared.option.from_flag(value)
                except ValueError as exc:
                    raise ConfigError(f"{path} {exc}", field=path) from None
            sections[declared.section][declared.name] = value
        config = cls(**{name: kind(**sections[name]) for name, kind in SECTIONS.items()}, plugins=list(plugins))
        check_config(config)
        return config


# -- the declarations, read back ---------------------------------------------------------------------


@dataclass(frozen=True)
class Declared:
    """A declared field: where it lives (``section``, ``name``), its type ``hint``, its default
    and its :class:`Option`."""

    section: str
    name: str
    hint: Any
    default: Any
    option: Option

    @property
    def path(self) -> str:
        """``"train.beta"``: how configs and errors name the field."""
        return f"{self.section}.{self.name}"

    @property
    def label(self) -> str:
        """How messages name what the flag sets: the path, with the key of a dict field."""
        return self.path + (f".{self.option.key}" if self.option.key else "")

    @property
    def flag(self) -> Optional[str]:
        if self.option.flag is None:
            return None
        return self.option.flag or "--" + self.name.replace("_", "-")

    @property
    def param(self) -> Optional[str]:
        """The flag's click parameter name (``kl_warmup`` for ``--kl-warmup``)."""
        return None if self.flag is None else self.flag[2:].replace("-", "_")

    @property
    def flag_hint(self) -> Any:
        """The type of the flag's value: ``int`` for ``Optional[int]``, a dict field's ``flag_type``."""
        return _base(self.option.flag_type if self.option.flag_type is not None else self.hint)

    @property
    def flag_default(self) -> Any:
        """The flag's default: the field's, or nothing for a flag that fills a dict field."""
        if self.option.flag_type is not None:
            return () if self.option.multiple else None
        return self.default

    @property
    def value_hint(self) -> Any:
        """The type of what the check and the rule concern (a dict field's key: the flag's type)."""
        return self.option.flag_type if self.option.key else self.hint

    def value(self, section: Any) -> Any:
        """What the check and the rule concern in ``section`` (the key's value for a dict field)."""
        value = getattr(section, self.name)
        if self.option.key:
            return value.get(self.option.key) if isinstance(value, dict) else None
        return value

    def is_set(self, section: Any) -> bool:
        """Whether ``section`` sets the field away from its default."""
        value = getattr(section, self.name)
        if self.option.key:
            return isinstance(value, dict) and self.option.key in value
        return value != self.default


def declarations(sections: Sequence[str] = tuple(SECTIONS)) -> Iterator[Declared]:
    """Every declared field of ``sections``, in declaration order."""
    for section in sections:
        cls = SECTIONS[section]
        hints = _hints(cls)
        for f in fields(cls):
            default = f.default_factory() if f.default_factory is not MISSING else f.default  # type: ignore[misc]
            yield Declared(section, f.name, hints[f.name], default, f.metadata[OPTION])


def config_value(config: "RunConfig", path: str) -> Any:
    """The value of the field ``path`` (``"train.objective"``) in ``config``."""
    section, name = path.split(".", 1)
    return getattr(getattr(config, section), name)


# -- checks ----------------------------------------------------------------------------------------------


def check_config(config: RunConfig) -> None:
    """Raise a one-line :class:`ConfigError` naming the first field that has the wrong type, lies
    outside its declared range, or is set away from its default where it does not apply
    (``train.beta applies to objective 'beta_vae' only; train.objective is 'elbo'``).

    Names that registries hold (models, methods, objectives, ...) are checked where those
    registries live (:func:`ppl_vae.inference.training.validate_train_config`, the builders)."""
    check_values(config)
    check_applicability(config)


def check_values(config: RunConfig, sections: Sequence[str] = tuple(SECTIONS)) -> None:
    """Types and declared ranges of ``sections``."""
    if not isinstance(config, RunConfig):
        raise ConfigError(f"config must be a RunConfig, got {type(config).__name__}")
    for name in sections:
        check_types(getattr(config, name), name)
    _check_type("plugins", config.plugins, List[str])
    for d in declarations(sections):
        section = getattr(config, d.section)
        value = d.value(section)
        check = d.option.check
        if check is None or value is None or (d.option.key and not d.is_set(section)):
            continue
        if d.option.key:
            _check_type(d.label, value, d.value_hint)
        problem = check.error(value, _is_float(d.value_hint))
        if problem is not None:
            null = " or null" if _nullable(d.value_hint) else ""
            raise ConfigError(f"{d.label} must be {problem}{null}, got {_show(value)}", field=d.path)


def check_applicability(config: RunConfig, sections: Sequence[str] = tuple(SECTIONS)) -> None:
    """The declared rules of ``sections``: a field set away from its default where its rule
    does not hold is refused, naming both sides."""
    for d in declarations(sections):
        rule = d.option.applies
        if rule is not None and d.is_set(getattr(config, d.section)) and not rule(config):
            raise ConfigError(
                f"{d.label} applies to {rule.description} only; {rule.field} is "
                f"{_show(config_value(config, rule.field))}",
                field=d.path,
            )


def reset_inapplicable(config: RunConfig, setting: str) -> List[str]:
    """Put back to their defaults the fields whose declared rule reads ``setting`` and no longer
    holds, after ``setting`` changed (``fit --resume --optimizer sgd`` of a run made with
    ``--adam-eps``: Adam's eps does not apply to SGD); returns ``"train.adam_eps 0.0001"`` for
    each field reset, what it was."""
    reset = []
    for d in declarations():
        rule = d.option.applies
        section = getattr(config, d.section)
        if rule is None or rule.field != setting or d.option.key or not d.is_set(section) or rule(config):
            continue
        reset.append(f"{d.path} {_show(getattr(section, d.name))}")
        setattr(config, d.section, replace(section, **{d.name: d.default}))
    return reset


def _no_duplicate_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    """A JSON object that names no key twice (the last of two would win, silently)."""
    seen: Dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(f"config names {key!r} twice in one object; keep one")
        seen[key] = value
    return seen


def check_types(section: Any, name: str) -> None:
    """Raise ConfigError unless every field of the config section ``section`` fits its type
    (a value out of range is :func:`check_values`'s concern)."""
    hints = _hints(type(section))
    for f in fields(section):
        _check_type(f"{name}.{f.name}", getattr(section, f.name), hints[f.name], finite=False)


def _from_dict(cls: Type[T], raw: Any, section: str) -> T:
    if not isinstance(raw, dict):
        raise ConfigError(f"config section {section!r} must be a JSON object", field=section)
    hints = _hints(cls)
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"config section {section!r} has unknown key(s): {', '.join(unknown)}", field=section)
    for key, value in raw.items():
        _check_type(f"{section}.{key}", value, hints[key], finite=False)
    return cls(**raw)


_HINTS: Dict[type, Dict[str, Any]] = {}


def _hints(cls: type) -> Dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _check_type(name: str, value: Any, hint: Any, finite: bool = True) -> None:
    """Raise ConfigError unless ``value`` fits the type hint ``hint``. ``finite=False`` lets a
    NaN or infinite float through to the range check, which says what the field allows."""
    if not _fits(value, hint, finite):
        raise ConfigError(f"{name} must be {_describe(hint)}, got {_show_json(value)}", field=name)


def _fits(value: Any, hint: Any, finite: bool = True) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return any(_fits(value, a, finite) for a in args)
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # JSON has no int/float split; NaN and infinities are never a setting
        return isinstance(value, (int, float)) and not isinstance(value, bool) and (not finite or math.isfinite(value))
    if hint is str:
        return isinstance(value, str)
    if origin in (list, List):
        return isinstance(value, list) and all(_fits(v, args[0], finite) for v in value)
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


def _base(hint: Any) -> Any:
    """``Optional[X]`` -> X."""
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _nullable(hint: Any) -> bool:
    return typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)


def _is_float(hint: Any) -> bool:
    return _base(hint) is float


def _show(value: Any) -> str:
    """A value as a message shows it: ``'elbo'``, ``null``, ``0.0``, ``nan``."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _show_json(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _short(x: float) -> str:
    """3.4028234663852886e38 -> ``3.4e38``."""
    return re.sub(r"e\+?0*", "e", f"{x:.2g}")


# -- the docs table -----------------------------------------------------------------------------------

OPTIONS_TABLE_BEGIN = "<!-- options table: generated by ppl_vae.config.options_table; do not edit -->"
OPTIONS_TABLE_END = "<!-- end of options table -->"


def options_table() -> str:
    """A Markdown table of every declared field: flag, field, type, default, values allowed,
    what it applies to, help (docs/options.md holds it; a test keeps the two equal)."""
    rows = [
        "| flag | field | type | default | values | applies to | help |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for d in declarations():
        hint = d.value_hint
        check = d.option.check
        values = check.describe(_is_float(hint)) if check is not None else ""
        if values and _nullable(hint):
            values += " or null"
        default = "(absent)" if d.option.key else f"`{json.dumps(d.default)}`"
        applies = d.option.applies.description if d.option.applies is not None else "all"
        flag = f"`{d.flag}`" if d.flag else "(config only)"
        cells = [flag, f"`{d.label}`", _type_name(hint), default, values, applies, d.option.help]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


def render_options_doc(text: str) -> str:
    """``text`` (docs/options.md) with the part between the table's markers replaced by
    :func:`options_table`."""
    return replace_between(text, OPTIONS_TABLE_BEGIN, OPTIONS_TABLE_END, options_table(), "options table")


def replace_between(text: str, begin: str, end: str, table: str, what: str) -> str:
    """``text`` with the part between the markers ``begin`` and ``end`` replaced by ``table``
    (the docs' generated tables: options, methods, estimators)."""
    head, sep, rest = text.partition(begin)
    _, sep2, tail = rest.partition(end)
    if not sep or not sep2:
        raise ValueError(f"the text lacks the {what}'s markers")
    return f"{head}{begin}\n{table}{end}{tail}"


def _type_name(hint: Any) -> str:
    base = _base(hint)
    origin = typing.get_origin(base)
    name = {int: "integer", float: "number", str: "string", bool: "boolean"}.get(base)
    if name is None:
        name = "object" if origin in (dict, Dict) else "list" if origin in (list, List) else str(base)
    return name + (" or null" if _nullable(hint) else "")
