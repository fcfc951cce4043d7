"""A ``.npy`` kept on disk (rows read per batch) gives the same data, split and training as
the same file loaded into memory, and is never read whole into a tensor."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from ppl_vae import pipeline
from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ppl_vae.data import datasets, ondisk
from ppl_vae.data.datasets import load_dataset
from ppl_vae.data.ondisk import NpyRows
from ppl_vae.errors import DataError


@pytest.fixture
def npy(tmp_path):
    path = tmp_path / "images.npy"
    np.save(path, np.random.default_rng(0).random((250, 1, 4, 4)).astype(np.float32))
    return path


def test_rows_on_disk_equal_the_loaded_tensors(npy):
    loaded = load_dataset(str(npy), train_size=150)
    disk = load_dataset(str(npy), train_size=150, on_disk=True)
    assert isinstance(disk.train, NpyRows) and isinstance(loaded.train, torch.Tensor)
    assert disk.train.shape == loaded.train.shape == (150, 1, 4, 4)
    assert disk.test.shape == loaded.test.shape == (50, 1, 4, 4)
    assert disk.event_shape == loaded.event_shape
    idx = torch.tensor([149, 0, 7, 7, 8, 9, 10, 3])  # repeats, a run of consecutive rows, any order
    assert torch.equal(disk.train[idx], loaded.train[idx])
    assert torch.equal(disk.test[5:40:3], loaded.test[5:40:3])
    assert torch.equal(disk.test[-1], loaded.test[-1])
    assert torch.equal(disk.train[np.array([2, 1])], loaded.train[[2, 1]])
    assert disk.train[idx].dtype == torch.float32
    low, high, bad = disk.train.value_range()
    assert (low, high, bad) == (float(loaded.train.min()), float(loaded.train.max()), 0)
    moved = disk.train.to("cpu")
    assert moved.device == torch.device("cpu") and torch.equal(moved[idx], loaded.train[idx])
    with pytest.raises(IndexError, match="out of range"):
        disk.train[torch.tensor([150])]


def test_uint8_and_1d_files_read_as_float_rows(tmp_path):
    path = tmp_path / "pixels.npy"
    pixels = np.arange(40, dtype=np.uint8).reshape(10, 4)
    np.save(path, pixels)
    rows = ondisk.open_npy(path)
    assert torch.equal(rows[torch.tensor([3, 1])], torch.tensor(pixels[[3, 1]], dtype=torch.float32))
    flat = tmp_path / "flat.npy"
    np.save(flat, np.linspace(0, 1, 12))
    assert ondisk.open_npy(flat).shape == (12, 1)


def test_threshold_binarization_on_disk_and_dynamic_refused(npy):
    disk = load_dataset(str(npy), binarize="threshold", on_disk=True)
    loaded = load_dataset(str(npy), binarize="threshold")
    assert torch.equal(disk.train[torch.arange(20)], loaded.train[:20])
    assert disk.train.value_range()[:2] == (0.0, 1.0)
    with pytest.raises(DataError, match="data.binarize 'dynamic'"):
        load_dataset(str(npy), binarize="dynamic", on_disk=True)


def test_bad_files_on_disk_are_refused(tmp_path):
    nan = tmp_path / "nan.npy"
    values = np.ones((10, 3), np.float32)
    values[4, 1] = np.nan
    np.save(nan, values)
    with pytest.raises(DataError, match="1 NaN or infinite"):
        load_dataset(str(nan), on_disk=True)
    fortran = tmp_path / "fortran.npy"
    np.save(fortran, np.asfortranarray(np.ones((10, 3))))
    with pytest.raises(DataError, match="Fortran order"):
        load_dataset(str(fortran), on_disk=True)
    text = tmp_path / "text.npy"
    text.write_text("1,2\n3,4\n")
    with pytest.raises(DataError, match="is not a NumPy .npy file"):
        load_dataset(str(text), on_disk=True)
    truncated = tmp_path / "truncated.npy"
    np.save(truncated, np.ones((100, 8), np.float32))
    truncated.write_bytes(truncated.read_bytes()[:-40])
    with pytest.raises(DataError, match="truncated"):
        load_dataset(str(truncated), on_disk=True)


def test_rows_survive_pickling_for_worker_processes(npy):
    rows = load_dataset(str(npy), on_disk=True).train
    again = pickle.loads(pickle.dumps(rows))
    idx = torch.tensor([4, 2, 9])
    assert torch.equal(again[idx], rows[idx])


def _config(path, epochs=2):
    return RunConfig(
        model=ModelConfig(model="bernoulli_mlp", hidden_dim=8, latent_dim=2),
        data=DataConfig(dataset=str(path)),
        train=TrainConfig(epochs=epochs, batch_size=50, device="cpu", train_eval_size=60),
    )


def test_training_from_disk_reads_batches_and_matches_training_in_memory(npy, tmp_path, monkeypatch, one_thread):
    """Same seed, same file: the on-disk run's history equals the in-memory run's, and the
    data is only ever read a minibatch (or an evaluation chunk) at a time."""
    in_memory = pipeline.fit(_config(npy), tmp_path / "memory", progress=False).history

    monkeypatch.setattr(datasets, "ON_DISK_MIN_BYTES", 0)  # every .npy stays on disk
    assert isinstance(pipeline.load_data(_config(npy)).train, NpyRows)
    reads = []
    original = NpyRows._read

    def spy(self, file_rows):
        reads.append(len(file_rows))
        return original(self, file_rows)

    monkeypatch.setattr(NpyRows, "_read", spy)
    on_disk = pipeline.fit(_config(npy), tmp_path / "disk", progress=False).history
    for name in ("train_elbo", "test_elbo", "train_loss"):
        np.testing.assert_allclose(on_disk[name].values, in_memory[name].values, rtol=1e-5, err_msg=name)
    # 200 training rows in batches of 50 for 2 epochs; nothing is ever read 200 rows at once
    assert reads.count(50) >= 8
    assert max(reads) < 200


@pytest.mark.slow
def test_commands_after_fit_read_on_disk_data(npy, tmp_path, monkeypatch, one_thread):
    """evaluate and inpaint load the run's data again: on disk it works the same way."""
    from click.testing import CliRunner

    from ppl_vae.cli.main import cli

    monkeypatch.setattr(datasets, "ON_DISK_MIN_BYTES", 0)
    binary = tmp_path / "binary.npy"
    np.save(binary, (np.load(npy) > 0.5).astype(np.float32))
    out = tmp_path / "run"
    runner = CliRunner()
    fit = runner.invoke(
        cli,
        [
            "fit",
            "--model",
            "bernoulli_mlp",
            "--dataset",
            str(binary),
            "--epochs",
            "1",
            "--hidden-dim",
            "8",
            "--out",
            str(out),
            "--no-progress",
        ],
    )
    assert fit.exit_code == 0, fit.output
    evaluate = runner.invoke(cli, ["evaluate", str(out), "--num-samples", "3"])
    assert evaluate.exit_code == 0, evaluate.output
    assert (out / "evaluation.nc").is_file()
    inpaint = runner.invoke(
        cli, ["inpaint", str(out), "--num-samples", "10", "--num-images", "50", "--out", str(tmp_path / "inpaint.png")]
    )
    assert inpaint.exit_code == 0, inpaint.output
    too_many = runner.invoke(cli, ["inpaint", str(out), "--num-images", "51"])
    assert too_many.exit_code == 1 and "more than the 50 test images" in too_many.output
