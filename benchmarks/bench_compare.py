"""Whole-process ``ppl-vae evaluate`` and ``ppl-vae compare``: this checkout against an older one.

Each command runs as a fresh process, old and new alternately, ``--repeats`` times, on the same
run directory with the same flags (``--threads 1`` by default). The old side is another checkout
of the library (e.g. ``git worktree add /tmp/base HEAD`` before a change) put first on
PYTHONPATH. Printed per pair: wall seconds, CPU seconds (user + system: steadier than wall on a
shared machine; the system part of it, the kernel's, apart), the seconds from the process's start to the start of the scoring (read from
``/proc`` when ``ppl_vae.reports.blocks.map_blocks`` is first entered, so both sides are
measured the same way) and the load average; then the ratios old / new (medians over pairs).

    python benchmarks/bench_compare.py RUN --base /tmp/base --repeats 2
    python benchmarks/bench_compare.py RUN --base /tmp/base --commands compare --extra "--num-datapoints 1000"
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import sys
import ppl_vae.reports.blocks as blocks

def process_age():
    import os
    with open("/proc/self/stat") as f:
        start = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        return float(f.read().split()[0]) - start / os.sysconf("SC_CLK_TCK")

real = blocks.map_blocks
def map_blocks(*args, **kwargs):
    print(f"SCORING_BEGAN {process_age():.3f}", file=sys.stderr, flush=True)
    return real(*args, **kwargs)
blocks.map_blocks = map_blocks
import ppl_vae.cli.main as entry
sys.argv = ["ppl-vae", *sys.argv[1:]]
entry.main()  # the console entry point, as a user runs it (its exit included)
"""

COMMANDS = {
    "evaluate": ["evaluate", "-k", "1000", "--num-datapoints", "300"],
    "compare": ["compare"],
}


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ")[0]
    except OSError:
        return "?"


def run_once(library: Path, args: list[str]) -> tuple[float, float, float, float]:
    """(wall s, CPU s, s to the start of the scoring, system CPU s) of one fresh process importing ``library``."""
    env = {**os.environ, "PYTHONPATH": str(library.resolve()), "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    # cwd: not a checkout, since ``python -c`` puts the working folder first on sys.path
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env, cwd=tempfile.gettempdir()
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"{library}: {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    began = [float(line.split()[1]) for line in out.stderr.splitlines() if line.startswith("SCORING_BEGAN ")]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    system = after.ru_stime - before.ru_stime
    return wall, cpu, began[0] if began else float("nan"), system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--base", type=Path, required=True, help="the old checkout (its root, put on PYTHONPATH)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--commands", nargs="+", default=list(COMMANDS), choices=list(COMMANDS))
    parser.add_argument("--extra", default="", help="more flags for every command (both sides)")
    a = parser.parse_args()
    print(f"run {a.run_dir}; old = {a.base}, new = {ROOT}; --threads {a.threads}; {os.cpu_count()} cores")
    for command in a.commands:
        ratios: dict[str, list[float]] = {"wall": [], "cpu": [], "to scoring": []}
        for r in range(a.repeats):
            got = {}
            for side, lib in (("old", a.base), ("new", ROOT)) if r % 2 == 0 else (("new", ROOT), ("old", a.base)):
                with tempfile.TemporaryDirectory() as out:
                    args = [*COMMANDS[command], str(a.run_dir), "--threads", str(a.threads), "--out", out]
                    args += shlex.split(a.extra)
                    load = loadavg()
                    got[side] = run_once(lib, args)
                wall, cpu, began, system = got[side]
                print(
                    f"{command:<9} {side}: wall {wall:7.2f} s  cpu {cpu:7.2f} s (system {system:6.2f} s)"
                    f"  scoring began {began:6.2f} s"
                    f"  (load average {load} before, {loadavg()} after)",
                    flush=True,
                )
            for i, key in enumerate(ratios):
                ratios[key].append(got["old"][i] / got["new"][i])
        line = ", ".join(f"{k} {statistics.median(v):.2f}x" for k, v in ratios.items())
        print(f"{command}: old / new (median of {a.repeats} pairs): {line}", flush=True)


if __name__ == "__main__":
    main()
