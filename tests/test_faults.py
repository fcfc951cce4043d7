"""Faults survived: a training process killed with SIGKILL resumes from its last checkpoint and,
with the same seed, ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import ppl_vae
from ppl_vae import runs

ARGS = [
    "--model",
    "bernoulli_mlp",
    "--hidden-dim",
    "64",
    "--latent-dim",
    "4",
    "--batch-size",
    "16",
    "--train-size",
    "800",
    "--seed",
    "3",
    "--no-progress",
    "--device",
    "cpu",
]
EPOCHS = 5


def checkpoint_epoch(run_dir) -> int:
    try:
        return int(runs.read_checkpoint(run_dir)[1]["epoch"])
    except Exception:  # not written yet
        return -1


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ppl_vae.cli", "fit", "--epochs", str(EPOCHS), "--out", str(killed), *ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 240
        seen = {}  # checkpoint epoch -> when it was first seen
        while checkpoint_epoch(killed) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint of epoch 2 within 240 s"
            seen.setdefault(checkpoint_epoch(killed), time.monotonic())
            time.sleep(0.005)
        # Half an epoch into epoch 3, measured on this machine rather than assumed, so a faster
        # machine does not finish the run before the kill lands.
        epoch_seconds = time.monotonic() - seen.get(1, seen.get(0, time.monotonic()))
        time.sleep(epoch_seconds / 2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    at_kill = checkpoint_epoch(killed)
    assert 2 <= at_kill < EPOCHS  # at most one checkpoint interval (one epoch) of work lost
    resumed = ppl_vae.resume(killed, progress=False)
    # a temporary file the kill left behind is cleaned up by the resume
    assert not [p.name for p in killed.iterdir() if p.name.endswith(".tmp")]
    torch.set_num_threads(1)
    from ppl_vae.config import RunConfig

    config = RunConfig.from_json((killed / "config.json").read_text())
    straight = ppl_vae.fit(config, tmp_path / "straight", progress=False)
    assert resumed.history.epoch.values.tolist() == list(range(1, EPOCHS + 1))
    for (name, a), (_, b) in zip(straight.vae.state_dict().items(), resumed.vae.state_dict().items()):
        assert torch.allclose(a, b, rtol=0, atol=1e-5), name
    assert resumed.final["test_elbo"] == pytest.approx(straight.final["test_elbo"], abs=1e-3)


class _Killed(BaseException):
    """Stands in for SIGKILL inside the process: not an Exception, so nothing catches it."""


@pytest.mark.parametrize("die_in", ["write_netcdf", "write_with"])
def test_death_between_the_history_and_checkpoint_writes_loses_no_epoch(tmp_path, monkeypatch, one_thread, die_in):
    """Dying inside either write of epoch 3 (runs.save writes the history with write_netcdf, then
    the checkpoint through write_with) leaves a run that resumes with every epoch in its history.
    (The SIGKILL test above reaches this window only by chance.)"""
    from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    config = RunConfig(
        model=ModelConfig(model="bernoulli_mlp", latent_dim=2, hidden_dim=16),
        data=DataConfig(train_size=200),
        train=TrainConfig(epochs=4, batch_size=50, seed=1, device="cpu"),
    )
    real = getattr(runs, die_in)
    calls = {"n": 0}
    # checkpoints are written at epochs 0, 1, 2, 3, histories at 1, 2, 3 (no epoch finished at 0)
    die_at = {"write_netcdf": 3, "write_with": 4}[die_in]

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == die_at:  # die in epoch 3's save
            raise _Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(runs, die_in, dying)
    with pytest.raises(_Killed):
        ppl_vae.fit(config, tmp_path / "run", progress=False)
    monkeypatch.setattr(runs, die_in, real)
    assert checkpoint_epoch(tmp_path / "run") == 2
    resumed = ppl_vae.resume(tmp_path / "run", progress=False)
    assert resumed.history.epoch.values.tolist() == [1, 2, 3, 4]
    assert runs.load_history(tmp_path / "run").epoch.values.tolist() == [1, 2, 3, 4]
