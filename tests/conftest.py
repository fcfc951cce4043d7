"""Shared fixtures: every test starts with an empty Pyro param store and seeded RNGs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _reset_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)  # seeds torch, numpy and random
    np.random.seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture
def shared_datasets() -> Path:
    """../shared/datasets beside the checkout; tests that need it skip when it is absent."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"{SHARED_DATASETS} is absent")
    return SHARED_DATASETS


@pytest.fixture
def one_thread():
    """One torch thread: small training loops run several times faster on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def invoke(*args):
    """``ppl-vae ARGS`` through click's CliRunner (arguments str()-ed, exceptions not caught)."""
    from click.testing import CliRunner

    from ppl_vae.cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, pattern: str = "") -> str:
    """Assert a CliRunner result failed with a single-line "Error: ..." (the last line, no
    traceback) containing ``pattern``; return that line."""
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error:"), result.output
    assert pattern in lines[-1], result.output
    assert "Traceback" not in result.output
    return lines[-1]


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def drop_history_digest(run_dir) -> None:
    """Make ``run_dir``'s checkpoint one written before checkpoints recorded which history they
    continue (``runs.HISTORY_DIGEST_KEY``), as a test standing in for an old run layer needs."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ppl_vae import runs

    path = Path(run_dir) / runs.CHECKPOINT
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["ppl_vae"])
    del meta[runs.HISTORY_DIGEST_KEY]
    save_file(load_file(str(path)), str(path), metadata={"ppl_vae": json.dumps(meta)})


def drop_checkpoint_config(run_dir) -> None:
    """Make ``run_dir``'s checkpoint one written before checkpoints kept the config they were
    trained under (``runs.CONFIG_KEY``): a config.json edited since is then not caught by that
    comparison, so the checks behind it can be tested."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ppl_vae import runs

    path = Path(run_dir) / runs.CHECKPOINT
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["ppl_vae"])
    del meta["extra"][runs.CONFIG_KEY]
    save_file(load_file(str(path)), str(path), metadata={"ppl_vae": json.dumps(meta)})
