"""Property-based bad-input fuzzing: loaders and CLI options fail with one-line errors only."""

from __future__ import annotations

import gzip
import io
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppl_vae.cli.main import cli
from ppl_vae.data import load_dataset, read_idx
from ppl_vae.errors import DataError

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def idx_header(ndim: int, dims: list[int], type_code: int = 0x08) -> bytes:
    return struct.pack(">BBBB", 0, 0, type_code, ndim) + struct.pack(f">{len(dims)}I", *dims)


@FUZZ
@given(
    header=st.one_of(
        st.binary(max_size=32),
        st.builds(
            idx_header,
            st.integers(0, 4),
            st.lists(st.integers(0, 50), max_size=4),
            st.sampled_from([0x08, 0x09, 0x0B, 0x0D, 0x42]),
        ),
    ),
    body=st.binary(max_size=300),
    compress=st.booleans(),
)
def test_idx_reader_never_crashes(header, body, compress):
    raw = header + body
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.idx"
        path.write_bytes(gzip.compress(raw) if compress else raw)
        try:
            array = read_idx(path)
        except DataError as exc:
            assert "\n" not in str(exc)
        else:
            assert array.size * array.dtype.itemsize == len(raw) - 4 - 4 * raw[3]


@FUZZ
@given(
    suffix=st.sampled_from([".npy", ".npz", ".csv"]),
    content=st.one_of(
        st.binary(max_size=200),
        st.text(alphabet="0123456789.,-eEnaNif \n", max_size=200).map(str.encode),
    ),
)
def test_array_loaders_never_crash(suffix, content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(content)
        try:
            data = load_dataset(str(path))
        except DataError as exc:
            assert "\n" not in str(exc)
        else:
            assert data.train.shape[0] >= 1 and data.test.shape[0] >= 1
            assert np.isfinite(data.train.numpy()).all()


@FUZZ
@given(
    arrays=st.dictionaries(
        st.sampled_from(["train", "test", "data", "labels", "other"]),
        st.sampled_from(
            [
                np.zeros((0, 3)),
                np.ones((5, 2)),
                np.array(["a", "b"]),
                np.full((4, 2), np.inf),
                np.ones((3, 4)),
                np.ones(6),
            ]
        ),
        max_size=3,
    )
)
def test_npz_with_arbitrary_arrays(arrays):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.npz"
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        path.write_bytes(buffer.getvalue())
        try:
            data = load_dataset(str(path))
        except DataError as exc:
            assert "\n" not in str(exc)
        else:
            assert data.train.shape[1:] == data.test.shape[1:]


OPTION_VALUES = {
    "--epochs": st.integers(-3, 1).map(str),
    "--batch-size": st.one_of(st.integers(-5, 300).map(str), st.just("x")),
    "--latent-dim": st.integers(-2, 3).map(str),
    "--hidden-dim": st.integers(-2, 8).map(str),
    "--lr": st.sampled_from(["0", "-1", "nan", "inf", "1e-3", "abc"]),
    "--num-particles": st.integers(-1, 2).map(str),
    "--kl-warmup": st.integers(-1, 2).map(str),
    "--model": st.sampled_from(["gaussian_mlp", "bernoulli_mlp", "", "x y"]),
    "--prior": st.sampled_from(["standard_normal", "mixture_of_gaussians", "?"]),
    "--likelihood": st.sampled_from(["bernoulli", "laplace", "gaussian", "nope"]),
    "--elbo": st.sampled_from(["trace", "mean_field", "bogus"]),
    "--device": st.sampled_from(["cpu", "auto", "cuda:99", "mps", ""]),
    "--dataset": st.sampled_from(["digits", "mnist", "nope", "/no/such.csv"]),
    "--train-size": st.integers(-1, 40).map(str),
}


@FUZZ
@given(
    options=st.dictionaries(st.sampled_from(sorted(OPTION_VALUES)), st.just(None), max_size=5).flatmap(
        lambda keys: st.fixed_dictionaries({k: OPTION_VALUES[k] for k in keys})
    )
)
def test_fit_options_fail_cleanly(options, tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz") / "run"
    args = ["fit", "--out", str(out), "--no-progress", "--epochs", "1", "--train-size", "40", "--hidden-dim", "8"]
    for key, value in options.items():
        args += [key, value]
    result = CliRunner().invoke(cli, args)
    assert "Traceback" not in result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        pytest.fail(f"{args}: uncaught {type(result.exception).__name__}: {result.exception}")
    if result.exit_code == 0:
        assert (out / "checkpoint.safetensors").is_file()
    else:
        assert result.output.strip().splitlines()[-1].startswith("Error"), result.output
        # README: 1 for a bad value or file, 2 for a command line click cannot parse
        assert result.exit_code in (1, 2), result.output
        if result.exit_code == 2:
            assert "Usage:" in result.output
        if result.exit_code == 1:
            assert not out.exists() or not any(out.iterdir())


_ROWS_FILE = {}


def _rows_on_disk():
    """One small .npy kept on disk for the whole module (hypothesis reuses it across examples)."""
    if not _ROWS_FILE:
        import torch

        folder = Path(tempfile.mkdtemp(prefix="ppl-vae-fuzz-"))
        values = np.random.default_rng(1).random((37, 3, 2)).astype(np.float32)
        np.save(folder / "rows.npy", values)
        _ROWS_FILE["disk"] = load_dataset(str(folder / "rows.npy"), on_disk=True)
        _ROWS_FILE["memory"] = load_dataset(str(folder / "rows.npy"))
        _ROWS_FILE["torch"] = torch
    return _ROWS_FILE["disk"], _ROWS_FILE["memory"], _ROWS_FILE["torch"]


@FUZZ
@given(
    index=st.one_of(
        st.lists(st.integers(-35, 34), max_size=40),
        st.builds(
            slice,
            st.integers(-40, 40) | st.none(),
            st.integers(-40, 40) | st.none(),
            st.integers(1, 5) | st.integers(-5, -1) | st.none(),
        ),
        st.integers(-29, 28),
    )
)
def test_rows_on_disk_index_like_the_loaded_tensor(index):
    """Any int, slice or list of indices gives the rows the in-memory tensor gives, or the same
    error (IndexError out of range, ValueError for a negative slice step)."""
    disk, memory, torch = _rows_on_disk()
    if isinstance(index, list):
        key = torch.tensor(index, dtype=torch.long)
    else:
        key = index
    try:
        expected = memory.train[key]
    except (IndexError, ValueError) as exc:
        with pytest.raises(type(exc)):
            disk.train[key]
        return
    assert torch.equal(disk.train[key], expected)
