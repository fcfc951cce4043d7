"""Whole-process cost of ``ppl-vae fit`` against a hand-written PyTorch script doing the same.

Each side is a fresh process timed from start to exit (imports, reading the IDX files,
training, the per-epoch ELBOs on the fixed 1,000-point training subset and the whole test set,
checkpoints), alternately, ``--repeats`` times; the ratio is ppl-vae / hand-written per pair.
The ppl-vae side is the plain command with its defaults (``gaussian_mlp``, Adam 1e-3, batch
100, ``train_eval_size`` 1000); the other is ``handwritten_fit.py`` beside this file. Also
timed: ``ppl-vae --help`` and ``python -c "import torch"`` (start-up cost).

    python benchmarks/bench_whole_process.py --data-dir ../shared/datasets/mnist --epochs 3 --repeats 3

``--dataset fashion-mnist`` runs on Fashion-MNIST's IDX files where they are installed.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


ENV = dict(os.environ)


def timed(cmd: list[str]) -> tuple[float, str, float]:
    """(wall seconds, first line of output, CPU seconds user + system) of one fresh process.

    CPU time is the steadier measure on a shared machine: waiting for a core inflates wall
    time but not CPU time (cache and memory-bandwidth contention still shows in both)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else "", cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="Folder with the four IDX gzip files.")
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--startup-repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS for both sides (default: torch's own choice)"
    )
    args = parser.parse_args()
    if args.threads:
        ENV["OMP_NUM_THREADS"] = ENV["MKL_NUM_THREADS"] = str(args.threads)

    exe = Path(sys.executable).with_name("ppl-vae")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f} at start, OMP_NUM_THREADS={ENV.get('OMP_NUM_THREADS', 'unset')}"
    )
    helps = [timed([str(exe), "--help"])[0] for _ in range(args.startup_repeats)]
    torches = [timed([sys.executable, "-c", "import torch"])[0] for _ in range(args.startup_repeats)]
    print(
        f"ppl-vae --help: median {statistics.median(helps):.3f} s (range {min(helps):.3f}-{max(helps):.3f}, "
        f"{len(helps)} runs); python -c 'import torch': median {statistics.median(torches):.3f} s"
    )

    work = Path(tempfile.mkdtemp(prefix="bench-whole-"))
    wall, cpu = {"ours": [], "theirs": []}, {"ours": [], "theirs": []}
    try:
        for i in range(args.repeats):
            t_theirs, line_theirs, c_theirs = timed(
                [
                    sys.executable,
                    str(HERE / "handwritten_fit.py"),
                    "--data-dir",
                    args.data_dir,
                    "--epochs",
                    str(args.epochs),
                    "--out",
                    str(work / f"hw{i}"),
                ]
            )
            t_ours, line_ours, c_ours = timed(
                [
                    str(exe),
                    "fit",
                    "--dataset",
                    args.dataset,
                    "--data-dir",
                    args.data_dir,
                    "--epochs",
                    str(args.epochs),
                    "--out",
                    str(work / f"run{i}"),
                    "--no-progress",
                ]
            )
            wall["ours"].append(t_ours), wall["theirs"].append(t_theirs)
            cpu["ours"].append(c_ours), cpu["theirs"].append(c_theirs)
            print(
                f"pair {i + 1}: ppl-vae fit {t_ours:.1f} s wall / {c_ours:.1f} s CPU, hand-written "
                f"{t_theirs:.1f} s wall / {c_theirs:.1f} s CPU; ratios {t_ours / t_theirs:.3f} wall, "
                f"{c_ours / c_theirs:.3f} CPU (load average {os.getloadavg()[0]:.1f})"
            )
            print(f"  ppl-vae:      {line_ours}")
            print(f"  hand-written: {line_theirs}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for what, times in (("wall", wall), ("CPU", cpu)):
        ratios = [a / b for a, b in zip(times["ours"], times["theirs"])]
        print(
            f"{args.dataset}, {args.epochs} epochs, whole process, {what} time: ppl-vae fit median "
            f"{statistics.median(times['ours']):.1f} s, hand-written median {statistics.median(times['theirs']):.1f} s; "
            f"ratio ppl-vae / hand-written median {statistics.median(ratios):.3f} "
            f"(range {min(ratios):.3f}-{max(ratios):.3f}, {len(ratios)} interleaved pairs)"
        )


if __name__ == "__main__":
    main()
