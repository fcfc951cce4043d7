"""Peer benchmark: ppl_vae training against pythae's TrainingPipeline and a hand-written loop.

Three sides, each in a fresh process, alternated ``--repeats`` times in one run of this script:

- ``ppl_vae``: :func:`ppl_vae.fit` with its defaults for ``bernoulli_mlp`` (784-500-20 tanh MLPs,
  AEVB appendix C.1; Adam 1e-3, fused ELBO), ``--batch-size``; training time from the history's
  ``wall_time`` (its per-epoch ELBO evaluations are excluded, checkpoints included);
- ``pythae``: ``pythae.pipelines.TrainingPipeline`` with a ``pythae.models.VAE`` of the same
  784-500-20 tanh encoder/decoder (BCE reconstruction, analytic KL), Adam 1e-3, the same batch
  size, no evaluation set; time around the pipeline call (its final model save included). It
  runs in a separate environment (``--pythae-python``, e.g. ``/tmp/pythae-venv/bin/python``
  with ``pip install torch==2.13.0 pythae``): pythae is never installed beside ppl_vae;
- ``hand-written``: the plain PyTorch loop of ``common.handwritten_epoch`` (Adam 1e-3, one
  reparameterized draw, BCE with logits) on ppl_vae's modules.

All read the first ``--num-data`` MNIST training images from ``--data-dir`` and binarize them at
0.5. Every process gets the same torch thread count (``--threads``, default: all cores). The
script prints each side's median seconds per epoch and the ratios ppl_vae / pythae and
ppl_vae / hand-written from this one run (median and range over the repeats, pairs taken from the
same round).

    python bench_pythae.py --data-dir ../../shared/datasets/mnist --pythae-python /tmp/pythae-venv/bin/python
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import loadavg

HERE = Path(__file__).resolve().parent

LOAD = r"""
import gzip, numpy as np, torch
def load_mnist(folder, n):
    with gzip.open(folder + "/train-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:n]
    return torch.from_numpy((raw.astype(np.float32) / 255.0 > 0.5).astype(np.float32))
"""

PYTHAE = (
    LOAD
    + r"""
import sys, time, torch, tempfile
from torch import nn
from pythae.models import VAE, VAEConfig
from pythae.models.nn import BaseEncoder, BaseDecoder
from pythae.models.base.base_utils import ModelOutput
from pythae.pipelines import TrainingPipeline
from pythae.trainers import BaseTrainerConfig
data_dir, n, batch, epochs, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
class Encoder(BaseEncoder):
    def __init__(self):
        super().__init__(); self.hidden = nn.Linear(784, 500); self.loc = nn.Linear(500, 20); self.log_var = nn.Linear(500, 20)
    def forward(self, x):
        h = torch.tanh(self.hidden(x.reshape(x.shape[0], -1)))
        return ModelOutput(embedding=self.loc(h), log_covariance=self.log_var(h))
class Decoder(BaseDecoder):
    def __init__(self):
        super().__init__(); self.hidden = nn.Linear(20, 500); self.out = nn.Linear(500, 784)
    def forward(self, z):
        return ModelOutput(reconstruction=torch.sigmoid(self.out(torch.tanh(self.hidden(z)))).reshape(-1, 1, 28, 28))
x = load_mnist(data_dir, n)
torch.manual_seed(0)
model = VAE(VAEConfig(input_dim=(1, 28, 28), latent_dim=20, reconstruction_loss="bce"), encoder=Encoder(), decoder=Decoder())
with tempfile.TemporaryDirectory() as out:
    config = BaseTrainerConfig(output_dir=out, num_epochs=epochs, learning_rate=1e-3, per_device_train_batch_size=batch,
                               optimizer_cls="Adam", no_cuda=True)
    start = time.perf_counter()
    TrainingPipeline(training_config=config, model=model)(train_data=x)
    print("TRAIN_SECONDS", time.perf_counter() - start)
"""
)

HANDWRITTEN = (
    LOAD
    + r"""
import sys, time, torch
sys.path.insert(0, sys.argv[6])
from common import handwritten_epoch, users_tanh
from ppl_vae.models import build_vae
data_dir, n, batch, epochs, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
x = load_mnist(data_dir, n)
torch.manual_seed(0)
vae = users_tanh(build_vae("bernoulli_mlp", x.shape[1:], latent_dim=20, hidden_dim=500))
opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
print("TRAIN_SECONDS", sum(handwritten_epoch(vae, opt, x, batch) for _ in range(epochs)))
"""
)

PPL_VAE = (
    LOAD
    + r"""
import sys, tempfile, torch
import ppl_vae
from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
data_dir, n, batch, epochs, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
config = RunConfig(model=ModelConfig(model="bernoulli_mlp", latent_dim=20, hidden_dim=500),
                   data=DataConfig(dataset="mnist", data_dir=data_dir, binarize="threshold", train_size=n),
                   train=TrainConfig(epochs=epochs, batch_size=batch, device="cpu"))
with tempfile.TemporaryDirectory() as out:
    run = ppl_vae.fit(config, out + "/run", progress=False)
    print("TRAIN_SECONDS", float(run.history["wall_time"].values[-1]))
"""
)


def side(python: str, script: str, args: list) -> tuple[float, float]:
    start = time.perf_counter()
    out = subprocess.run([python, "-c", script, *map(str, args)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    line = [s for s in out.stdout.splitlines() if s.startswith("TRAIN_SECONDS")]
    if out.returncode or not line:
        raise SystemExit(f"{python} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return float(line[0].split()[1]), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--pythae-python", required=True, help="the python of an environment with pythae installed")
    parser.add_argument("--num-data", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    threads = args.threads or len(os.sched_getaffinity(0))
    data_dir = str(Path(args.data_dir).resolve())
    common = [data_dir, args.num_data, args.batch_size, args.epochs, threads, HERE]
    sides = {
        "ppl_vae": (sys.executable, PPL_VAE),
        "pythae": (args.pythae_python, PYTHAE),
        "hand-written": (sys.executable, HANDWRITTEN),
    }
    train = {k: [] for k in sides}
    wall = {k: [] for k in sides}
    print(
        f"{args.num_data} MNIST images, batch {args.batch_size}, {args.epochs} epoch(s), {threads} threads per process"
    )
    for r in range(args.repeats):
        for name, (python, script) in sides.items():
            t, w = side(python, script, common)
            train[name].append(t / args.epochs)
            wall[name].append(w)
            print(
                f"  round {r + 1}: {name:<12} {t / args.epochs:7.2f} s/epoch training, {w:7.2f} s process "
                f"(load average {loadavg()})",
                flush=True,
            )
    for name in sides:
        print(
            f"{name:<12} median {statistics.median(train[name]):.2f} s/epoch, process {statistics.median(wall[name]):.2f} s"
        )
    for other in ("pythae", "hand-written"):
        for what, d in (("per epoch", train), ("whole process", wall)):
            ratios = [a / b for a, b in zip(d["ppl_vae"], d[other])]
            print(
                f"ppl_vae / {other} {what}: median {statistics.median(ratios):.3f}x "
                f"({min(ratios):.3f}-{max(ratios):.3f}x, {len(ratios)} rounds)"
            )


if __name__ == "__main__":
    main()
