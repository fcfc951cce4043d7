"""Test log p̂(x) of the one-layer, two-layer and ladder VAEs on dynamically binarized MNIST at
equal epochs, through the command line exactly as a user would run it (docs/hierarchical.md).

Every run: the same training subset (the first --train-size MNIST training images, binarized
afresh each step), Adam at 1e-3, batch --batch-size (20, Burda et al.'s), the ELBO (``--method svi``), --epochs epochs, seed 0.
The ladder VAE also runs with its per-layer KL warm-up (z1's weight reaches 1 halfway through
the warm-up, z2's at its end). Then one ``ppl-vae compare RUN1 RUN2 ... --estimator iw``
scores every run on the same seeded subset of --num-datapoints test images with K importance
samples of its own guide, with paired differences to the first run.

    cd benchmarks
    ../.venv/bin/python hierarchical_mnist.py --data-dir ../../shared/datasets/mnist --out /tmp/hier

It prints each command, its wall and CPU time, and the paired table; everything lands in --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import run_command  # benchmarks/ is the script's folder, first on sys.path

HERE = Path(__file__).resolve().parent
PPL_VAE = [sys.executable, "-m", "ppl_vae.cli"]


def runs(args):
    common = [
        "--dataset",
        "mnist",
        "--data-dir",
        str(args.data_dir),
        "--binarize",
        "dynamic",
        "--train-size",
        str(args.train_size),
        "--epochs",
        str(args.epochs),
        "--method",
        "svi",
        "--batch-size",
        str(args.batch_size),
        "--lr",
        "1e-3",
        "--seed",
        "0",
        "--device",
        "cpu",
        "--no-progress",
    ]
    yield "one_layer", ["--model", "one_layer"] + common
    yield "two_layer", ["--model", "two_layer"] + common
    yield "ladder", ["--model", "ladder"] + common
    yield (
        "ladder_warmup",
        ["--model", "ladder", "--kl-warmup", str(args.warmup), "--model-option", "kl_warmup_fractions=[0.5,1.0]"]
        + common,
    )


def timed(cmd, log):
    """CPU seconds of the command (:func:`common.run_command`)."""
    return run_command(cmd, log)["cpu_s"]


def diagnostics(dirs, num_datapoints: int) -> None:
    """KL and active units per latent site on the compare's test subset (collapse_diagnostics)."""
    import torch

    from ppl_vae.analysis.diagnostics import collapse_diagnostics
    from ppl_vae.pipeline import load_run
    from ppl_vae.reports.common import select_datapoints
    from ppl_vae.reports.compare import active_units_line

    torch.set_num_threads(1)
    for run_dir in dirs:
        run = load_run(run_dir, "cpu")
        sel = select_datapoints(run, "test", num_datapoints, 0)
        start = time.process_time()
        ds = collapse_diagnostics(run.vae.model, run.vae.guide, sel.x)
        print(
            f"{run_dir.name}: active units {active_units_line(ds)}; total KL {float(ds['kl'].sum()):.2f} nats "
            f"({time.process_time() - start:.0f} s CPU)",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=20, help="Burda et al. used 20")
    p.add_argument("--runs", nargs="+", default=["one_layer", "two_layer", "ladder", "ladder_warmup"])
    p.add_argument("--warmup", type=int, default=10, help="KL warm-up epochs of the ladder_warmup run")
    p.add_argument("--num-samples", type=int, default=5000)
    p.add_argument("--num-datapoints", type=int, default=500)
    p.add_argument("--diagnostics-only", action="store_true", help="only the per-site KL / active units of the runs")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    total = 0.0
    dirs = []
    for name, opts in runs(args):
        if name not in args.runs:
            continue
        run_dir = args.out / name
        dirs.append(run_dir)
        if args.diagnostics_only:
            continue
        if (run_dir / "history.nc").exists():
            print(f"{run_dir} exists: kept")
            continue
        total += timed(PPL_VAE + ["fit"] + opts + ["--out", str(run_dir)], args.out / f"fit_{name}.log")
    if args.diagnostics_only:
        diagnostics(dirs, args.num_datapoints)
        return
    compare = PPL_VAE + [
        "compare",
        *map(str, dirs),
        "--estimator",
        "iw",
        "-k",
        str(args.num_samples),
        "--num-datapoints",
        str(args.num_datapoints),
        "--seed",
        "0",
        "--no-progress",
        "--out",
        str(args.out / "multirun"),
    ]
    total += timed(compare, args.out / "compare.log")
    print((args.out / "compare.log").read_text())
    print(f"total CPU time of the commands: {total / 60:.1f} min")
    diagnostics(dirs, args.num_datapoints)


if __name__ == "__main__":
    main()
