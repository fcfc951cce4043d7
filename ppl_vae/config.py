"""Plain dataclass configs that round-trip through JSON (a run directory's ``config.json``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Optional, Type, TypeVar

T = TypeVar("T")


@dataclass
class ModelConfig:
    """Which model to build; ``None`` takes the model's own default."""

    model: str = "gaussian_mlp"
    prior: str = "standard_normal"
    likelihood: Optional[str] = None
    latent_dim: Optional[int] = None
    hidden_dim: Optional[int] = None
    prior_options: Dict[str, Any] = field(default_factory=dict)
    likelihood_options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Which data to load (see :func:`ppl_vae.data.load_dataset`)."""

    dataset: str = "digits"
    data_dir: Optional[str] = None
    binarize: str = "none"
    test_fraction: float = 0.2
    split_seed: int = 0
    train_size: Optional[int] = None


@dataclass
class TrainConfig:
    """How to train: method, SVI objective, optimizer, schedule, device.

    ``method``: a name from :data:`ppl_vae.inference.training.METHODS` ("svi" is AEVB).
    ``elbo``: "trace" (AEVB's SGVB estimator A, Trace_ELBO), "mean_field" (estimator B,
    analytic KL where one exists, TraceMeanField_ELBO), or their JIT-compiled variants
    "jit_trace" and "jit_mean_field". ``kl_warmup_epochs``: the KL weight rises linearly from
    0 to 1 over this many epochs (0: no warm-up). ``fused_elbo``: for VAEs whose model and guide
    are the base class's, compute the same estimator without Pyro's tracing (faster, equal
    values; see :mod:`ppl_vae.inference.fused`); False always goes through Pyro.
    ``finite_check``: when SVI checks that the loss is finite — "step" (before every update,
    one host-device sync per step), "epoch" (tracked on the device, checked at each epoch's
    end: no per-step sync, but updates after a NaN step are wasted), "auto" (step on CPU,
    epoch on CUDA). Either way a NaN stops training with the step named and the last good
    checkpoint kept.
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


@dataclass
class RunConfig:
    """Everything needed to rebuild and continue a run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError("config must be a JSON object")
        return cls(
            model=_from_dict(ModelConfig, raw.get("model", {}), "model"),
            data=_from_dict(DataConfig, raw.get("data", {}), "data"),
            train=_from_dict(TrainConfig, raw.get("train", {}), "train"),
        )


def _from_dict(cls: Type[T], raw: Any, section: str) -> T:
    if not isinstance(raw, dict):
        raise ValueError(f"config section {section!r} must be a JSON object")
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"config section {section!r} has unknown key(s): {', '.join(unknown)}")
    return cls(**raw)
