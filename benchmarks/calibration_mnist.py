"""Is the amortized posterior calibrated? ``ppl-vae calibrate`` on five trained MNIST runs, and
the encoder beside its refined q and SIR on the same simulations (issue 27).

Stage ``train`` fits each row with :func:`ppl_vae.pipeline.fit` (what ``ppl-vae fit`` does): MNIST
with dynamic binarization, the first ``--train-size`` training images, ``--epochs`` epochs (per
row: ``--epochs-row ROW=N``), batch 100, Adam 1e-3, seed 0, one torch thread. Stage ``calibrate``
runs :func:`ppl_vae.reports.calibration.calibrate_run` on each run (SBC of the encoder, of SIR
with ``--sir`` proposals and, with ``--refine`` K, of the refined q; predictive checks; m2's
q(y|x) against p(y|x) and the labels) and writes its files and ``calibration.html`` into
RUN/calibration. Each stage prints one JSON line per row with its seconds and ``/proc/loadavg``
before and after (the machine is shared), and ``summary`` prints the table docs/calibration.md
quotes, from the netCDF files alone.

    python benchmarks/calibration_mnist.py train --data-dir /work/shared/datasets/mnist --out calib-runs
    python benchmarks/calibration_mnist.py calibrate --out calib-runs --refine 100 --sir 1000
    python benchmarks/calibration_mnist.py summary --out calib-runs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict

import torch

ROWS: Dict[str, Dict[str, Any]] = {
    "bernoulli_mlp": {"model": "bernoulli_mlp"},
    "bernoulli_mlp_iaf": {"model": "bernoulli_mlp", "guide": "iaf"},
    "iwae": {"model": "bernoulli_mlp", "method": "iwae", "num_particles": 5},
    "two_layer": {"model": "two_layer"},
    "m2": {"model": "m2", "labels": 100},
}
"""Each row: the model, its guide family, training method and particles, and m2's labels."""


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def train_rows(args: argparse.Namespace) -> None:
    from ppl_vae import pipeline
    from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    epochs = {row: args.epochs for row in ROWS}
    epochs.update({k: int(v) for k, v in (item.split("=") for item in args.epochs_row)})
    for row in args.rows:
        spec = ROWS[row]
        run_dir = Path(args.out) / row
        if (run_dir / "history.nc").exists():
            print(json.dumps({"row": row, "skipped": "already trained"}), flush=True)
            continue
        config = RunConfig(
            model=ModelConfig(model=spec["model"], guide=spec.get("guide", "diagonal_normal")),
            data=DataConfig(
                dataset="mnist",
                data_dir=args.data_dir,
                binarize="dynamic",
                train_size=args.train_size,
                labels=spec.get("labels"),
            ),
            train=TrainConfig(
                method=spec.get("method", "svi"),
                num_particles=spec.get("num_particles", 1),
                epochs=epochs[row],
                batch_size=100,
                lr=1e-3,
                seed=0,
                device="cpu",
            ),
        )
        before = loadavg()
        start = time.perf_counter()
        run = pipeline.fit(config, run_dir, progress=False)
        seconds = time.perf_counter() - start
        history = run.history
        last = {k: float(history[k].values[-1]) for k in ("train_elbo", "test_elbo") if k in history}
        print(
            json.dumps(
                {
                    "row": row,
                    "epochs": epochs[row],
                    "train_seconds": round(seconds, 1),
                    **last,
                    "loadavg_before": before,
                    "loadavg_after": loadavg(),
                }  # fmt: skip
            ),
            flush=True,
        )


def calibrate_rows(args: argparse.Namespace) -> None:
    from ppl_vae.reports.calibration import calibrate_run

    for row in args.rows:
        run_dir = Path(args.out) / row
        out = run_dir / "calibration"
        before = loadavg()
        start = time.perf_counter()
        result = calibrate_run(
            run_dir,
            num_simulations=args.num_simulations,
            num_posterior_samples=99,
            num_replicates=100,
            num_datapoints=args.num_datapoints,
            seed=0,
            out_dir=out,
            progress=False,
            sir=args.sir or None,
            refine=args.refine or None,
            refine_lr=args.refine_lr,
        )
        seconds = time.perf_counter() - start
        print(f"== {row}\n{result.summary()}", flush=True)
        print(
            json.dumps(
                {
                    "row": row,
                    "calibrate_seconds": round(seconds, 1),
                    "loadavg_before": before,
                    "loadavg_after": loadavg(),
                    "files": [str(p) for p in result.files.values()],
                }  # fmt: skip
            ),
            flush=True,
        )


