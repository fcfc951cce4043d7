"""Mean-field VI's defaults (issue 28): 50 Adam steps before the L-BFGS polish against the 500 of
before, on runs' test images, with the old fit under another seed as the yardstick of noise.

For each run: ``fit_mean_field`` with ``max_steps=500`` (old), with the default (new) and with
``max_steps=500, seed=2`` (old, another seed), each scored by ``importance_estimate`` with K draws
of q* from the same seed (common random numbers, so the paired differences of L[q*] are those of
the fits). Prints CPU seconds of each fit, steps (Adam plus L-BFGS iterations), how many
datapoints converged, mean L[q*] with its Monte Carlo se, and the paired difference to the old fit
with its se over datapoints; ``--polish-particles`` also tries another particle count.

    .venv/bin/python benchmarks/bench_meanfield_defaults.py RUN [RUN ...] --num-datapoints 300
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ppl_vae.inference.importance import importance_estimate
from ppl_vae.inference.meanfield import fit_mean_field
from ppl_vae.pipeline import load_run
from ppl_vae.reports.common import select_datapoints


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--num-datapoints", type=int, default=300)
    p.add_argument("--num-samples", type=int, default=1000, help="draws of q* scoring L[q*]")
    p.add_argument("--polish-particles", type=int, default=None, help="also the new fit with this many")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"load average {open('/proc/loadavg').read().split()[0]}; 1 torch thread")
    for run_dir in args.run_dirs:
        run = load_run(run_dir, "cpu")
        vae = run.vae.eval()
        x = select_datapoints(run, "test", args.num_datapoints, 0).x
        fits = {
            "old (500 Adam steps)": dict(max_steps=500),
            "new (default)": {},
            "old, seed 2": dict(max_steps=500, seed=2),
        }
        if args.polish_particles:
            fits[f"new, {args.polish_particles} polish particles"] = dict(polish_particles=args.polish_particles)
        ref = None
        for name, options in fits.items():
            options = {"seed": 0, **options}
            start = time.process_time()
            fit = fit_mean_field(vae.model, vae.guide, x, **options)
            cpu = time.process_time() - start
            with torch.no_grad():
                est = importance_estimate(
                    vae.model, fit.guide(), x, num_samples=args.num_samples, batch_size=100, seed=1
                )
            elbo = est.elbo.double()
            se = float(est.elbo_stderr.double().pow(2).sum().sqrt()) / x.shape[0]
            line = (
                f"{run_dir} {name}: CPU {cpu:.1f} s, steps {fit.num_steps.float().mean():.1f}, converged "
                f"{int(fit.converged.sum())}/{x.shape[0]}, L[q*] {elbo.mean():.4f} (MC se {se:.4f})"
            )
            if ref is None:
                ref = elbo
            else:
                diff = elbo - ref
                line += f"; vs old {diff.mean():+.4f} +- {diff.std() / np.sqrt(diff.numel()):.4f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
