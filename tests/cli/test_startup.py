"""`ppl-vae fit` reaches its first training step without importing what it does not need then
(torch._dynamo, xarray, h5netcdf, plotting), and the folder it leaves when killed in that step
resumes to the result of an uninterrupted run. The seconds are measured in
benchmarks/bench_startup.py, not here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import ppl_vae
from ppl_vae import runs
from ppl_vae.config import RunConfig

NOT_BEFORE_FIRST_STEP = ("torch._dynamo", "xarray", "pandas", "h5netcdf", "h5py", "matplotlib", "seaborn", "arviz")

CHILD = r"""
import json, os, sys
import ppl_vae.inference.training as training

def first_step(self, *args, **kwargs):
    print("MODULES " + json.dumps({m: m in sys.modules for m in WATCHED}), flush=True)
    os._exit(9)  # as SIGKILL would: no cleanup runs

training.SVIStepper.step = first_step
from ppl_vae.cli.main import cli
cli.main(sys.argv[1:], standalone_mode=False)
"""

ARGS = ["--model", "gaussian_mlp", "--hidden-dim", "16", "--latent-dim", "2", "--train-size", "200", "--seed", "5"]
ARGS += ["--batch-size", "50", "--device", "cpu", "--no-progress"]


def test_first_step_imports_none_of_the_heavy_libraries_and_the_folder_resumes(tmp_path, one_thread):
    run = tmp_path / "stopped"
    code = f"WATCHED = {NOT_BEFORE_FIRST_STEP!r}\n" + CHILD
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", code, "fit", "--epochs", "2", "--out", str(run), *ARGS]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 9, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("MODULES ")]
    assert lines, out.stdout + out.stderr
    imported = json.loads(lines[0][len("MODULES ") :])
    assert not [m for m, yes in imported.items() if yes], imported
    assert "torch" in sys.modules  # the check reads real module names: torch is there, as in the child

    # killed inside its first step: an epoch-0 checkpoint, and no history since no epoch finished
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.safetensors", "config.json"]
    assert runs.read_checkpoint(run)[1]["epoch"] == 0
    resumed = ppl_vae.resume(run, progress=False)
    config = RunConfig.from_json((run / "config.json").read_text())
    straight = ppl_vae.fit(config, tmp_path / "straight", progress=False)
    assert resumed.history.epoch.values.tolist() == [1, 2]
    assert (run / "history.nc").is_file()
    for (name, a), (_, b) in zip(straight.vae.state_dict().items(), resumed.vae.state_dict().items()):
        assert torch.equal(a, b), name
    assert resumed.final["test_elbo"] == pytest.approx(straight.final["test_elbo"], abs=1e-9)


def _fit_one_epoch(run, env, *extra):
    """A one-epoch run of ``ppl-vae fit`` with :data:`ARGS` and ``extra`` (a fresh process)."""
    made = subprocess.run(
        [sys.executable, "-m", "ppl_vae.cli", "fit", "--epochs", "1", "--out", str(run), *ARGS, *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert made.returncode == 0, made.stderr
    return run


NOT_BEFORE_SCORING = ("torch._dynamo", "matplotlib", "seaborn", "arviz", "xarray", "pandas")
"""(the run's history, netCDF read through xarray, is checked before the scoring but read after it)"""

SCORING_CHILD = r"""
import json, os, sys
import ppl_vae.reports.compare as compare
import ppl_vae.reports.evaluation as evaluation

def watch(real):
    def first_block(*args, **kwargs):
        before = {m: m in sys.modules for m in WATCHED}
        real(*args, **kwargs)
        print("MODULES " + json.dumps({"before": before, "dynamo_after": "torch._dynamo" in sys.modules}), flush=True)
        os._exit(9)
    return first_block

compare.score_gaps = watch(compare.score_gaps)
evaluation.score_block = watch(evaluation.score_block)
from ppl_vae.cli.main import cli
cli.main(sys.argv[1:], standalone_mode=False)
"""


@pytest.mark.parametrize(
    "command",
    [
        ["compare", "--mf-steps", "20", "--mf-polish-steps", "5", "-k", "10", "--num-datapoints", "20"],
        ["evaluate", "-k", "10", "--num-datapoints", "20"],
    ],
)
def test_scoring_starts_before_plotting_arviz_or_dynamo_are_imported(tmp_path, command, one_thread):
    """evaluate and compare score before they import the report's libraries; mean-field VI's fit
    (Adam and the L-BFGS polish) never imports torch._dynamo (issue 28)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = _fit_one_epoch(tmp_path / "run", env)
    code = f"WATCHED = {NOT_BEFORE_SCORING!r}\n" + SCORING_CHILD
    cmd = [sys.executable, "-c", code, *command[:1], str(run), *command[1:], "--out", str(tmp_path / "out")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 9, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("MODULES ")]
    assert lines, out.stdout + out.stderr
    seen = json.loads(lines[0][len("MODULES ") :])
    assert not [m for m, yes in seen["before"].items() if yes], seen
    assert not seen["dynamo_after"], seen


def test_compare_writes_every_file_without_importing_arviz(tmp_path, one_thread):
    """A whole single-run compare, report and inference_data.nc included, never imports ArviZ (about
    1 s of its time, issue 28), nor seaborn (0.6 s; only the latent scatter of 2-D latents needs
    it); the file still reads back through ArviZ with both guides' draws."""
    from ppl_vae.analysis import results

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = _fit_one_epoch(tmp_path / "run", env, "--latent-dim", "3")
    out_dir = tmp_path / "out"
    args = ["compare", str(run), "--mf-steps", "20", "-k", "10", "--num-datapoints", "20", "--out", str(out_dir)]
    code = (
        "import sys\nfrom ppl_vae.cli.main import cli\n"
        f"cli.main({args!r}, standalone_mode=False)\n"
        "print('ARVIZ_IMPORTED', 'arviz' in sys.modules)\n"
        "print('SEABORN_IMPORTED', 'seaborn' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ARVIZ_IMPORTED False" in done.stdout and "SEABORN_IMPORTED False" in done.stdout, done.stdout[-2000:]
    idata = results.load_inference_data(out_dir / "inference_data.nc")
    assert set(idata.posterior.data_vars) == {"z_amortized", "z_meanfield"}
    assert idata.posterior["z_amortized"].sizes["datapoint"] == 20
    assert (out_dir / "report.html").is_file()


def test_the_console_entry_point_exits_without_the_last_collections_and_its_files_are_whole(tmp_path, monkeypatch):
    """``ppl-vae`` (``main``) freezes Python's objects at exit, so the interpreter's final garbage
    collections (about 0.35 s after every command, benchmarks/README.md) skip them: the freeze
    is registered to run after every other exit handler, and a command's files, printed lines
    and exit status are all there when the process ends."""
    import atexit
    import gc

    from ppl_vae.cli import main as cli_main

    registered = []
    monkeypatch.setattr(atexit, "register", lambda fn, *a, **k: registered.append(fn) or fn)
    monkeypatch.setattr(sys, "argv", ["ppl-vae", "--help"])
    frozen = gc.get_freeze_count()
    with pytest.raises(SystemExit) as exc:
        cli_main.main()
    assert exc.value.code == 0 and registered == [gc.freeze]
    # no command ran: the collector is on again and nothing was frozen
    assert gc.isenabled() and gc.get_freeze_count() == frozen and not cli_main._GC_DEFERRED
    out = tmp_path / "run"
    args = [sys.executable, "-m", "ppl_vae.cli", "fit", *ARGS, "--epochs", "1", "--out", str(out)]
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "epoch 1: train ELBO" in done.stdout
    assert json.loads((out / "config.json").read_text())["model"]["model"] == "gaussian_mlp"
    assert runs.load_history(out).sizes["epoch"] == 1
    assert runs.read_checkpoint(out)[0]  # the weights read back


GC_CHILD = r"""
import gc, importlib, json, sys
command = getattr(importlib.import_module(MODULE), NAME)

def body(*args, **kwargs):
    print("GC " + json.dumps({
        "enabled": gc.isenabled(),
        "frozen": gc.get_freeze_count(),
        "full_collections_before": gc.get_stats()[2]["collections"],
        "torch_imported": "torch" in sys.modules,
    }), flush=True)

command.callback = body
sys.argv = ["ppl-vae", *ARGS]
from ppl_vae.cli.main import main
main()
"""


@pytest.mark.parametrize(
    "module,name,args,torch_needed",
    [
        ("ppl_vae.cli.evaluate", "evaluate", ["evaluate", "no-such-run"], True),  # parsing imports torch
        ("ppl_vae.cli.fit", "fit", ["fit"], True),  # the body imports torch
        ("ppl_vae.cli.data", "data", ["data", "dsprites", "--help"], False),  # rendering needs numpy only
    ],
    ids=["evaluate", "fit", "data"],
)
def test_the_console_entry_point_collects_no_garbage_while_importing_and_freezes_the_imports(
    module, name, args, torch_needed
):
    """``ppl-vae`` (``main``) keeps Python's cyclic collector off while the command line is parsed
    and torch and Pyro are imported (three full collections over their objects before: 0.2 s of
    a digits compare), then freezes what exists and turns the collector back on when the
    command's own work begins, so its collections no longer walk the imported modules' objects.
    ``data`` does not import torch for it."""
    code = f"MODULE = {module!r}\nNAME = {name!r}\nARGS = {args!r}\n" + GC_CHILD
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("GC ")]
    assert lines, done.stdout + done.stderr
    seen = json.loads(lines[0][len("GC ") :])
    assert seen["torch_imported"] == torch_needed, seen
    assert seen["enabled"], seen
    assert seen["full_collections_before"] == 0, seen
    if torch_needed:
        assert seen["frozen"] > 50_000, seen  # torch, Pyro and the library's objects


def test_commands_run_in_process_leave_the_collector_alone():
    """Through ``cli`` (CliRunner, a notebook) nothing is frozen and the collector stays as it was."""
    import gc

    from tests.conftest import invoke

    frozen = gc.get_freeze_count()
    result = invoke("models")
    assert result.exit_code == 0, result.output
    assert gc.isenabled() and gc.get_freeze_count() == frozen


HELD_AT_START_UP = r"""
import os, signal, sys
import ppl_vae.cli.main as entry

real, number = entry._hold_start_up_signals, getattr(signal, sys.argv[1])
def hold_then_signal():
    previous = real()
    os.kill(os.getpid(), number)  # as if it came while torch is imported
    return previous
entry._hold_start_up_signals = hold_then_signal
sys.argv = ["ppl-vae", *sys.argv[2:]]
entry.main()
"""


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_an_interrupt_during_start_up_is_held_and_delivered_as_one_line_exit_130(tmp_path, name):
    """QA: a Ctrl-C while torch and NumPy were imported (the first 0.3-0.9 s) was swallowed (the
    command trained to the end and exited 0) or left NumPy half-imported (a traceback later). It
    is now held until the command's body begins and delivered there: exit 130, one line, and
    nothing written."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", HELD_AT_START_UP, name, "fit", "--epochs", "1", "--train-size", "100",
           "--out", str(run), "--no-progress", "--device", "cpu"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 130, (done.returncode, done.stdout, done.stderr)
    assert done.stderr.startswith("Error: interrupted") and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr and not run.exists()
    helped = subprocess.run([*cmd[:4], "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert helped.returncode == 130 and helped.stderr == "Error: interrupted\n", helped.stderr  # no body ran
