"""Start-up of `ppl-vae fit`: time from process start to the first training step, and which
heavy libraries are already imported then.

Runs ``ppl-vae fit`` in fresh processes (``--repeats``) and records, against the process's start
time from ``/proc/self/stat`` (10 ms ticks), two moments: when the SVI stepper's ``step`` is
first called (the first training step begins; the imported modules are listed then) and when
the first optimizer update has been applied (torch's global optimizer step post-hook), after
which the run is stopped. With ``--data-dir`` it also runs ``handwritten_fit.py`` (plain
PyTorch, ``torch.optim.Adam``) on the same IDX files and records its first update the same way,
and ``ppl-vae fit`` reads the same files. Prints medians and ranges, and for each of xarray,
pandas, arviz, matplotlib, seaborn, scipy, sklearn, h5netcdf, pyro and torch._dynamo whether it
was imported before ppl_vae's first step; and, as the floor no Pyro program can go below,
``python -c "import torch, pyro"`` timed to the end of its imports the same way.

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

from common import loadavg

HEAVY = ("xarray", "pandas", "arviz", "matplotlib", "seaborn", "scipy", "sklearn", "h5netcdf", "pyro", "torch._dynamo")

PRELUDE = r"""
import os, sys, json
def since_start():
    ticks = os.sysconf("SC_CLK_TCK")
    start = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19]) / ticks
    uptime = float(open("/proc/uptime").read().split()[0])
    return uptime - start
class Stop(BaseException):
    pass
RESULT = {}
def report():
    print("RESULT " + json.dumps(RESULT), flush=True)
"""

HOOK = r"""
from torch.optim.optimizer import register_optimizer_step_post_hook
def first_update(optimizer, args, kwargs):
    RESULT["first_update"] = since_start()
    raise Stop()
register_optimizer_step_post_hook(first_update)
"""

PPL_VAE = (
    PRELUDE
    + HOOK
    + r"""
import ppl_vae.inference.training as training
original = training.SVIStepper.step
def first_step(self, *a, **k):
    if "first_step" not in RESULT:
        RESULT["first_step"] = since_start()
        RESULT["modules"] = {m: m in sys.modules for m in HEAVY}
    return original(self, *a, **k)
training.SVIStepper.step = first_step
from ppl_vae.cli.main import cli
try:
    cli.main(sys.argv[1:], standalone_mode=False)
except Stop:
    report()
"""
)

HANDWRITTEN = (
    PRELUDE
    + HOOK
    + r"""
import runpy
sys.argv = ["handwritten_fit.py", *sys.argv[1:]]
try:
    runpy.run_path(HANDWRITTEN_PATH, run_name="__main__")
except Stop:
    report()
"""
)

FLOOR = PRELUDE + "import torch, pyro\nRESULT['imports'] = since_start()\nreport()\n"


def run_child(code: str, args: list) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    line = [text for text in out.stdout.splitlines() if text.startswith("RESULT ")]
    if not line:
        raise SystemExit(f"no first step recorded:\n{out.stdout}\n{out.stderr}")
    return json.loads(line[0][7:])


def summary(values: list) -> str:
    return f"median {statistics.median(values):.2f} s (range {min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-dir", default=None, help="MNIST IDX files (default: the embedded digits)")
    args = parser.parse_args()
    data = ["--dataset", "mnist", "--data-dir", args.data_dir] if args.data_dir else []
    here = os.path.dirname(os.path.abspath(__file__))
    handwritten = f"HANDWRITTEN_PATH = {os.path.join(here, 'handwritten_fit.py')!r}\n" + HANDWRITTEN
    rows: dict = {"ppl_vae first step": [], "ppl_vae first update": [], "torch+pyro imports": []}
    if args.data_dir:
        rows["hand-written first update"] = []
    modules: dict = {}
    for _ in range(args.repeats):  # the sides alternate, so drifting load falls on both
        with tempfile.TemporaryDirectory() as tmp:
            fit = ["fit", "--epochs", "1", "--no-progress", "--out", os.path.join(tmp, "run"), *data]
            result = run_child(f"HEAVY = {HEAVY!r}\n" + PPL_VAE, fit)
            rows["ppl_vae first step"].append(result["first_step"])
            rows["ppl_vae first update"].append(result["first_update"])
            modules = result["modules"]
            rows["torch+pyro imports"].append(run_child(FLOOR, [])["imports"])
            if args.data_dir:
                result = run_child(handwritten, ["--data-dir", args.data_dir, "--out", os.path.join(tmp, "hw")])
                rows["hand-written first update"].append(result["first_update"])
    print(
        f"process start to ..., {args.repeats} fresh processes each (/proc clock, 10 ms ticks; "
        f"load average {loadavg()}):"
    )
    for name, values in rows.items():
        print(f"  {name:28s} {summary(values)}")
    print(
        "imported before ppl_vae's first step: " + ", ".join(f"{m} {'yes' if v else 'no'}" for m, v in modules.items())
    )


if __name__ == "__main__":
    main()
