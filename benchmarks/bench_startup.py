"""Start-up of `ppl-vae fit`: time from process start to the first training step, and which
heavy libraries are already imported then.

Runs ``ppl-vae fit`` in fresh processes (``--repeats``) with the SVI stepper's ``step``
wrapped so that the first call records the elapsed time since the interpreter started
(``time.perf_counter`` against the process's start time from ``/proc/self/stat``) and the
imported modules, then stops the run. Prints the median and range and, for each of xarray,
pandas, arviz, matplotlib, seaborn, scipy, sklearn, h5netcdf, whether it was imported
before the first step.

    python bench_startup.py --repeats 5 [--data-dir ../../shared/datasets/mnist]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HEAVY = ("xarray", "pandas", "arviz", "matplotlib", "seaborn", "scipy", "sklearn", "h5netcdf", "pyro", "torch._dynamo")

CHILD = r"""
import os, sys, time, json
def since_start():
    ticks = os.sysconf("SC_CLK_TCK")
    start = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19]) / ticks
    uptime = float(open("/proc/uptime").read().split()[0])
    return uptime - start
import ppl_vae.inference.training as training
original = training.SVIStepper.step
class Stop(BaseException):
    pass
def first_step(self, *a, **k):
    elapsed = since_start()
    found = {m: m in sys.modules for m in HEAVY}
    print("RESULT " + json.dumps({"elapsed": elapsed, "modules": found}), flush=True)
    raise Stop()
training.SVIStepper.step = first_step
from ppl_vae.cli.main import cli
try:
    cli.main(sys.argv[1:], standalone_mode=False)
except Stop:
    pass
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-dir", default=None, help="MNIST IDX files (default: the embedded digits)")
    args = parser.parse_args()
    data = ["--dataset", "mnist", "--data-dir", args.data_dir] if args.data_dir else []
    times, modules = [], {}
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                sys.executable,
                "-c",
                f"HEAVY = {HEAVY!r}\n" + CHILD,
                "fit",
                "--epochs",
                "1",
                "--no-progress",
                "--out",
                os.path.join(tmp, "run"),
                *data,
            ]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if not line:
                raise SystemExit(f"no first step recorded:\n{out.stdout}\n{out.stderr}")
            result = json.loads(line[0][7:])
            times.append(result["elapsed"])
            modules = result["modules"]
    print(
        f"process start to the first training step: median {statistics.median(times):.2f} s "
        f"(range {min(times):.2f}-{max(times):.2f}, {len(times)} fresh processes; /proc clock, 10 ms ticks)"
    )
    print("imported before the first step: " + ", ".join(f"{m} {'yes' if v else 'no'}" for m, v in modules.items()))


if __name__ == "__main__":
    main()
