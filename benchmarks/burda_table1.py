"""Burda, Grosse & Salakhutdinov (2015), Table 1, MNIST rows "VAE k=1" and "IWAE k=5" for one and
two stochastic layers, at a CPU budget: the paper's settings except the number of epochs.

Every run goes through the command line as a user would type it (docs/hierarchical.md reports the
output):

- data: the 60,000 MNIST training images, binarized afresh at every step (``--binarize dynamic``,
  as the paper's code does), the 10,000 test images binarized once;
- architecture: ``one_layer`` (x-200-200-z 50, tanh) and ``two_layer`` (x-200-200-z1 100-100-100-z2
  50, tanh), the paper's, without batch normalisation;
- optimiser: Adam, lr 1e-3, beta1 0.9, beta2 0.999, eps 1e-4, batch 20, the paper's schedule
  (``--lr-schedule BurdaLR``: 3^i epochs at 1e-3 * 10^(-i/7)), truncated at --epochs;
- objective: the ELBO (``--method svi``, k = 1) or the IWAE bound with k = 5 (``--method iwae
  --num-particles 5``);
- score: ``ppl-vae evaluate RUN -k 5000 --num-datapoints 0`` (IW with 5,000 samples of the run's
  own guide on every test image), the paper's estimate.

    ../.venv/bin/python burda_table1.py --data-dir ../../shared/datasets/mnist --out /tmp/burda \
        --runs vae1 iwae1          # in one shell
    ../.venv/bin/python burda_table1.py --data-dir ../../shared/datasets/mnist --out /tmp/burda \
        --runs vae2 iwae2          # in another; then, when all four are done:
    ../.venv/bin/python burda_table1.py --data-dir ../../shared/datasets/mnist --out /tmp/burda --table

Runs and evaluations already in --out are kept; a fit that stopped early is resumed. One torch thread per command; the wall and CPU
time of every command and the load average before and after it are printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import run_command

PPL_VAE = [sys.executable, "-m", "ppl_vae.cli"]

#: run name -> (model, method options, the paper's Table 1 log p(x) at 3,280 epochs, K = 5000)
RUNS = {
    "vae1": ("one_layer", ["--method", "svi"], -86.76),
    "iwae1": ("one_layer", ["--method", "iwae", "--num-particles", "5"], -85.54),
    "vae2": ("two_layer", ["--method", "svi"], -85.33),
    "iwae2": ("two_layer", ["--method", "iwae", "--num-particles", "5"], -83.89),
}
LABELS = {
    "vae1": "one stochastic layer, VAE (k = 1)",
    "iwae1": "one stochastic layer, IWAE (k = 5)",
    "vae2": "two stochastic layers, VAE (k = 1)",
    "iwae2": "two stochastic layers, IWAE (k = 5)",
}


def fit_command(name: str, args: argparse.Namespace, run_dir: Path) -> list:
    model, method, _ = RUNS[name]
    return PPL_VAE + [
        "fit",
        "--model",
        model,
        *method,
        "--dataset",
        "mnist",
        "--data-dir",
        str(args.data_dir),
        "--binarize",
        "dynamic",
        "--epochs",
        str(args.epochs),
        *(["--train-size", str(args.train_size)] if args.train_size else []),
        "--batch-size",
        "20",
        "--lr",
        "1e-3",
        "--adam-eps",
        "1e-4",
        "--adam-beta1",
        "0.9",
        "--adam-beta2",
        "0.999",
        "--lr-schedule",
        "BurdaLR",
        "--seed",
        str(args.seed),
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(run_dir),
    ]


def evaluate_command(run_dir: Path, args: argparse.Namespace) -> list:
    return PPL_VAE + [
        "evaluate",
        str(run_dir),
        "--estimator",
        "iw",
        "-k",
        str(args.num_samples),
        "--num-datapoints",
        str(args.num_datapoints),
        "--seed",
        "0",
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(run_dir.parent / f"{run_dir.name}_iw"),
    ]


def epochs_done(run_dir: Path) -> int:
    """Epochs in the run's history (0 when there is none)."""
    if not (run_dir / "history.nc").is_file():
        return 0
    import xarray as xr

    with xr.open_dataset(run_dir / "history.nc") as hist:
        return int(hist.sizes["epoch"])


def timed(cmd: list, log: Path) -> dict:
    """:func:`common.run_command`, its times kept beside the log for the table."""
    info = run_command(cmd, log)
    log.with_suffix(".json").write_text(json.dumps(info))
    return info


def table(args: argparse.Namespace) -> None:
    import numpy as np
    import xarray as xr

    print(
        f"| run | log p̂(x), IW K={args.num_samples} (± se) | test ELBO (last epoch) | published log p̂(x) "
        "(3,280 epochs) | fit CPU min | IW CPU min |"
    )
    print("|---|---|---|---|---|---|")
    for name, (_, _, published) in RUNS.items():
        run_dir = args.out / name
        iw_dir = run_dir.parent / f"{name}_iw"
        files = sorted(iw_dir.glob("*.nc")) if iw_dir.is_dir() else []
        if not (run_dir / "history.nc").is_file() or not files:
            print(f"| {LABELS[name]} | not run | | {published:.2f} | | |")
            continue
        with xr.open_dataset(files[0]) as ds:
            values = np.asarray(ds["log_px"], dtype=np.float64)
        with xr.open_dataset(run_dir / "history.nc") as hist:
            elbo = float(hist["test_elbo"][-1])
        fit_cpu = json.loads((args.out / f"fit_{name}.json").read_text())["cpu_s"] / 60
        iw_cpu = json.loads((args.out / f"evaluate_{name}.json").read_text())["cpu_s"] / 60
        mean, se = values.mean(), values.std(ddof=1) / np.sqrt(values.size)
        print(
            f"| {LABELS[name]} | {mean:.2f} ± {se:.2f} | {elbo:.2f} | {published:.2f} | {fit_cpu:.1f} | {iw_cpu:.1f} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=list(RUNS))
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=int, default=0, help="first N training images (0: all 60,000; for a smoke run)")
    p.add_argument("--num-samples", type=int, default=5000, help="IW samples per test image (the paper's 5000)")
    p.add_argument("--num-datapoints", type=int, default=0, help="test images scored (0: all 10,000)")
    p.add_argument("--table", action="store_true", help="only print the table of what is in --out")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.table:
        table(args)
        return
    for name in args.runs:
        run_dir = args.out / name
        done = epochs_done(run_dir)
        if done == 0:
            timed(fit_command(name, args, run_dir), args.out / f"fit_{name}.log")
        elif done < args.epochs:  # an interrupted fit continues from its last checkpoint
            resume = PPL_VAE + ["fit", "--resume", str(run_dir), "--epochs", str(args.epochs), "--no-progress"]
            timed(resume, args.out / f"fit_{name}_resume.log")
        if not (args.out / f"evaluate_{name}.json").is_file():
            timed(evaluate_command(run_dir, args), args.out / f"evaluate_{name}.log")
    table(args)


if __name__ == "__main__":
    main()
