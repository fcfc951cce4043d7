"""ppl_vae: variational autoencoders as Pyro probabilistic programs.

Kingma & Welling, "Auto-Encoding Variational Bayes" (arXiv:1312.6114): a VAE is a Pyro
model/guide pair, the amortized guide (encoder) is trained with SVI, and analysis modules
compare it with per-datapoint mean-field VI and importance-weighted estimates of log p(x).

The top-level names load lazily (PEP 562): ``import ppl_vae`` and ``ppl-vae --help`` import
neither torch nor Pyro; the first use of e.g. ``ppl_vae.fit`` imports what it needs.
"""

from __future__ import annotations

import importlib as _importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "DataConfig": "ppl_vae.config",
    "ModelConfig": "ppl_vae.config",
    "RunConfig": "ppl_vae.config",
    "TrainConfig": "ppl_vae.config",
    "Dataset": "ppl_vae.data.datasets",
    "load_dataset": "ppl_vae.data.datasets",
    "VAE": "ppl_vae.models",
    "build_vae": "ppl_vae.models",
    "Run": "ppl_vae.pipeline",
    "fit": "ppl_vae.pipeline",
    "load_run": "ppl_vae.pipeline",
    "resume": "ppl_vae.pipeline",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from ppl_vae.data.datasets import Dataset, load_dataset
    from ppl_vae.models import VAE, build_vae
    from ppl_vae.pipeline import Run, fit, load_run, resume


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ppl_vae' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({n for n in globals() if not n.startswith("_")} | set(_LAZY) | {"__version__"})
