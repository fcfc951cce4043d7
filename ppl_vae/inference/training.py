"""The training loop: SVI (and every registered training method) over minibatches, one loop.

:func:`train` is the only training loop in the library: ``ppl-vae fit``, resume, the paper's
experiments and every rank of a distributed run go through it. It writes no files; what
happens around the steps (checkpoints, sample grids, evaluation curves, early stops) is a
:class:`Callback`. The SVI loss is Pyro's ``differentiable_loss`` of the chosen ELBO (or the same
estimator computed without tracing, :mod:`ppl_vae.inference.fused`), minimized with a plain
torch optimizer over ``vae.parameters()``: no global param store is involved, so several models
can live in one process and a checkpoint is just the module's and optimizers' state dicts.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, replace
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    FrozenSet,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
    cast,
)

import numpy as np
import pyro
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO

from ppl_vae.config import ADAM_FAMILY, RunConfig, TrainConfig, _show, config_value, declarations
from ppl_vae.data.datasets import Dataset
from ppl_vae.errors import ConfigError, DataError, TrainingDiverged
from ppl_vae.inference.capabilities import (  # the declarations and their registries, re-exported here
    KL_FIELDS,
    METHOD_FIELDS,
    METHODS,
    OBJECTIVES,
    check_compatible,
    closed_form_kl,
    offers,
    stepper_class,
)
from ppl_vae.inference.fused import fused_elbo_loss, fused_enumerated_loss, supports_fused_elbo
from ppl_vae.inference.importance import elbo_per_datapoint
from ppl_vae.inference.optim import LR_SCHEDULES, EagerAdam
from ppl_vae.models.vae import VAE, bounds_of_training_elbos
from ppl_vae.registry import Registry

if TYPE_CHECKING:  # xarray is imported where used: fit needs none of it before its first step
    import xarray as xr

ELBOS: Registry[Callable[..., pyro.infer.ELBO]] = Registry("elbo")
ELBOS.register("trace", doc="Trace_ELBO: AEVB's SGVB estimator A (Monte Carlo KL)")(Trace_ELBO)
ELBOS.register("mean_field", doc="TraceMeanField_ELBO: AEVB's estimator B (analytic KL)")(TraceMeanField_ELBO)
ELBOS.register(
    "enum",
    doc="TraceEnum_ELBO: Trace_ELBO with the discrete sites marked for enumeration summed "
    "out exactly (M2, the GMVAE); 'trace' means this for a model that declares enumerated_sites",
)(TraceEnum_ELBO)
# Pyro's JitTrace_ELBO rests on torch.jit.trace, deprecated in torch 2.x: compile= replaces it.
_REMOVED_ELBOS = {"jit_trace": "trace", "jit_mean_field": "mean_field"}

OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")
OPTIMIZERS.register(
    "adam", doc="Adam (Kingma & Ba 2015): torch's, bound so that it does not import torch._dynamo (inference/optim.py)"
)(EagerAdam)
OPTIMIZERS.register("adamax", doc="Adamax (Kingma & Ba 2015, section 7.1): Adam with the infinity norm")(
    torch.optim.Adamax
)
OPTIMIZERS.register("adagrad", doc="Adagrad (Duchi et al. 2011), AEVB's choice")(torch.optim.Adagrad)
OPTIMIZERS.register("sgd", doc="plain stochastic gradient descent")(torch.optim.SGD)

# ``torch.optim.lr_scheduler`` classes a config may name (LambdaLR and friends need callables,
# SequentialLR and ChainedScheduler other schedulers: none of them can be built from JSON options).
_UNNAMEABLE_SCHEDULERS = {"LambdaLR", "MultiplicativeLR", "SequentialLR", "ChainedScheduler", "LRScheduler"}


def lr_schedule_names() -> List[str]:
    """The ``torch.optim.lr_scheduler`` classes ``TrainConfig.lr_schedule`` may name, and the
    library's own (:data:`ppl_vae.inference.optim.LR_SCHEDULES`: ``BurdaLR``)."""
    sched = torch.optim.lr_scheduler
    base = getattr(sched, "LRScheduler", None) or sched._LRScheduler
    return sorted(
        [
            name
            for name, obj in vars(sched).items()
            if isinstance(obj, type)
            and not name.startswith("_")
            and name not in _UNNAMEABLE_SCHEDULERS
            and (issubclass(obj, base) or issubclass(obj, sched.ReduceLROnPlateau))
        ]
        + list(LR_SCHEDULES)
    )


def _is_plateau(name: Optional[str]) -> bool:
    return name == "ReduceLROnPlateau"


def make_lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> Any:
    """The configured ``torch.optim.lr_scheduler`` over ``optimizer`` (None when there is none).

    ReduceLROnPlateau watches the validation ELBO, which should rise: its ``mode`` defaults to "max".
    """
    if config.lr_schedule is None:
        return None
    options = dict(config.lr_schedule_options)
    if _is_plateau(config.lr_schedule):
        options.setdefault("mode", "max")
    cls = LR_SCHEDULES.get(config.lr_schedule) or getattr(torch.optim.lr_scheduler, config.lr_schedule)
    try:
        return cls(optimizer, **options)
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"train.lr_schedule_options do not fit {config.lr_schedule}: {' '.join(str(exc).split())}",
            field="train.lr_schedule_options",
        ) from None


def attach_lr_schedulers(stepper: "Stepper", config: TrainConfig) -> Dict[str, Any]:
    """``stepper.schedulers``: one scheduler per optimizer (by the optimizer's name), made once.

    State saved with a checkpoint (:func:`ppl_vae.runs.restore` leaves it in
    ``stepper.pending_scheduler_state``) is loaded here, after the optimizers' own state.
    """
    schedulers = getattr(stepper, "schedulers", None)
    if schedulers is None:
        made = {name: make_lr_scheduler(opt, config) for name, opt in stepper.optimizers.items()}
        schedulers = stepper.schedulers = {name: s for name, s in made.items() if s is not None}
    pending = getattr(stepper, "pending_scheduler_state", None) or {}
    for name, saved in pending.items():
        if name not in schedulers:
            raise ConfigError(
                f"the checkpoint holds a learning-rate schedule for optimizer {name!r} but "
                f"train.lr_schedule is {config.lr_schedule!r}",
                field="train.lr_schedule",
            )
        schedulers[name].load_state_dict(saved)
    stepper.pending_scheduler_state = None
    return schedulers


# The KL weight at a step: name -> fn(config, step, steps_per_epoch) (step counts from 0).
KL_SCHEDULES: Registry[Callable[[TrainConfig, int, int], float]] = Registry("kl_schedule")