def summary_rows(args: argparse.Namespace) -> None:
    """Mean coverage of the central 50% and 90% intervals over the latent dimensions, the smallest
    chi-square p-value and how many dimensions leave the ECDF band, per posterior and row."""
    import numpy as np
    import xarray as xr

    header = (
        f"{'row':<18} {'posterior':<10} {'dims':>4} {'cov50':>6} {'cov90':>6} {'min cov90':>9} {'max cov90':>9} "
        f"{'out of band':>11} {'|z| cov90':>9} {'loglik cov90':>12}"
    )
    print(header)
    for row in args.rows:
        folder = Path(args.out) / row / "calibration"
        for name, file in (
            ("encoder", "calibration_sbc.nc"),
            ("refined", "calibration_sbc_refined.nc"),
            ("SIR", "calibration_sbc_sir.nc"),
        ):
            path = folder / file
            if not path.exists():
                continue
            with xr.open_dataset(path) as s:
                s = s.load()
            kinds = s["kind"].values.astype(str)
            dims = np.flatnonzero(kinds == "dimension")
            cov = s["coverage"]
            c50 = cov.sel(level=0.5).values[dims]
            c90 = cov.sel(level=0.9).values[dims]
            norms = np.flatnonzero(kinds == "norm")
            loglik = int(np.flatnonzero(kinds == "log_likelihood")[0])
            print(
                f"{row:<18} {name:<10} {len(dims):>4} {c50.mean():>6.3f} {c90.mean():>6.3f} {c90.min():>9.3f} "
                f"{c90.max():>9.3f} {int(s['outside_band'].values[dims].sum()):>5}/{len(dims):<5} "
                f"{cov.sel(level=0.9).values[norms].mean():>9.3f} {float(cov.sel(level=0.9).values[loglik]):>12.3f}"
            )
        gap = folder / "calibration_refine.nc"
        if gap.exists():
            with xr.open_dataset(gap) as g:
                print(
                    f"{row:<18} amortization gap closed by refinement on the test points: "
                    f"{float(g['gap'].mean()):.3f} ± {float(g['gap'].std() / np.sqrt(g.sizes['datapoint'])):.3f} nats"
                )
        disc = folder / "calibration_discrete.nc"
        if disc.exists():
            with xr.open_dataset(disc) as d:
                for c in d["comparison"].values:
                    r = d.sel(comparison=c)
                    print(
                        f"{row:<18} {str(c):<20} ECE {float(r['ece']):.4f} ± {float(r['ece_se']):.4f} "
                        f"CE^2 {float(r['ce2']):.2e} ± {float(r['ce2_se']):.1e} accuracy {float(r['accuracy']):.3f} "
                        f"confidence {float(r['confidence']):.3f}"
                    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["train", "calibrate", "summary"])
    parser.add_argument("--out", required=True, help="folder of the run directories, one per row")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--data-dir", default="/work/shared/datasets/mnist")
    parser.add_argument("--train-size", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--epochs-row", nargs="*", default=[], metavar="ROW=N", help="epochs of one row")
    parser.add_argument("--num-simulations", type=int, default=500)
    parser.add_argument("--num-datapoints", type=int, default=500)
    parser.add_argument("--sir", type=int, default=1000)
    parser.add_argument("--refine", type=int, default=100)
    parser.add_argument("--refine-lr", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps({"settings": vars(args), "loadavg": loadavg()}), flush=True)
    {"train": train_rows, "calibrate": calibrate_rows, "summary": summary_rows}[args.stage](args)


if __name__ == "__main__":
    main()
