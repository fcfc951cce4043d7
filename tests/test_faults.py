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

ARGS = ["--model", "bernoulli_mlp", "--hidden-dim", "64", "--latent-dim", "4", "--batch-size", "16",
        "--train-size", "800", "--seed", "3", "--no-progress", "--device", "cpu"]
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
        while checkpoint_epoch(killed) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint of epoch 2 within 240 s"
            time.sleep(0.05)
        time.sleep(0.15)  # into the next epoch: the kill lands mid-epoch or mid-write
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
