"""Inference: SVI training and importance-weighted estimators."""

from ppl_vae.inference import (  # noqa: F401,E402  (registers methods "mcem", "wake-sleep")
    disentangle,  # noqa: F401,E402  (registers objectives "beta_vae", "beta_tc", ...)
    mcem,
    objectives,  # noqa: F401,E402  (registers "iwae", "dreg", "stl", "rws")
    semi_amortized,  # noqa: F401,E402  (registers "sa")
    wake_sleep,
)
from ppl_vae.inference.importance import elbo_per_datapoint, iw_log_px, log_importance_weights
from ppl_vae.inference.training import ELBOS, OPTIMIZERS, TrainState, resolve_device, train

__all__ = [
    "ELBOS",
    "OPTIMIZERS",
    "TrainState",
    "elbo_per_datapoint",
    "iw_log_px",
    "log_importance_weights",
    "resolve_device",
    "train",
]
