"""The full dSprites render on disk (:func:`ppl_vae.data.dsprites.write_dsprites`, ``ppl-vae data
dsprites``) and its loading through ``--data-dir``, on a small collection: ``NUM_COMBINATIONS``
is patched to the first :data:`N` combinations, so everything the full 737,280 images go
through runs here in a second (the render is chunked, atomic, refuses to overwrite; the loader
reads rows from disk, splits as the in-memory path does, and refuses a file that is not this
version's render)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ppl_vae.data import dsprites, load_dataset
from ppl_vae.data.ondisk import NpyRows
from ppl_vae.errors import DataError
from tests.conftest import invoke, one_line_error

N = 1500  # the first 1,500 combinations: shape 0, scale 0, orientations 0 and 1, every position


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(dsprites, "NUM_COMBINATIONS", N)
    return N


@pytest.fixture
def rendered(small, tmp_path_factory):
    out = tmp_path_factory.mktemp("render")
    dsprites.write_dsprites(out, chunk=500)
    return out


def test_the_render_is_every_combination_in_order_written_a_chunk_at_a_time(small, tmp_path, monkeypatch):
    calls = []
    render = dsprites.render
    monkeypatch.setattr(dsprites, "render", lambda classes, **kw: calls.append(len(classes)) or render(classes, **kw))
    path = dsprites.write_dsprites(tmp_path / "new" / "dir", chunk=400)
    assert path == tmp_path / "new" / "dir" / dsprites.RENDERED_FILE
    assert sorted(p.name for p in path.parent.iterdir()) == [dsprites.RENDERED_FILE]  # no temporary left
    # memory held one chunk at a time: 4 renders of at most 400 combinations, never the whole array
    assert calls == [400, 400, 400, 300] and len(calls) == math.ceil(N / 400)
    array = np.load(path, mmap_mode="r")
    assert array.dtype == np.uint8 and array.shape == (N, 1, 64, 64)
    classes = dsprites.index_to_classes(np.arange(N))  # row i holds combination i's factors
    assert classes[-1].tolist() == [0, 0, 1, 14, 27]
    assert np.array_equal(array, render(classes)[:, None])


def test_an_existing_file_is_refused_unless_overwrite(rendered):
    path = rendered / dsprites.RENDERED_FILE
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="exists; remove it, or render it again with overwrite=True"):
        dsprites.write_dsprites(rendered)
    assert path.read_bytes() == before
    dsprites.write_dsprites(rendered, overwrite=True, chunk=N)
    assert path.read_bytes() == before  # deterministic: the same bytes again
    with pytest.raises(ValueError, match="chunk must be an integer >= 1"):
        dsprites.write_dsprites(rendered, chunk=0, overwrite=True)


def test_an_interrupted_render_leaves_no_file_and_keeps_an_old_one(small, tmp_path, monkeypatch):
    render = dsprites.render
    calls = []

    def stop_on_the_third(classes, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return render(classes, **kw)

    monkeypatch.setattr(dsprites, "render", stop_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        dsprites.write_dsprites(tmp_path, chunk=300)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary
    monkeypatch.setattr(dsprites, "render", render)
    path = dsprites.write_dsprites(tmp_path, chunk=N)
    before = path.read_bytes()
    calls.clear()
    monkeypatch.setattr(dsprites, "render", stop_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        dsprites.write_dsprites(tmp_path, chunk=300, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == [dsprites.RENDERED_FILE] and path.read_bytes() == before


def test_the_loader_reads_the_render_from_disk_as_the_in_memory_path_renders_it(rendered):
    on_disk = load_dataset("dsprites", data_dir=rendered, num_images=400, split_seed=3)
    in_memory = load_dataset("dsprites", num_images=400, split_seed=3)
    assert isinstance(on_disk.train, NpyRows) and isinstance(on_disk.test, NpyRows)
    assert on_disk.train.file.path == rendered / dsprites.RENDERED_FILE
    assert on_disk.train.shape == (320, 1, 64, 64) and on_disk.test.shape == (80, 1, 64, 64)
    assert on_disk.factor_names == dsprites.FACTOR_NAMES
    # the same subset, split and factors: each image is still the render of its own factor row
    assert torch.equal(on_disk.train[:], in_memory.train) and torch.equal(on_disk.test[:], in_memory.test)
    assert torch.equal(on_disk.train_factors, in_memory.train_factors)
    assert torch.equal(on_disk.test_factors, in_memory.test_factors)
    idx = torch.tensor([5, 0, 300])
    again = dsprites.render(on_disk.train_factors[idx].numpy())[:, None].astype(np.float32)
    assert np.array_equal(on_disk.train[idx].numpy(), again)
    # all of them, a training subset, thresholding (a no-op on 0/1 pixels)
    full = load_dataset("dsprites", data_dir=rendered, num_images=N, train_size=100, binarize="threshold")
    assert len(full.train) == 100 == len(full.train_factors) and len(full.test) == 300 == len(full.test_factors)
    assert full.train.threshold and torch.equal(full.train[:10], (full.train[:10] > 0.5).float())
    with pytest.raises(DataError, match="data.binarize 'dynamic' needs a test set sampled once in memory"):
        load_dataset("dsprites", data_dir=rendered, num_images=100, binarize="dynamic")


def test_metrics_read_the_on_disk_rows(rendered, one_thread):
    from ppl_vae.analysis.disentanglement import disentanglement_metrics
    from ppl_vae.models import build_vae

    data = load_dataset("dsprites", data_dir=rendered, num_images=300)
    torch.manual_seed(0)
    vae = build_vae("conv64", (1, 64, 64), latent_dim=3, hidden_dim=8)
    metrics = disentanglement_metrics(vae, data, num_points=100, num_test_points=50, num_trees=3)
    assert metrics.attrs["num_points"] == 100 and list(metrics.factor.values) == list(dsprites.FACTOR_NAMES)


def test_a_file_that_is_not_this_versions_complete_render_is_refused(rendered, monkeypatch):
    path = rendered / dsprites.RENDERED_FILE
    monkeypatch.setattr(dsprites, "NUM_COMBINATIONS", N + 1)  # an incomplete render
    with pytest.raises(DataError, match=r"a complete dSprites render is uint8 \(1501, 1, 64, 64\): render it again"):
        load_dataset("dsprites", data_dir=rendered, num_images=10)
    monkeypatch.setattr(dsprites, "NUM_COMBINATIONS", N)
    array = np.load(path, mmap_mode="r+")
    array[0, 0, 0, 0] = 1 - array[0, 0, 0, 0]  # one pixel of a checked row (the first)
    array.flush()
    del array
    with pytest.raises(DataError, match="rows differ from this version's rendering"):
        load_dataset("dsprites", data_dir=rendered, num_images=10)
    np.save(path, np.full((N, 1, 64, 64), 2, np.uint8))
    with pytest.raises(DataError, match="values outside 0..1"):
        load_dataset("dsprites", data_dir=rendered, num_images=10)
    with pytest.raises(DataError, match=f"not found in .*, nor {dsprites.RENDERED_FILE}"):
        load_dataset("dsprites", data_dir=rendered / "elsewhere", num_images=10)


def test_the_command_renders_and_refuses_with_one_line(small, tmp_path):
    out = tmp_path / "dsprites"
    result = invoke("data", "dsprites", "--out", out, "--chunk", 700, "--no-progress")
    assert result.exit_code == 0, result.output
    assert f"wrote {out / dsprites.RENDERED_FILE} ({N:,} images" in result.output
    assert np.load(out / dsprites.RENDERED_FILE, mmap_mode="r").shape == (N, 1, 64, 64)
    one_line_error(invoke("data", "dsprites", "--out", out, "--no-progress"), "exists; remove it")
    assert invoke("data", "dsprites", "--out", out, "--overwrite", "--no-progress").exit_code == 0
    one_line_error(invoke("data", "dsprites", "--out", tmp_path / "x", "--chunk", 0), "chunk must be an integer >= 1")
    (tmp_path / "a_file").write_text("")
    one_line_error(invoke("data", "dsprites", "--out", tmp_path / "a_file"), "is a file, not a folder")
    assert not (tmp_path / "x").exists()


def test_a_run_trains_on_the_render_and_reloads_it(rendered, tmp_path, one_thread):
    import ppl_vae
    from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from ppl_vae.pipeline import load_data

    config = RunConfig(
        model=ModelConfig(model="chen_mlp", latent_dim=3, hidden_dim=16),
        data=DataConfig(dataset="dsprites", data_dir=str(rendered), num_images=200),
        train=TrainConfig(epochs=1, batch_size=50, device="cpu", train_eval_size=40),
    )
    run = ppl_vae.fit(config, tmp_path / "run", progress=False)
    assert np.isfinite(run.final["test_elbo"])
    data = load_data(ppl_vae.load_run(tmp_path / "run").config)
    assert isinstance(data.train, NpyRows) and data.train_factors is not None and len(data.test_factors) == 40


def test_a_terminated_render_cleans_up_as_an_interrupted_one(small, tmp_path, monkeypatch):
    """`kill` (SIGTERM) of `ppl-vae data dsprites` left its hidden partial file (940 MB): Python's
    default for SIGTERM ends the process without the clean-up Ctrl-C gets. While it renders, the
    command now turns SIGTERM into that interrupt (the handler is called here, not the signal sent:
    without it the test run itself would be killed)."""
    import signal

    render = dsprites.render
    calls = []

    def terminated_on_the_third(classes, **kw):
        calls.append(1)
        if len(calls) == 3:
            handler = signal.getsignal(signal.SIGTERM)
            assert callable(handler), "no SIGTERM handler while rendering"
            handler(signal.SIGTERM, None)
        return render(classes, **kw)

    monkeypatch.setattr(dsprites, "render", terminated_on_the_third)
    before = signal.getsignal(signal.SIGTERM)
    result = invoke("data", "dsprites", "--out", tmp_path / "out", "--chunk", 300, "--no-progress")
    assert result.exit_code == 130 and "interrupted" in result.output
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before  # restored


def test_the_dynamic_binarization_refusal_names_the_flag(rendered, tmp_path):
    """It spelled the Python argument (binarize='dynamic') to a command-line user."""
    result = invoke(
        "fit", "--dataset", "dsprites", "--data-dir", rendered, "--num-images", 400, "--binarize", "dynamic",
        "--epochs", 1, "--out", tmp_path / "run",
    )  # fmt: skip
    line = one_line_error(result, "--binarize 'dynamic' needs a test set sampled once in memory")
    assert "use --binarize 'threshold'" in line and not (tmp_path / "run").exists()
