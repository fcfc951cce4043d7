"""The ladder VAE with and without batch normalisation against ``two_layer`` on fixed binarized
MNIST, test ELBO per epoch (issue 26, item 1; docs/hierarchical.md, "The ladder VAE with batch
normalisation").

Data: Larochelle & Murray's fixed binarization (``binarized_mnist_{train,test}.amat.gz`` in
--data-dir, see its SOURCE.md), written once to ``--out/binarized_mnist.npz`` (the first
--train-size training images, the first --test-size test images, (N, 1, 28, 28) in {0, 1}) and
read with ``--dataset PATH.npz --binarize none``. Every run goes through the command line as a
user would: batch 100, Adam at 1e-3, ``--method svi`` (the ELBO, one sample), seed 0, CPU, one
thread (OMP_NUM_THREADS=1), --epochs epochs; the per-epoch test ELBO is the library's own (one
sample per test image, in eval mode: batch normalisation uses its running statistics).

    cd benchmarks
    ../.venv/bin/python ladder_mnist.py --data-dir ../../shared/datasets/binarized_mnist --out /tmp/ladder

Prints each command with its wall and CPU time, then the test ELBO per epoch of every run.
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np
from common import run_command  # benchmarks/ is the script's folder, first on sys.path

PPL_VAE = [sys.executable, "-m", "ppl_vae.cli"]

RUNS = {
    "ladder": ["--model", "ladder"],  # batch normalisation on: the default
    "ladder_no_bn": ["--model", "ladder", "--model-option", "batch_norm=false"],
    "ladder_warmup": ["--model", "ladder", "--kl-warmup", "2"],
    "ladder_warmup_layers": [
        *("--model", "ladder", "--kl-warmup", "2", "--model-option", "kl_warmup_fractions=[0.5,1.0]"),
    ],
    "two_layer": ["--model", "two_layer"],
    "two_layer_bn": ["--model", "two_layer", "--model-option", "batch_norm=true"],
    "ladder5": ["--model", "ladder", "--model-option", "latent_dims=[64,32,16,8,4]", "--hidden-dim", "512"],
}


def read_amat(path: Path, limit: int) -> np.ndarray:
    rows = []
    with gzip.open(path, "rt") as fh:
        for line in fh:
            rows.append(np.array(line.split(), dtype=np.uint8))
            if len(rows) == limit:
                break
    return np.stack(rows).reshape(-1, 1, 28, 28).astype(np.float32)


def write_data(args) -> Path:
    out = args.out / "binarized_mnist.npz"
    if not out.exists():
        train = read_amat(args.data_dir / "binarized_mnist_train.amat.gz", args.train_size)
        test = read_amat(args.data_dir / "binarized_mnist_test.amat.gz", args.test_size)
        np.savez(out, train=train, test=test)
    return out


def timed(cmd, log) -> float:
    """CPU seconds of the command (:func:`common.run_command`)."""
    return run_command(cmd, log)["cpu_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, required=True, help="folder of binarized_mnist_*.amat.gz")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--test-size", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--runs", nargs="+", default=["ladder", "ladder_no_bn", "two_layer"], choices=list(RUNS))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from ppl_vae.runs import checkpoint_epoch

    args.out.mkdir(parents=True, exist_ok=True)
    data = write_data(args)
    common = [
        "--dataset", str(data), "--binarize", "none", "--epochs", str(args.epochs), "--batch-size", "100",
        "--lr", "1e-3", "--method", "svi", "--seed", str(args.seed), "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    total = 0.0
    for name in args.runs:
        run_dir = args.out / name
        cmd = [*PPL_VAE, "fit", *RUNS[name], *common, "--out", str(run_dir)]
        if (run_dir / "history.nc").exists():  # done before: continued to --epochs, or kept as it is
            if checkpoint_epoch(run_dir) >= args.epochs:
                print(f"{name}: {run_dir} has done {args.epochs} epochs already", flush=True)
                continue
            cmd = [*PPL_VAE, "fit", "--resume", str(run_dir), "--epochs", str(args.epochs), "--no-progress"]
        total += timed(cmd, args.out / f"{name}.log")
    print(f"CPU time of the fits: {total / 60:.1f} min; load average {Path('/proc/loadavg').read_text().strip()}")

    from ppl_vae.runs import load_history

    print("\ntest ELBO (nats per image) by epoch")
    print("| run | " + " | ".join(str(e) for e in range(1, args.epochs + 1)) + " |")
    for name in args.runs:
        h = load_history(args.out / name)
        cells = [f"{v:.1f}" for v in h.test_elbo.values[: args.epochs]]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