@KL_SCHEDULES.register("linear", doc="rises linearly from 0 to kl_weight over kl_warmup_epochs (0: no warm-up)")
def linear_kl_weight(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    if config.kl_warmup_epochs == 0:
        return config.kl_weight
    return config.kl_weight * min(1.0, (step + 1) / (config.kl_warmup_epochs * steps_per_epoch))


@KL_SCHEDULES.register(
    "cyclical",
    doc="Fu et al. 2019: cycles of kl_cycle_epochs, each rising over the first "
    "kl_cycle_ratio of the cycle, then held at kl_weight",
)
def cyclical_kl_weight(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    cycle = config.kl_cycle_epochs * steps_per_epoch
    tau = (step % cycle + 1) / cycle
    return config.kl_weight * min(1.0, tau / config.kl_cycle_ratio)


@KL_SCHEDULES.register("constant", doc="kl_weight throughout")
def constant_kl_weight(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    return config.kl_weight


# Numerical precision of the training loss: name -> autocast dtype (None: full precision).
PRECISIONS: Dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16}

# When SVI checks that the loss is finite: every step (a host-device sync each step, and no
# update ever sees a NaN) or once per epoch (no per-step sync: the right choice on a GPU).
FINITE_CHECKS = {"auto": "step on CPU, epoch on CUDA", "step": "step", "epoch": "epoch"}


def resolve_device(name: str) -> torch.device:
    """ "cpu", "cuda", "cuda:N" or "auto" (CUDA when available, else CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"train.device must be cpu, cuda, cuda:N or auto, got {name!r}", field="train.device"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device {name!r} was requested but CUDA is not available here", field="train.device")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"train.device must be cpu, cuda, cuda:N or auto, got {name!r}", field="train.device")
    return device


def check_train_names(config: TrainConfig) -> None:
    """The names the training registries hold (method, elbo, optimizer, kl_schedule, objective)
    and the learning-rate schedule's class: a ConfigError naming the first one no registry has.
    What a run's config.json is checked for when it is read, wherever it runs."""
    for name, registry in (
        ("method", METHODS),
        ("elbo", ELBOS),
        ("optimizer", OPTIMIZERS),
        ("kl_schedule", KL_SCHEDULES),
        ("objective", OBJECTIVES),
    ):
        value = getattr(config, name)
        if name == "elbo" and value in _REMOVED_ELBOS:
            raise ConfigError(
                f"train.elbo {value!r} is no longer offered (it used torch.jit.trace, deprecated in torch 2); "
                f"use elbo {_REMOVED_ELBOS[value]!r} with compile 'inductor'",
                field="train.elbo",
            )
        if value not in registry:
            raise ConfigError(
                f"train.{name} must be one of {', '.join(registry.names())}, got {value!r}", field=f"train.{name}"
            )


def validate_train_config(config: TrainConfig) -> None:
    """Raise :class:`ConfigError` naming the first bad field (``train.NAME``).

    Types, ranges and what each field applies to are declared with the fields and checked by
    :mod:`ppl_vae.config`; here, the names registries hold, the compile backend, the
    learning-rate schedule (built and stepped), the objective's own checks and the device."""
    from ppl_vae.config import check_applicability, check_values

    def bad(name: str, message: str) -> ConfigError:
        return ConfigError(f"train.{name} {message}", field=f"train.{name}")

    as_run = RunConfig(train=config)
    check_values(as_run, ("train",))
    check_train_names(config)
    check_applicability(as_run, ("train",))
    if config.compile is not None:
        import torch._dynamo  # only when compiling: importing dynamo costs a second

        if config.compile not in torch._dynamo.list_backends(exclude_tags=()):
            raise bad(
                "compile",
                f"must be null or a torch.compile backend "
                f"({', '.join(torch._dynamo.list_backends())}, ...), got {config.compile!r}",
            )
    _validate_controls(config, bad)
    check_objective = getattr(OBJECTIVES.get(config.objective), "check_config", None)
    if check_objective is not None:
        check_objective(config)
    device = resolve_device(config.device)
    if PRECISIONS[config.precision] is not None and device.type != "cuda":
        raise bad(
            "precision",
            f"{config.precision!r} (autocast) needs a CUDA device, but training runs on "
            f"{device.type}; use precision 'fp32'",
        )


def _validate_controls(config: TrainConfig, bad: Callable[[str, str], ConfigError]) -> None:
    """The learning-rate schedule: a class torch offers, built with its options on the configured
    optimizer type and stepped once per epoch, as training steps it, on a throwaway optimizer
    (up to 1000 epochs): options that fail only when stepped (``{"step_size": 0}``) or that send
    the learning rate below 0 or to NaN (``ExponentialLR`` with ``{"gamma": -1}``) are refused
    before training. (The fields' ranges and what they apply to are declared in ppl_vae.config.)"""
    import warnings

    if config.lr_schedule is None:
        return
    names = lr_schedule_names()
    if config.lr_schedule not in names:
        raise bad(
            "lr_schedule",
            f"must be null or a torch.optim.lr_scheduler class ({', '.join(names)}), got {config.lr_schedule!r}",
        )
    plateau = _is_plateau(config.lr_schedule)
    if plateau and config.val_fraction == 0:
        raise bad("lr_schedule", "ReduceLROnPlateau watches the validation ELBO: set train.val_fraction > 0")
    # the options are checked on the configured optimizer type (CyclicLR, say, needs momentum or betas)
    optimizer = OPTIMIZERS.get(config.optimizer)([torch.zeros(1, requires_grad=True)], **optimizer_options(config))
    scheduler = make_lr_scheduler(optimizer, config)

    def check_lr(when: str) -> None:
        for group in optimizer.param_groups:
            try:
                lr = float(group["lr"])
            except (TypeError, ValueError):
                lr = math.nan
            if not (math.isfinite(lr) and lr >= 0):
                raise bad(
                    "lr_schedule_options",
                    f"make {config.lr_schedule} set the learning rate to {group['lr']} {when}; "
                    "a learning rate must be a finite number >= 0",
                )

    check_lr("when it is built")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no optimizer step precedes these scheduler steps, on purpose
        for epoch in range(1, min(max(config.epochs, 1), 1000) + 1):
            try:
                # ReduceLROnPlateau watches the validation ELBO: a constant one here
                scheduler.step(0.0) if plateau else scheduler.step()
            except (TypeError, ValueError, ArithmeticError, KeyError, IndexError, AttributeError) as exc:
                raise bad(
                    "lr_schedule_options",
                    f"do not fit {config.lr_schedule}: stepping it after epoch {epoch} fails "
                    f"({type(exc).__name__}: {' '.join(str(exc).split())})",
                ) from None
            check_lr(f"after epoch {epoch}")


# torch's fused Adam: one kernel per step over all parameters instead of several per tensor; the
# same update rule (benchmarks/README.md: the optimizer's share of a CPU step fell from 26 to 0.7 ms)
FUSED_OPTIMIZERS = ("adam",)


def optimizer_options(config: TrainConfig) -> Dict[str, Any]:
    """The keyword arguments of ``config.optimizer``: the learning rate, weight decay and, for Adam,
    for Adam and Adamax (:data:`ppl_vae.config.ADAM_FAMILY`) their eps and betas (Burda et al. 2015
    train with eps = 1e-4; torch's default is 1e-8)."""
    options: Dict[str, Any] = {"lr": config.lr, "weight_decay": config.weight_decay}
    if config.optimizer in ADAM_FAMILY:
        options.update(eps=config.adam_eps, betas=(config.adam_beta1, config.adam_beta2))
    return options


def make_optimizer(
    params: Union[torch.nn.Module, Sequence[torch.nn.Parameter]], config: TrainConfig
) -> torch.optim.Optimizer:
    """The configured torch optimizer over ``params`` (a module's parameters, or a list), with
    :func:`optimizer_options`; Adam fused where torch allows (floating-point parameters on one
    CPU or CUDA device)."""
    params = list(params.parameters() if isinstance(params, torch.nn.Module) else params)
    options = optimizer_options(config)
    devices = {p.device for p in params}
    if (
        config.optimizer in FUSED_OPTIMIZERS
        and params
        and len(devices) == 1
        and next(iter(devices)).type in ("cpu", "cuda")
        and all(p.is_floating_point() for p in params)
    ):
        options["fused"] = True
    return OPTIMIZERS.get(config.optimizer)(params, **options)


class NonFiniteLoss(ArithmeticError):
    """Raised by a stepper before it updates anything, when the loss is NaN or infinite."""

    def __init__(self, value: float):
        super().__init__(f"the loss became {value}")
        self.value = value


@dataclass
class Update:
    """One optimizer update that a method asks for: a differentiable ``loss``, the optimizers (by
    name; None: all of the method's) that step on its gradient, the ``value`` the method reports
    for it (default: the loss; wake-sleep reports the negative ELBO of its wake phase), and the
    objective's per-datapoint ``terms`` to record (:attr:`Stepper.recorded`)."""

    loss: torch.Tensor
    optimizers: Optional[Tuple[str, ...]] = None
    value: Optional[torch.Tensor] = None
    terms: Dict[str, torch.Tensor] = field(default_factory=dict)


class Stepper:
    """A training method or objective, and the one training step every one of them shares.

    A subclass supplies its loss and nothing else, the way a Pyro ``ELBO`` subclass supplies a
    loss and ``SVI.step`` does the rest: :meth:`loss` (one update over all parameters), or
    :meth:`updates` for a method that makes several updates per minibatch (wake-sleep's two
    optimizers, MCEM's E-step and weight updates). :meth:`step` owns everything else, once:
    the finite check, ``zero_grad``, backward, gradient clipping, the optimizers, mixed
    precision and ``torch.compile``, the model's step counter (``set_training_step``), and the
    epoch means of the objective's terms.

    Declarations, read by :func:`ppl_vae.inference.capabilities.check_compatible` before any
    file is written: :meth:`requires` (what the model and guide must offer, names from
    :data:`~ppl_vae.inference.capabilities.CAPABILITIES`), :attr:`data_parallel` (its step runs
    under DistributedDataParallel), :attr:`compilable` (its loss is plain torch, so
    ``train.compile`` applies), :attr:`uses` (the method-specific ``train`` fields it reads;
    one of :data:`METHOD_FIELDS` that it does not read must keep its default).

    ``optimizers`` maps a name to each torch optimizer; their states are checkpointed and
    restored by name. ``step`` returns the detached minibatch loss (the negative objective,
    scaled to the full dataset) and raises :class:`NonFiniteLoss` *before* updating anything
    when a loss is not finite (or, with :attr:`defers_finite_check`, returns NaN and the
    training loop stops at the epoch's end). Labels reach ``loss`` as ``y`` when the data has them.
    """

    #: the name of the one optimizer of a single-update method (checkpoints use it)
    optimizer_name: str = "svi"
    #: what the step's loss value is (the history's ``train_loss`` says it; declared by each method)
    loss_meaning: str = "the negative ELBO with its KL weight"
    #: per-datapoint terms recorded as epoch means in the history (names from :data:`TERM_VARS`)
    recorded: Tuple[str, ...] = ()
    data_parallel: bool = False
    compilable: bool = False
    #: where ``compilable`` depends on the model (:meth:`compiles`), what the docs table says instead
    compile_note: Optional[str] = None
    uses: FrozenSet[str] = frozenset()
    #: learning-rate schedulers by optimizer name (:func:`attach_lr_schedulers`; None: not made yet)
    schedulers: Optional[Dict[str, Any]] = None
    #: scheduler state from a checkpoint, loaded when the schedulers are made
    pending_scheduler_state: Optional[Dict[str, Any]] = None
    #: set by :meth:`ppl_vae.inference.distributed.DistContext.wrap_stepper`: the step is one rank's
    dist: Any = None

    @classmethod
    def requires(cls, config: TrainConfig) -> FrozenSet[str]:
        """The capabilities a model and guide need for this method under ``config``."""
        return frozenset()

    def __init__(self, vae: VAE, config: TrainConfig):
        check_compatible(vae, config, stepper=type(self))  # built directly too: refused before any work
        self.vae = vae
        self.config = config
        self.optimizers = self.make_optimizers(vae, config)
        device_type = next(iter(vae.parameters()), torch.empty(0)).device.type
        #: True when ``step`` skips the host-side finiteness check (no device sync per step); the
        #: training loop then tracks the first non-finite loss on the device and stops at epoch end.
        self.defers_finite_check = config.finite_check == "epoch" or (
            config.finite_check == "auto" and device_type == "cuda"
        )
        self.clip_grad_norm = config.clip_grad_norm
        self.autocast = PRECISIONS[config.precision]
        self.step_count = 0
        self.steps_per_epoch = 1
        self._sums: Dict[str, torch.Tensor] = {}
        self._count = 0
        self._ddp: Any = None
        self.loss_fn: Callable[..., Any] = self.loss
        if config.compile is not None:  # check_compatible refused a loss that is not plain torch
            self.loss_fn = torch.compile(self.loss, backend=config.compile)

    @classmethod
    def compiles(cls, vae: VAE, config: TrainConfig) -> bool:
        """Whether this method's loss on ``vae`` is plain torch (so ``train.compile`` applies)."""
        return cls.compilable

    @classmethod
    def computes_kl_itself(cls, vae: VAE, config: TrainConfig) -> bool:
        """Whether the loss computes its KL term itself (then ``train.elbo`` "mean_field" needs
        :func:`~ppl_vae.inference.capabilities.closed_form_kl`) rather than through Pyro's
        TraceMeanField_ELBO, which decides site by site; read only where ``elbo`` is in ``uses``."""
        return True

    @classmethod
    def describe(cls) -> str:
        return getattr(cls, "label", cls.__name__)

    def make_optimizers(self, vae: VAE, config: TrainConfig) -> Dict[str, torch.optim.Optimizer]:
        """``{name: optimizer}``; one ``config.optimizer`` over every parameter unless overridden."""
        return {self.optimizer_name: make_optimizer(vae, config)}

    def method_state(self) -> Dict[str, Any]:
        """What the method carries from one step to the next besides its optimizers and the RNG
        (JSON-able: MCEM's adapted HMC step size), checkpointed with them so that a resumed run
        continues exactly; none by default."""
        return {}

    def load_method_state(self, state: Dict[str, Any]) -> None:
        """Take back :meth:`method_state` from a checkpoint."""
        if state:
            raise ValueError(f"{self.describe()} keeps no state between steps, but the checkpoint has {sorted(state)}")

    # -- what a method supplies ------------------------------------------------------------------

    def loss(self, x: torch.Tensor, *, num_data: int, kl_weight: float = 1.0, **kwargs) -> Any:
        """The differentiable minibatch loss (the negative objective scaled to ``num_data``), or
        ``(loss, terms)`` with the per-datapoint terms to record."""
        raise NotImplementedError  # pragma: no cover - each method's

    def updates(self, x: torch.Tensor, *, num_data: int, kl_weight: float = 1.0, **kwargs) -> Iterator[Update]:
        """The updates of one minibatch, in order (default: one, on :meth:`loss`)."""
        out = self._call_loss(x, num_data=num_data, kl_weight=kl_weight, **kwargs)
        loss, terms = out if isinstance(out, tuple) else (out, {})
        yield Update(loss, terms=terms)

    # -- the one training step -------------------------------------------------------------------

    def _call_loss(self, x: torch.Tensor, **kwargs) -> Any:
        if self.dist is None:
            return self.loss_fn(x, **kwargs)
        if self._ddp is None:
            self._ddp = self.dist.ddp_module(self.vae, self.loss_fn, x, kwargs)
        return self._ddp(x, **kwargs)

    def step(self, x: torch.Tensor, *, num_data: int, kl_weight: float = 1.0, **kwargs) -> torch.Tensor:
        """One minibatch: every update of :meth:`updates`; returns the first update's value."""
        set_step = getattr(self.vae, "set_training_step", None)
        if set_step is not None:
            set_step(self.step_count)
        reported: Optional[torch.Tensor] = None
        finite: Optional[torch.Tensor] = None
        updates = self.updates(x, num_data=num_data, kl_weight=kl_weight, **kwargs)
        while True:
            with (
                torch.autocast(x.device.type, dtype=self.autocast)
                if self.autocast is not None
                else contextlib.nullcontext()
            ):
                update = next(updates, None)
            if update is None:
                break
            loss = update.loss.detach()
            value = loss if update.value is None else update.value.detach()
            if self.dist is not None:
                value = self.dist.all_reduce_mean(value)
            ok = torch.isfinite(value) if value is loss else torch.isfinite(loss) & torch.isfinite(value)
            if self.defers_finite_check:
                finite = ok if finite is None else finite & ok
            elif not ok:
                raise NonFiniteLoss(float(value if not torch.isfinite(value) else loss))
            self._apply(update)
            if reported is None:
                reported = value
                self._record(update.terms)
        self.step_count += 1
        if set_step is not None:  # at rest the model's counter says how many steps are done (checkpoints save it)
            set_step(self.step_count)
        assert reported is not None, f"{type(self).__name__}.updates made no update"
        if finite is not None:  # deferred: NaN marks the step, with no host-device sync here
            reported = torch.where(finite, reported, torch.full_like(reported, float("nan")))
        return reported

    def _apply(self, update: Update) -> None:
        names = update.optimizers or tuple(self.optimizers)
        optimizers = [self.optimizers[n] for n in names]
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        if self.dist is not None:
            with self.dist.collective("the gradient all-reduce"):
                update.loss.backward()
        else:
            update.loss.backward()
        for optimizer in optimizers:
            if self.clip_grad_norm is not None:  # each optimizer's parameters, as one norm
                params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, float(self.clip_grad_norm))
            optimizer.step()

    def _record(self, terms: Dict[str, torch.Tensor]) -> None:
        if not self.recorded:
            return
        terms = dict(terms)
        if "log_lik" in terms:
            terms.setdefault("reconstruction", terms["log_lik"])
        for name in self.recorded:
            value = terms[name].detach().mean()
            self._sums[name] = self._sums.get(name, 0.0) + value
        self._count += 1

    def close(self) -> None:
        """Release anything the stepper holds beyond its optimizers."""

    def begin(self, step: int, steps_per_epoch: int) -> None:
        """Called by :func:`train` before its first step: ``step`` optimizer steps are done (a
        resumed run's count), so a method whose objective follows a schedule resumes exactly."""
        self.step_count, self.steps_per_epoch = int(step), int(steps_per_epoch)
        self._sums, self._count = {}, 0

    def extra_terms(self) -> Dict[str, float]:
        """Epoch-level values of the objective besides the recorded means (e.g. its capacity)."""
        return {}

    def epoch_terms(self) -> Dict[str, float]:
        """The objective's terms averaged over the epoch just finished (nats per datapoint, names
        from :data:`TERM_VARS`), and a fresh start for the next epoch; ``{}`` for most methods."""
        out = {name: float(total) / self._count for name, total in self._sums.items()} if self._count else {}
        self._sums, self._count = {}, 0
        return {**out, **self.extra_terms()}


def stepper_options(config: TrainConfig) -> Dict[str, Any]:
    """The keyword options the stepper is built with: the objective's (``train.objective_options``)
    when an objective replaces the method's loss, else the method's (``train.method_options``)."""
    return dict(config.objective_options if config.objective != "elbo" else config.method_options)


def make_stepper(vae: VAE, config: TrainConfig) -> Stepper:
    """The stepper that ``config.method`` and ``config.objective`` name, built with
    :func:`stepper_options` (its constructor checks the combination with
    :func:`~ppl_vae.inference.capabilities.check_compatible`)."""
    check_compatible(vae, config)  # the objective-method pairing and the options, which a class alone does not know
    return stepper_class(config)(vae, config, **stepper_options(config))


def enumerating_elbo(vae: VAE, name: str) -> str:
    """The ELBO to train ``vae`` with: "enum" for "trace" when the model declares
    ``enumerated_sites`` (discrete sites summed out, e.g. M2's y), else ``name``; an ELBO that
    cannot enumerate such a model is refused."""
    sites = tuple(getattr(vae, "enumerated_sites", ()))  # declared by models that enumerate
    if not sites:
        return name
    if name not in ("trace", "enum"):
        raise ConfigError(
            f"train.elbo {name!r} cannot sum out the discrete site(s) {', '.join(map(repr, sites))} of "
            f"{type(vae).__name__}: use 'trace' or 'enum' (TraceEnum_ELBO)",
            field="train.elbo",
        )
    return "enum"


@METHODS.register("svi", doc="SVI on the ELBO: AEVB's algorithm 1 (encoder and decoder jointly)")
class SVIStepper(Stepper):
    """AEVB: one gradient step on the chosen ELBO for encoder and decoder together.

    A pair that offers the fast path (and ``train.fused_elbo``) computes the ELBO without Pyro's
    tracing (:mod:`ppl_vae.inference.fused`); only then is it plain torch, so ``train.compile``
    applies to it alone.
    """

    label = "method 'svi'"
    data_parallel = True
    compile_note = "on the fused path (a fast-path pair, or a model that sums its discrete site in one batched computation; fused_elbo)"
    uses = frozenset(METHOD_FIELDS)

    def __init__(self, vae: VAE, config: TrainConfig):
        self.elbo: Any = ELBOS.get(enumerating_elbo(vae, config.elbo))(
            num_particles=config.num_particles,
            vectorize_particles=config.num_particles > 1,
            max_plate_nesting=1,
        )
        # The fused path computes the same estimator without Pyro's tracing (see inference/fused.py).
        self.fused = self.compiles(vae, config)
        self._enumerated = self.fused and offers(vae, "enumerated_fast_path")
        self._num_particles = config.num_particles
        self._analytic_kl = config.elbo == "mean_field"
        super().__init__(vae, config)

    @classmethod
    def compiles(cls, vae: VAE, config: TrainConfig) -> bool:
        # only the fused path is plain torch; estimator B takes Pyro's path (TraceMeanField_ELBO,
        # a closed-form KL site by site) where the fused loss has no closed-form KL (a hierarchy)
        return (
            config.fused_elbo
            and supports_fused_elbo(vae)
            and (config.elbo != "mean_field" or offers(vae, "enumerated_fast_path") or closed_form_kl(vae))
        )

    @classmethod
    def computes_kl_itself(cls, vae: VAE, config: TrainConfig) -> bool:
        return cls.compiles(vae, config)

    def loss(self, x: torch.Tensor, *, num_data: int, kl_weight: float = 1.0, **kwargs) -> torch.Tensor:
        """The differentiable minibatch loss (negative ELBO scaled to ``num_data``)."""
        if self._enumerated:
            return fused_enumerated_loss(
                self.vae,
                x,
                y=kwargs.get("y"),
                num_data=num_data,
                kl_weight=kl_weight,
                num_particles=self._num_particles,
            )
        if self.fused:  # the base VAE ignores labels
            return fused_elbo_loss(
                cast(Any, self.vae),  # a FastPair: compiles() checked the protocol
                x,
                num_data=num_data,
                kl_weight=kl_weight,
                num_particles=self._num_particles,
                analytic_kl=self._analytic_kl,
            )
        if kl_weight != 1.0:
            kwargs["kl_weight"] = kl_weight
        return self.elbo.differentiable_loss(self.vae.model, self.vae.guide, x, num_data=num_data, **kwargs)


@dataclass
class TrainState:
    """Where training stands: epochs done, optimizer steps done, per-epoch records."""

    epoch: int = 0
    step: int = 0
    records: List[Dict[str, float]] = field(default_factory=list)

    @property
    def fresh(self) -> bool:
        """No step taken yet."""
        return self.epoch == 0 and self.step == 0


TRAIN_LOSS = "mean minibatch loss per datapoint during the epoch, nats: "

HISTORY_VARS = {
    "train_elbo": "ELBO per datapoint on the training set (or the fixed subset of train_eval_size points), "
    "nats (KL weight 1); a Monte Carlo estimate of a lower bound on log p(x)",
    "test_elbo": "ELBO per datapoint on the test set, nats (KL weight 1); a Monte Carlo estimate of a lower "
    "bound on log p(x)",
    "train_loss": TRAIN_LOSS + "the training method's objective negated (its Stepper.loss_meaning)",
    "val_elbo": "ELBO per datapoint on the validation split (train.val_fraction of the training data, never "
    "trained on), nats (KL weight 1); a Monte Carlo estimate of a lower bound on log p(x); NaN without a "
    "validation split",
    "kl_weight": "KL weight at the end of the epoch",
    "lr": "learning rate of the (first) optimizer during the epoch",
    "wall_time": "cumulative training time, seconds (evaluation excluded)",
    "num_train_samples": "training datapoints processed so far",
}

#: Optional per-epoch variables (a stepper's :meth:`Stepper.epoch_terms`) -> description; a history
#: holds those its method recorded.
TERM_VARS: Dict[str, str] = {}


@dataclass(frozen=True)
class EpochMetrics:
    """Values :func:`train` records after each epoch beside the ELBOs, such as M2's test error
    (:func:`ppl_vae.analysis.semisupervised.epoch_label_metrics` builds them from what a model
    declares): ``compute(vae)``, called with the model in eval mode (on every rank of a
    distributed run), returns ``{name: value}`` for the names of ``descriptions``, which say what
    each is (the history's variable attributes)."""

    compute: Callable[[VAE], Dict[str, float]]
    descriptions: Dict[str, str]


def history_to_xarray(
    records: List[Dict[str, float]], attrs: Optional[dict] = None, descriptions: Optional[Dict[str, str]] = None
) -> xr.Dataset:
    """Per-epoch records as a Dataset with dim ``epoch``; ``descriptions`` say what variables
    beside :data:`HISTORY_VARS` and :data:`TERM_VARS` are (:attr:`EpochMetrics.descriptions`)."""
    epochs = np.array([int(r["epoch"]) for r in records], dtype=np.int64)
    data_vars = {
        name: (
            "epoch",
            np.array([r[name] for r in records], dtype=np.float64),
            {"description": (descriptions or {}).get(name, desc)},
        )
        for name, desc in HISTORY_VARS.items()
    }
    extra = sorted({k for r in records for k in r} - set(HISTORY_VARS) - {"epoch"})
    for name in extra:
        values = np.array([r.get(name, np.nan) for r in records], dtype=np.float64)
        described = (descriptions or {}).get(name, TERM_VARS.get(name, ""))
        data_vars[name] = ("epoch", values, {"description": described})
    import xarray as xr

    return xr.Dataset(data_vars, coords={"epoch": epochs}, attrs=attrs or {})


def history_records(history: xr.Dataset) -> List[Dict[str, float]]:
    """The records of a history Dataset; variables a history written before they existed lacks are NaN
    (an objective's own terms, :data:`TERM_VARS`, are read when the history has them)."""
    extra = sorted(cast(str, k) for k in history.data_vars if k not in HISTORY_VARS)  # names written as str
    return [
        {
            "epoch": int(e),
            **{k: float(history[k].sel(epoch=e)) if k in history else math.nan for k in HISTORY_VARS},
            **{k: float(history[k].sel(epoch=e)) for k in extra},
        }
        for e in history["epoch"].values
    ]


def stopped_early(records: Sequence[Dict[str, float]], config: TrainConfig) -> Optional[str]:
    """Why training stopped before ``config.epochs`` (one line), or None if early stopping did not stop it."""
    if config.early_stopping_patience is None or len(records) >= config.epochs:
        return None
    since = epochs_since_best(records)
    if since is None or since < config.early_stopping_patience:
        return None
    best = len(records) - since
    return (
        f"stopped early after epoch {len(records)}: the validation ELBO has not improved for {since} "
        f"epoch{'' if since == 1 else 's'} (best {records[best - 1]['val_elbo']:.3f} at epoch {best}, kept in "
        f"checkpoint-best.safetensors; patience {config.early_stopping_patience}, set when the run is made: "
        "--early-stopping-patience, train.early_stopping_patience)"
    )


def epochs_since_best(records: Sequence[Dict[str, float]], key: str = "val_elbo") -> Optional[int]:
    """Epochs since the one with the highest ``key`` (0: the last epoch is the best); None when no
    epoch has a finite value. Derived from the records alone, so resume needs no extra state."""
    values = [r.get(key, math.nan) for r in records]
    finite = [i for i, v in enumerate(values) if math.isfinite(v)]
    if not finite:
        return None
    best = max(finite, key=lambda i: (values[i], -i))  # the first of equal maxima
    return len(records) - 1 - best


@dataclass
class TrainContext:
    """What a :class:`Callback` sees: the model, data, config, stepper and the state so far."""

    vae: VAE
    data: Dataset
    config: TrainConfig
    stepper: Stepper
    state: TrainState
    attrs: Dict[str, Any]
    #: the last minibatch loss (detached, on the device; scaled to the full training set)
    last_loss: Optional[torch.Tensor] = None
    kl_weight: float = 1.0
    #: number of datapoints the model trains on (the training set less the validation split)
    num_train: int = 0
    #: True at the end of the epoch after which training stops early (checkpoint it)
    stopping: bool = False
    #: what the records' variables beside the ELBOs and the objective's terms are (:class:`EpochMetrics`)
    descriptions: Dict[str, str] = field(default_factory=dict)

    @property
    def lr(self) -> float:
        """The current learning rate of the (first) optimizer."""
        optimizer = next(iter(self.stepper.optimizers.values()), None)
        return float("nan") if optimizer is None else float(optimizer.param_groups[0]["lr"])

    def history(self) -> xr.Dataset:
        """The per-epoch records so far as the history Dataset."""
        return history_to_xarray(self.state.records, self.attrs, self.descriptions)


def check_given_applies(config: RunConfig, given: Iterable[str]) -> None:
    """The fields the user gave (``given``: their paths, e.g. flags typed on the command line) must
    apply, whatever their value: ``--beta 1`` with objective 'elbo' is refused as ``--beta 4`` is,
    where :func:`check_applicability` sees only values away from their defaults. Also the
    method-specific fields (``train.elbo``, ``train.num_particles``, the KL schedule) a method does
    not read (``--method mcem --elbo trace``)."""
    from ppl_vae.models.priors import PRIORS

    # a misspelt name (--optimizer adamw) is named first, as the full check names it, rather than
    # called the other side of an 'applies to ... only' refusal
    check_train_names(config.train)
    unknown_prior = config.model.prior not in PRIORS
    given = set(given)
    for d in declarations():
        rule = d.option.applies
        if rule is None or d.path not in given or (unknown_prior and rule.field == "model.prior"):
            continue
        if not rule(config):
            raise ConfigError(
                f"{d.label} applies to {rule.description} only; {rule.field} is "
                f"{_show(config_value(config, rule.field))}",
                field=d.path,
            )
    cls = stepper_class(config.train)
    side = getattr(cls, "label", None) or f"method {config.train.method!r}"
    for name in METHOD_FIELDS:
        if f"train.{name}" in given and name not in cls.uses:
            reason = "it optimizes no KL term" if name in KL_FIELDS else "it does not read it"
            raise ConfigError(f"train.{name} does not apply to {side} ({reason}): leave it out", field=f"train.{name}")


class Callback:
    """Hooks of :func:`train`; override the ones you need. They run on the main rank only.

    ``on_train_start``: before the first step of this call (fresh or resumed; ``ctx.state``
    says which). ``on_step_end``: after every optimizer step; return True to stop training
    there (only callbacks that override it are called, so the others cost nothing per step).
    ``on_epoch_end``: after each epoch's record is appended. ``on_train_end``: when this call
    ends, normally or by an error (close files there).
    """

    def on_train_start(self, ctx: TrainContext) -> None:
        pass

    def on_step_end(self, ctx: TrainContext) -> bool:
        return False

    def on_epoch_end(self, ctx: TrainContext) -> None:
        pass

    def on_train_end(self, ctx: TrainContext) -> None:
        pass


class EpochFunction(Callback):
    """A plain ``fn(epoch, vae)`` as a callback: called at the start of a fresh run (epoch 0)
    and after every epoch."""

    def __init__(self, fn: Callable[[int, VAE], object]):
        self.fn = fn

    def on_train_start(self, ctx: TrainContext) -> None:
        if ctx.state.fresh:
            self.fn(0, ctx.vae)

    def on_epoch_end(self, ctx: TrainContext) -> None:
        self.fn(ctx.state.epoch, ctx.vae)


def as_callbacks(callbacks: Sequence[Union[Callback, Callable[[int, VAE], object]]]) -> List[Callback]:
    return [c if isinstance(c, Callback) else EpochFunction(c) for c in callbacks]


def _kl_weight(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    return KL_SCHEDULES.get(config.kl_schedule)(config, step, steps_per_epoch)


def validation_split(n: int, config: TrainConfig) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(train_idx, val_idx)``: sorted indices into the training data, the validation part
    ``round(val_fraction * n)`` points (at least 1) drawn with ``config.seed`` (a stream apart from
    :func:`train_eval_set`'s); None when ``val_fraction`` is 0. The global RNG is left as it was."""
    if config.val_fraction == 0:
        return None
    num_val = max(1, round(config.val_fraction * n))
    if num_val >= n:
        raise ConfigError(
            f"train.val_fraction {config.val_fraction} leaves no training data of {n} points",
            field="train.val_fraction",
        )
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([config.seed, 0x7A1]).generate_state(1)[0]))
    perm = torch.randperm(n, generator=gen)
    return perm[num_val:].sort().values, perm[:num_val].sort().values


def num_trained_on(n: int, config: TrainConfig) -> int:
    """How many of ``n`` training points the model trains on (the validation split left out)."""
    split = validation_split(n, config)
    return n if split is None else len(split[0])


def train_eval_set(data: Dataset, config: TrainConfig, indices: Optional[torch.Tensor] = None):
    """The training points the per-epoch ``train_elbo`` is computed on: all of them (or of
    ``indices``, the points trained on), or a fixed subset of ``config.train_eval_size`` drawn
    from ``config.seed``; under dynamic binarization binarized once (seeded), so the curve
    measures the model, not fresh binarization noise.
    Returns ``(x, labels)``; the global RNG is left as it was."""
    x: Any = data.train
    labels = data.train_labels
    n = int(x.shape[0]) if indices is None else len(indices)
    gen = torch.Generator().manual_seed(config.seed)
    if config.train_eval_size is not None and config.train_eval_size < n:
        idx = torch.randperm(n, generator=gen)[: config.train_eval_size].sort().values
        idx = (idx if indices is None else indices[idx]).to(x.device)
        x = x[idx]
        labels = None if labels is None else labels[idx]
    elif indices is not None:
        x = x[indices.to(x.device)]
        labels = None if labels is None else labels[indices.to(labels.device)]
    if data.dynamic_binarization:
        x = (torch.rand(x.shape, generator=gen).to(x.device) < x).to(x.dtype)
    return x, labels


def verify_fast_path_on(vae: VAE, data: Dataset) -> None:
    """A user's class that declares the fast path is checked against its Pyro program on a few
    test points (:func:`~ppl_vae.inference.latents.verify_declared_fast_path`), and one whose
    model marks a discrete site for enumeration must declare it in ``enumerated_sites``
    (:func:`~ppl_vae.inference.latents.verify_enumerated_sites`); once per model."""
    from ppl_vae.inference.latents import verify_declared_fast_path, verify_enumerated_sites

    x, labels = (data.test, data.test_labels) if data.test.shape[0] else (data.train, data.train_labels)
    device = next(iter(vae.parameters()), torch.empty(0)).device  # a run's data is loaded on the CPU
    kwargs: Dict[str, Any] = {}
    if getattr(vae, "num_classes", None) is not None and labels is not None:
        kwargs["y"] = labels[:8].to(device)
    verify_declared_fast_path(vae, torch.as_tensor(x[:8]).to(device), **kwargs)
    verify_enumerated_sites(vae, torch.as_tensor(x[:8]).to(device), **kwargs)
    _check_parts(vae, data, torch.as_tensor(x[:2]).to(device))


def _check_parts(vae: Any, data: Dataset, x: torch.Tensor) -> None:
    """A VAE put together by hand (the plain class, custom encoder or decoder) is probed once on
    two datapoints before training: its event shape is the data's, the encoder gives the prior's
    latent size, and the decoder one tensor shaped like a datapoint per parameter of the
    likelihood; a mismatch is one line here, not a broadcasting error inside the first step."""
    from ppl_vae.models.vae import VAE

    if type(vae) is not VAE:  # the library's families are checked by their builders and tests
        return
    name = "the VAE"
    if tuple(vae.event_shape) != tuple(data.event_shape):
        raise ValueError(
            f"{name} was built for datapoints of shape {tuple(vae.event_shape)}, but the data's are "
            f"{tuple(data.event_shape)}: give event_shape={tuple(data.event_shape)}"
        )
    modes = [(m, m.training) for m in vae.modules()]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            for m, _ in modes:
                m.eval()
            loc = vae.encoder(x)[0]
            if tuple(loc.shape) != (x.shape[0], vae.prior.latent_dim):
                raise ValueError(
                    f"{name}'s encoder gives latents of shape {tuple(loc.shape[1:])} but its prior is over "
                    f"{vae.prior.latent_dim} dimensions: build them with the same latent_dim"
                )
            out = vae.decoder(loc)
    finally:
        for m, mode in modes:
            m.train(mode)
    want = vae.likelihood.num_params
    if not isinstance(out, (tuple, list)) or len(out) != want:
        got = f"a {type(out).__name__}" if not isinstance(out, (tuple, list)) else f"{len(out)} tensor(s)"
        raise ValueError(
            f"{name}'s decoder returns {got}, but likelihood {vae.likelihood.name!r} takes a tuple of {want} "
            f"tensor(s) shaped like a datapoint"
        )
    for i, t in enumerate(out):
        if tuple(t.shape) != (x.shape[0], *data.event_shape):
            raise ValueError(
                f"{name}'s decoder output {i} has shape {tuple(t.shape[1:])} per datapoint, but a datapoint's is "
                f"{tuple(data.event_shape)} (likelihood {vae.likelihood.name!r})"
            )


def train(
    vae: VAE,
    data: Dataset,
    config: TrainConfig,
    *,
    stepper: Optional[Stepper] = None,
    state: Optional[TrainState] = None,
    callbacks: Sequence[Union[Callback, Callable[[int, VAE], object]]] = (),
    progress: bool = True,
    history_attrs: Optional[dict] = None,
    dist: Any = None,
    evaluate: bool = True,
    metrics: Optional[EpochMetrics] = None,
) -> xr.Dataset:
    """Train ``vae`` on ``data.train`` until ``config.epochs`` epochs are done; returns the history.

    ``vae`` and ``data`` must already be on the training device. Each epoch visits the
    training set once in a fresh random order, in minibatches of ``config.batch_size``; the
    dataset's labels go to the model as ``y`` when it has them. After each epoch a record is
    appended: ``train_elbo`` (on :func:`train_eval_set`) and ``test_elbo`` (whole test set),
    both with the model in eval mode, unless ``evaluate`` is False (then they are NaN), and the
    values of ``metrics`` (:class:`EpochMetrics`, e.g. M2's test error; NaN too without ``evaluate``).

    ``stepper`` (default: the one ``config.method`` names) and ``state`` carry a resumed run's
    optimizer state and progress. ``callbacks``: :class:`Callback` objects (or plain
    ``fn(epoch, vae)``) for checkpoints, sample grids, curves, early stops; this function
    itself writes no files. A NaN or infinite loss raises :class:`TrainingDiverged` naming
    the step.

    ``dist`` (a :class:`ppl_vae.inference.distributed.DistContext`) makes this one rank of a
    data-parallel run: it trains on its shard of each global batch with gradients averaged
    over ranks, the ELBOs are averaged over ranks, and callbacks run on rank 0 only.
    """
    from tqdm.auto import tqdm

    validate_train_config(config)
    verify_fast_path_on(vae, data)
    state = state or TrainState()
    stepper = stepper or make_stepper(vae, config)
    schedulers = attach_lr_schedulers(stepper, config)
    if dist is not None:
        dist.wrap_stepper(stepper)
    train_labels = data.train_labels
    labelled = train_labels is not None
    if getattr(vae, "num_classes", None) is not None and (not labelled or data.test_labels is None):
        raise DataError(f"model {type(vae).__name__} is conditional and needs labels, but {data.name} has none")
    is_main = dist is None or dist.is_main
    hooks = as_callbacks(callbacks) if is_main else []
    step_hooks = [c for c in hooks if type(c).on_step_end is not Callback.on_step_end]

    x_train = data.train
    split = validation_split(x_train.shape[0], config)
    fit_idx = None if split is None else split[0].to(x_train.device)
    n_train = x_train.shape[0] if split is None else len(split[0])
    ctx = TrainContext(vae, data, config, stepper, state, dict(history_attrs or {}), num_train=n_train)
    # what each ELBO bounds: log p(x | y) for a conditional model, log p(x, y) for M2's labelled points
    for name, bound in bounds_of_training_elbos(vae).items():
        if bound != "log p(x)":
            ctx.descriptions[name] = HISTORY_VARS[name].replace("log p(x)", bound)
    ctx.descriptions["train_loss"] = TRAIN_LOSS + stepper.loss_meaning
    if metrics is not None:
        ctx.descriptions.update(metrics.descriptions)
    device = x_train.device
    batch_size = min(config.batch_size, n_train) if dist is None else dist.local_batch_size(config.batch_size, n_train)
    n_local, world = (n_train, 1) if dist is None else (dist.num_samples(n_train), dist.world_size)
    steps_per_epoch = math.ceil(n_local / batch_size)
    x_eval, labels_eval = (
        train_eval_set(data, config, None if split is None else split[0]) if evaluate else (None, None)
    )
    x_val, labels_val = (
        (None, None)
        if split is None or not evaluate
        else train_eval_set(data, replace(config, train_eval_size=None), split[1])
    )
    stepper.begin(state.step, steps_per_epoch)

    def mean_elbo(x: Any, labels: Optional[torch.Tensor]) -> float:
        if not evaluate or x is None:
            return float("nan")
        if dist is not None:
            x, labels = dist.shard(x), dist.shard(labels)
        kwargs: Dict[str, Any] = {"y": labels} if labels is not None else {}
        if dist is not None and x.shape[0] == 0:  # fewer points than ranks (a 1-point validation set): none here
            return dist.global_mean(torch.zeros(0, dtype=torch.float64, device=x.device))
        vae.eval()
        try:
            value = elbo_per_datapoint(vae.model, vae.guide, x, num_particles=config.eval_num_particles, **kwargs)
        finally:
            vae.train()
        return float(value.mean()) if dist is None else dist.global_mean(value)

    def epoch_metrics() -> Dict[str, float]:
        if metrics is None:
            return {}
        if not evaluate:
            return {name: float("nan") for name in metrics.descriptions}
        vae.eval()
        try:
            values = metrics.compute(vae)
        finally:
            vae.train()
        return {name: float(values[name]) for name in metrics.descriptions}

    def diverged(what: str, step: int) -> TrainingDiverged:
        advice = "a smaller train.lr" + (
            ", a smaller train.clip_grad_norm"
            if config.clip_grad_norm is not None
            else " or gradient clipping (train.clip_grad_norm, e.g. 10)"
        )
        return TrainingDiverged(f"{what} at step {step} (epoch {state.epoch + 1}); try {advice}", step=step)

    def should_stop_early() -> bool:
        if config.early_stopping_patience is None:
            return False
        since = epochs_since_best(state.records)
        return since is not None and since >= config.early_stopping_patience

    for hook in hooks:
        hook.on_train_start(ctx)
    wall = state.records[-1]["wall_time"] if state.records else 0.0
    seen = state.records[-1]["num_train_samples"] if state.records else 0.0
    bar = tqdm(
        total=config.epochs, initial=state.epoch, disable=not progress, desc="epochs", unit="epoch", dynamic_ncols=True
    )
    stop = should_stop_early()  # a resumed run that had already stopped early trains no further
    try:
        vae.train()
        while state.epoch < config.epochs and not stop:
            start = time.perf_counter()
            lr = ctx.lr
            if dist is None:
                order = torch.randperm(n_train, device=device)
            else:
                order = dist.start_epoch(n_train, seed=config.seed, epoch=state.epoch, device=device)
            if fit_idx is not None:
                order = fit_idx[order]
            loss_sum = torch.zeros((), device=device)
            first_bad = torch.full((), -1, dtype=torch.long, device=device)
            kl_weight = 1.0
            for b in range(steps_per_epoch):
                idx = order[b * batch_size : (b + 1) * batch_size]
                x = x_train[idx]
                if data.dynamic_binarization:
                    x = torch.bernoulli(x)
                kl_weight = _kl_weight(config, state.step, steps_per_epoch)
                kwargs = {"y": train_labels[idx]} if train_labels is not None else {}
                try:
                    loss = stepper.step(x, num_data=n_train, kl_weight=kl_weight, **kwargs)
                except NonFiniteLoss as exc:
                    raise diverged(str(exc), state.step + 1) from None
                if stepper.defers_finite_check:  # recorded on the device: no sync here
                    first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), state.step + 1, first_bad)
                loss_sum += loss  # each minibatch loss is scaled to the full data
                state.step += 1
                seen += len(idx) * world
                ctx.last_loss, ctx.kl_weight = loss, kl_weight
                if step_hooks and any([hook.on_step_end(ctx) for hook in step_hooks]):
                    stop = True
                    break
            if stepper.defers_finite_check and int(first_bad) >= 0:
                raise diverged("the loss became non-finite", int(first_bad))
            if stop:
                break
            wall += time.perf_counter() - start
            state.epoch += 1
            record = {
                "epoch": state.epoch,
                "train_elbo": mean_elbo(x_eval, labels_eval),
                "test_elbo": mean_elbo(data.test, data.test_labels),
                "val_elbo": mean_elbo(x_val, labels_val),
                "train_loss": float(loss_sum) / (steps_per_epoch * n_train),
                "kl_weight": kl_weight,
                "lr": lr,
                "wall_time": wall,
                "num_train_samples": seen,
                **stepper.epoch_terms(),
                **epoch_metrics(),
            }
            state.records.append(record)
            for scheduler in schedulers.values():
                if _is_plateau(config.lr_schedule):
                    scheduler.step(record["val_elbo"])
                else:
                    scheduler.step()
            stop = ctx.stopping = should_stop_early()
            bar.update(1)
            bar.set_postfix_str(
                f"ELBO (a lower bound) train {record['train_elbo']:.2f}, test {record['test_elbo']:.2f}"
            )
            for hook in hooks:
                hook.on_epoch_end(ctx)
    finally:
        for hook in hooks:
            hook.on_train_end(ctx)
        bar.close()
        stepper.close()
    return ctx.history()
