"""Evaluation on 1 and 2 processes: `evaluate` (IW) and `compare` against a hand-written IW loop.

A `bernoulli_mlp` 784-500-20 run (AEVB appendix C.1) is trained for one short epoch on MNIST
(``--data-dir``; the weights only matter for the numbers, not for the cost), then, alternately
in one script:

- ``evaluate_run(method="iw", K)`` on ``--num-datapoints`` test images with ``nproc=1`` and
  ``nproc=2`` (each process gets the available cores divided by the process count);
- the hand-written IW loop of ``bench_iw.py`` on the same images (this process, all cores);
- ``compare_run`` (mean-field VI + the gap decomposition) on ``--compare-datapoints`` with
  ``nproc=1`` and ``nproc=2``.

It prints per-run times, ratios from this one run (median and range over ``--repeats``), the
largest difference between the 1- and 2-process per-datapoint values (0 when exact), and the
time extrapolated linearly to the issue's sizes (IW K = 5000 on all 10,000 test images,
compare on 10,000) when run on fewer, saying that it is an extrapolation. Process start-up (spawn, imports,
loading the run and data) is included in the 2-process times: it is what a user waits for.

    python bench_eval_scale.py --data-dir ../../shared/datasets/mnist --num-samples 5000 \
        --num-datapoints 200 --compare-datapoints 500 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_iw import handwritten_iw, users_networks
from common import loadavg, machine_description

from ppl_vae import pipeline
from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ppl_vae.inference.importance import default_particle_batch_size
from ppl_vae.reports.blocks import available_cores, set_threads
from ppl_vae.reports.common import select_datapoints
from ppl_vae.reports.compare import compare_run
from ppl_vae.reports.evaluation import evaluate_run

FULL_DATAPOINTS = 10_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with the MNIST IDX files")
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--num-datapoints", type=int, default=200, help="test images for IW (fraction of 10,000)")
    parser.add_argument("--compare-datapoints", type=int, default=500, help="test images for compare")
    parser.add_argument("--compare-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-compare", action="store_true")
    parser.add_argument("--skip-iw", action="store_true", help="only the compare part")
    args = parser.parse_args()
    set_threads()  # this process (and the hand-written loop) on every available core
    print(f"machine: {machine_description()}; {available_cores()} cores available to this process")
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_scale_"))
    run_dir = tmp / "run"
    config = RunConfig(
        model=ModelConfig(model="bernoulli_mlp", latent_dim=20, hidden_dim=500),
        data=DataConfig(
            dataset="mnist", data_dir=str(Path(args.data_dir).resolve()), binarize="threshold", train_size=2000
        ),
        train=TrainConfig(epochs=1, batch_size=100, device="cpu"),
    )
    pipeline.fit(config, run_dir, progress=False)
    run = pipeline.load_run(run_dir)
    sel = select_datapoints(run, "test", args.num_datapoints, 0)
    if not args.skip_iw:
        bench_iw(args, run_dir, run, sel, tmp)
    if not args.skip_compare:
        bench_compare(args, run_dir, tmp)


def bench_iw(args, run_dir: Path, run, sel, tmp: Path) -> None:
    vae = run.vae.eval()
    k, n = args.num_samples, len(sel.index)
    pbs = default_particle_batch_size(args.batch_size)
    networks = users_networks(vae)
    print(f"IW: K={k} on {n} of {FULL_DATAPOINTS} MNIST test images, {args.batch_size} per block")
    times = {"evaluate nproc=1": [], "evaluate nproc=2": [], "hand-written": []}
    values = {}
    common = dict(num_samples=k, num_datapoints=args.num_datapoints, batch_size=args.batch_size, progress=False)
    for _ in range(args.repeats):
        for name, fn in (
            ("hand-written", lambda: torch.manual_seed(0) and handwritten_iw(networks, sel.x, k, args.batch_size, pbs)),
            ("evaluate nproc=1", lambda: evaluate_run(run_dir, out_dir=tmp / "e1", nproc=1, **common)),
            ("evaluate nproc=2", lambda: evaluate_run(run_dir, out_dir=tmp / "e2", nproc=2, **common)),
        ):
            start = time.perf_counter()
            result = fn()
            times[name].append(time.perf_counter() - start)
            if name.startswith("evaluate"):
                values[name] = result.dataset["log_likelihood"].values
    report(times, "hand-written", n, FULL_DATAPOINTS)
    diff = np.abs(values["evaluate nproc=1"] - values["evaluate nproc=2"]).max()
    print(
        f"largest |1-process − 2-process| per-datapoint log p̂: {diff:.3g} nats; "
        f"mean log p̂ {values['evaluate nproc=1'].mean():.3f}"
    )


def bench_compare(args, run_dir: Path, tmp: Path) -> None:
    m = args.compare_datapoints
    print(f"compare: K={args.compare_samples} draws of q and of q* on {m} test images (mean-field VI blocks of 500)")
    ctimes = {"compare nproc=1": [], "compare nproc=2": []}
    cvalues = {}
    for _ in range(args.repeats):
        for nproc in (1, 2):
            name = f"compare nproc={nproc}"
            start = time.perf_counter()
            result = compare_run(
                run_dir,
                num_samples=args.compare_samples,
                num_datapoints=m,
                num_draws=10,
                out_dir=tmp / f"c{nproc}",
                nproc=nproc,
                progress=False,
            )
            ctimes[name].append(time.perf_counter() - start)
            cvalues[name] = result.gaps["estimate"]
    report(ctimes, "compare nproc=1", m, FULL_DATAPOINTS)
    one, two = cvalues["compare nproc=1"], cvalues["compare nproc=2"]
    diff = np.abs(one - two)
    print(f"largest |1-process − 2-process| per-datapoint estimate: {float(diff.max()):.3g} nats; by estimator:")
    for name in one["estimator"].values:
        d = diff.sel(estimator=name).values
        print(
            f"  {name:<16} max {np.nanmax(d):.3g} nats, {int((d > 1e-6).sum())} of {d.size} datapoints differ by > 1e-6"
        )


def report(times: dict, reference: str, n: int, full: int) -> None:
    for name, ts in times.items():
        med = statistics.median(ts)
        line = f"{name:<20} median {med:8.2f} s (range {min(ts):.2f}-{max(ts):.2f}, {len(ts)} runs)"
        if n < full:
            line += f"; extrapolated to {full:,} datapoints: {med * full / n / 60:.1f} min (linear in datapoints)"
        else:
            line += f" = {med / 60:.1f} min on all {n:,} datapoints (measured, not extrapolated)"
        if name != reference:
            ratios = [a / b for a, b in zip(ts, times[reference])]
            line += (
                f"; ratio to {reference}: median {statistics.median(ratios):.3f}x "
                f"({min(ratios):.3f}-{max(ratios):.3f}x)"
            )
        print(line + f" (load average {loadavg()})")


if __name__ == "__main__":
    main()
