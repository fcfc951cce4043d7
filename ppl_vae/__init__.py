"""ppl_vae: variational autoencoders as Pyro probabilistic programs.

Kingma & Welling, "Auto-Encoding Variational Bayes" (arXiv:1312.6114): a VAE is a Pyro
model/guide pair, the amortized guide (encoder) is trained with SVI, and analysis modules
compare it with per-datapoint mean-field VI and importance-weighted estimates of log p(x).
"""

__version__ = "0.1.0"

from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from ppl_vae.data.datasets import Dataset, load_dataset  # noqa: E402
from ppl_vae.models import VAE, build_vae  # noqa: E402
from ppl_vae.pipeline import Run, fit, load_run, resume  # noqa: E402

__all__ = [
    "DataConfig",
    "Dataset",
    "ModelConfig",
    "Run",
    "RunConfig",
    "TrainConfig",
    "VAE",
    "build_vae",
    "fit",
    "load_dataset",
    "load_run",
    "resume",
]
