"""Training on a .npy larger than the memory it may use: peak RSS against the file's size.

Writes a multi-GB float32 .npy of 28x28 binary images (MNIST training images repeated and
shifted when --data-dir is given, else seeded synthetic ones) to --dir, then trains
``bernoulli_mlp`` on it for one epoch through ``ppl_vae.fit`` in a fresh process, where the
file stays on disk (``load_dataset`` does so for files of 1 GiB or more; ``--mode memory``
loads it instead, for comparison) and the rows of each minibatch are read from it. The child
reports its peak resident set size (``VmHWM``), its RSS before the data was opened, and
the times.

    python benchmarks/bench_memmap.py --gb 3 --data-dir ../shared/datasets/mnist [--mode disk memory]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import loadavg

ROW = (1, 28, 28)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mib() -> float:
    return _status_mib("VmRSS")


def _peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM, which starts afresh at exec (``ru_maxrss`` does not: a
    child started by subprocess inherits the parent's peak, here the parent that wrote the file)."""
    return _status_mib("VmHWM")


def write_file(path: Path, gb: float, data_dir: str | None) -> int:
    """Write about ``gb`` GB of float32 rows without holding them in memory; return the row count."""
    row_bytes = 4 * math.prod(ROW)
    n = int(gb * 1e9 // row_bytes)
    if data_dir:
        from ppl_vae.data import load_dataset

        base = load_dataset("mnist", data_dir, binarize="threshold").train.numpy()
    else:
        base = (np.random.default_rng(0).random((10_000, *ROW)) < 0.13).astype(np.float32)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": (n, *ROW)}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        written = 0
        while written < n:
            # each pass over the base images shifts them by one pixel, so repeats are not identical
            shift = (written // len(base)) % 5 - 2
            chunk = np.roll(base, shift, axis=-1)[: n - written]
            f.write(np.ascontiguousarray(chunk, dtype=np.float32).tobytes())
            written += len(chunk)
    return n


def child(path: str, epochs: int, batch_size: int, hidden_dim: int, mode: str, train_size: int | None) -> dict:
    import torch

    from ppl_vae import pipeline
    from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from ppl_vae.data import datasets

    # "disk" keeps any size on disk; "memory" loads any size into tensors (the old behaviour)
    datasets.ON_DISK_MIN_BYTES = 0 if mode == "disk" else 1 << 62

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    rss_start = _rss_mib()
    config = RunConfig(
        model=ModelConfig(model="bernoulli_mlp", hidden_dim=hidden_dim, latent_dim=20),
        data=DataConfig(dataset=path, train_size=train_size),
        train=TrainConfig(epochs=epochs, batch_size=batch_size, device="cpu"),
    )
    data = pipeline.load_data(config)
    kind = type(data.train).__name__
    del data
    rss_before_fit = _rss_mib()
    out = Path(tempfile.mkdtemp(prefix="bench-memmap-run-"))
    start = time.perf_counter()
    try:
        run = pipeline.fit(config, out / "run", progress=False)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {
        "train_type": kind,
        "rss_after_imports_mib": rss_start,
        "rss_after_load_mib": rss_before_fit,
        "peak_rss_mib": _peak_rss_mib(),
        "fit_seconds": time.perf_counter() - start,
        "train_seconds": run.final["wall_time"],
        "test_elbo": run.final["test_elbo"],
        "num_train": int(run.history.attrs["num_train"]),
        "num_test": int(run.history.attrs["num_test"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=3.0, help="Size of the .npy to write (GB, 1e9 bytes).")
    parser.add_argument("--dir", default="/tmp", help="Where to write it (removed afterwards).")
    parser.add_argument("--data-dir", default=None, help="MNIST IDX files (default: synthetic images).")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="Train on this many of the training rows (random rows of the file; default all). "
        "The whole file is still scanned at load and the whole test split evaluated.",
    )
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--hidden-dim", type=int, default=200)
    parser.add_argument("--keep", action="store_true", help="Keep the .npy file.")
    parser.add_argument(
        "--mode",
        nargs="+",
        choices=["disk", "memory"],
        default=["disk"],
        help="disk: rows read per batch (the default for files >= 1 GiB); memory: loaded into "
        "tensors (the default below 1 GiB). Each runs in its own process.",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(
            json.dumps(child(args.child, args.epochs, args.batch_size, args.hidden_dim, args.mode[0], args.train_size))
        )
        return

    free = shutil.disk_usage(args.dir).free
    if free < 1.5 * args.gb * 1e9:
        sys.exit(f"{args.dir} has {free / 1e9:.1f} GB free: too little for a {args.gb} GB file")
    path = Path(args.dir) / f"bench-memmap-{os.getpid()}.npy"
    try:
        t0 = time.perf_counter()
        n = write_file(path, args.gb, args.data_dir)
        size = path.stat().st_size
        print(
            f"wrote {path}: {n:,} rows of {ROW}, {size / 2**30:.2f} GiB, in {time.perf_counter() - t0:.1f} s "
            f"({args.dir}: {free / 1e9:.0f} GB free before)"
        )
        for mode in args.mode:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                str(path),
                "--epochs",
                str(args.epochs),
                "--batch-size",
                str(args.batch_size),
                "--hidden-dim",
                str(args.hidden_dim),
                "--mode",
                mode,
            ]
            if args.train_size:
                cmd += ["--train-size", str(args.train_size)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(proc.stderr)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(
                f"[{mode}] bernoulli_mlp 784-{args.hidden_dim}-20, batch {args.batch_size}, {args.epochs} epoch(s), "
                f"{r['num_train']:,} train / {r['num_test']:,} test rows, data held as {r['train_type']}"
            )
            print(
                f"[{mode}] fit: {r['fit_seconds']:.1f} s in all, {r['train_seconds']:.1f} s training "
                f"({r['num_train'] * args.epochs / r['train_seconds']:,.0f} rows/s); test ELBO {r['test_elbo']:.2f} "
                f"nats per datapoint (Monte Carlo estimate of a lower bound); load average {loadavg()}"
            )
            print(
                f"[{mode}] RSS after imports {r['rss_after_imports_mib']:.0f} MiB, after opening the data "
                f"{r['rss_after_load_mib']:.0f} MiB, peak {r['peak_rss_mib']:.0f} MiB; peak RSS / file size "
                f"{r['peak_rss_mib'] / (size / 2**20):.3f} ({r['peak_rss_mib']:.0f} MiB for a {size / 2**20:.0f} MiB file)"
            )
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
