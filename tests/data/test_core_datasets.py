"""Dataset loading: IDX, .mat, arrays, splits, binarization, and the errors for bad files."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from ppl_vae.data import load_dataset, read_idx
from ppl_vae.data.datasets import MNIST_SHA256
from ppl_vae.errors import DataError
from tests.conftest import FASHION_MNIST_DIR


def write_idx(path, array: np.ndarray, compress: bool = True) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (20, 5, 4)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 20))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (7, 5, 4)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 7))
    return tmp_path


def test_read_idx_round_trip(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.idx", a, compress=False)
    write_idx(tmp_path / "a.idx.gz", a)
    assert np.array_equal(read_idx(tmp_path / "a.idx"), a)
    assert np.array_equal(read_idx(tmp_path / "a.idx.gz"), a)


def test_read_idx_rejects_truncated_and_corrupt_files(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.idx", a, compress=False)
    raw = (tmp_path / "a.idx").read_bytes()
    (tmp_path / "short.idx").write_bytes(raw[:-5])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(tmp_path / "short.idx")
    (tmp_path / "bad.idx").write_bytes(b"\x12\x34" + raw[2:])
    with pytest.raises(DataError, match="bad magic"):
        read_idx(tmp_path / "bad.idx")
    (tmp_path / "bad.gz").write_bytes(gzip.compress(raw)[:30])
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        read_idx(tmp_path / "bad.gz")
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "missing.idx")


def test_mnist_layout_from_a_data_dir(idx_dir):
    data = load_dataset("mnist", idx_dir)
    assert data.train.shape == (20, 1, 5, 4) and data.test.shape == (7, 1, 5, 4)
    assert data.event_shape == (1, 5, 4)
    raw = read_idx(idx_dir / "train-images-idx3-ubyte.gz")
    assert torch.allclose(data.train[:, 0], torch.from_numpy(raw / 255.0).float())
    assert data.train_labels.dtype == torch.int64 and len(data.test_labels) == 7
    assert data.data_info["num_classes"] == int(max(data.train_labels.max(), data.test_labels.max())) + 1


def test_missing_mnist_files_say_where_to_get_them(tmp_path):
    with pytest.raises(DataError, match="needs data_dir"):
        load_dataset("mnist")
    with pytest.raises(DataError, match=f"not found in {tmp_path}.*{MNIST_SHA256['train-images-idx3-ubyte.gz']}"):
        load_dataset("mnist", tmp_path)


def test_digits_default_is_scaled_and_split_reproducibly():
    a = load_dataset()
    b = load_dataset()
    assert a.name == "digits" and a.event_shape == (1, 8, 8)
    assert a.train.shape[0] + a.test.shape[0] == 1797
    assert a.test.shape[0] == round(0.2 * 1797)
    assert a.train.min() >= 0 and a.train.max() == 1.0
    assert torch.equal(a.test, b.test)
    assert not torch.equal(load_dataset(split_seed=1).test, a.test)


def test_npz_train_test_split_is_kept_and_npy_is_split(tmp_path):
    train, test = np.random.rand(30, 3), np.random.rand(10, 3)
    np.savez(tmp_path / "d.npz", train=train, test=test)
    data = load_dataset(str(tmp_path / "d.npz"))
    assert np.allclose(data.train.numpy(), train) and np.allclose(data.test.numpy(), test)
    np.save(tmp_path / "d.npy", np.random.rand(50, 2))
    data = load_dataset(str(tmp_path / "d.npy"), test_fraction=0.2)
    assert data.train.shape == (40, 2) and data.test.shape == (10, 2)


def test_csv_with_header(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n0.1,0.2\n0.3,0.4\n0.5,0.6\n0.7,0.8\n")
    data = load_dataset(str(tmp_path / "d.csv"), test_fraction=0.25)
    assert data.train.shape == (3, 2) and data.test.shape == (1, 2)
    assert sorted(torch.cat([data.train, data.test])[:, 0].tolist()) == pytest.approx([0.1, 0.3, 0.5, 0.7])


def test_csv_byte_order_mark_keeps_every_row(tmp_path):
    # a UTF-8 BOM made the first data row look like a header, and it was dropped
    (tmp_path / "d.csv").write_bytes("0.1,0.2\n0.3,0.4\n0.5,0.6\n0.7,0.8\n".encode("utf-8-sig"))
    data = load_dataset(str(tmp_path / "d.csv"), test_fraction=0.25)
    assert sorted(torch.cat([data.train, data.test])[:, 0].tolist()) == pytest.approx([0.1, 0.3, 0.5, 0.7])
    (tmp_path / "h.csv").write_bytes("a,b\n0.1,0.2\n0.3,0.4\n".encode("utf-8-sig"))
    assert load_dataset(str(tmp_path / "h.csv"), test_fraction=0.5).train.shape == (1, 2)


@pytest.mark.parametrize(
    "content,message",
    [
        ("0.5x,1\n3,4\n5,6\n", "non-numeric value '0.5x' in data row 1"),  # a typo is not a header
        ("1,2\n3,x\n", "non-numeric value 'x' in data row 2"),
        ("1,2\n3\n", "row 2 has 1 columns, expected 2"),
        ("a,b\n", "no data rows"),
    ],
)
def test_bad_csv_gives_one_line_errors(tmp_path, content, message):
    (tmp_path / "d.csv").write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(str(tmp_path / "d.csv"))
    assert "\n" not in str(info.value)


def test_nan_and_bad_files_are_refused(tmp_path):
    a = np.random.rand(10, 2)
    a[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", a)
    with pytest.raises(DataError, match="1 NaN or infinite"):
        load_dataset(str(tmp_path / "nan.npy"))
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(str(tmp_path / "bad.npz"))
    with pytest.raises(DataError, match="not found"):
        load_dataset(str(tmp_path / "absent.npy"))
    with pytest.raises(ValueError, match="unknown dataset .imagenet.; valid datasets: digits, dsprites, fashion-mnist"):
        load_dataset("imagenet")
    (tmp_path / "x.txt").write_text("1")
    with pytest.raises(DataError, match="unsupported data file type"):
        load_dataset(str(tmp_path / "x.txt"))


def test_binarization():
    static = load_dataset(binarize="threshold")
    assert set(static.train.unique().tolist()) == {0.0, 1.0}
    dynamic = load_dataset(binarize="dynamic")
    assert dynamic.dynamic_binarization
    # the test set is sampled once, with the split seed: reproducible
    assert torch.equal(dynamic.test, load_dataset(binarize="dynamic").test)
    assert set(dynamic.test.unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="binarize must be one of"):
        load_dataset(binarize="sometimes")


def test_train_size_subsets():
    assert load_dataset(train_size=100).train.shape[0] == 100


def test_real_mnist_and_frey_face(shared_datasets):
    mnist = load_dataset("mnist", shared_datasets / "mnist")
    assert mnist.train.shape == (60000, 1, 28, 28) and mnist.test.shape == (10000, 1, 28, 28)
    assert mnist.train.mean().item() * 255 == pytest.approx(33.318, abs=1e-3)
    assert torch.bincount(mnist.train_labels).tolist()[:3] == [5923, 6742, 5958]
    frey = load_dataset("frey-face", shared_datasets / "frey_face")
    assert frey.event_shape == (1, 28, 20)
    assert frey.train.shape[0] + frey.test.shape[0] == 1965


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_the_debian_package():
    data = load_dataset("fashion-mnist")
    assert data.train.shape == (60000, 1, 28, 28) and data.test.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.test_labels).tolist() == [1000] * 10


def test_embedded_digits_equal_scikit_learns_load_digits():
    """The digits are read from scikit-learn's bundled CSV without importing scikit-learn
    (a second of every `ppl-vae fit`); they must be exactly what load_digits returns."""
    from sklearn.datasets import load_digits

    from ppl_vae.data.datasets import load_digits_arrays

    images, _, labels, _ = load_digits_arrays()
    bunch = load_digits()
    np.testing.assert_array_equal(images, (bunch.images[:, None] / 16.0).astype(np.float32))
    np.testing.assert_array_equal(labels, bunch.target)


@pytest.mark.parametrize("binarize", ["none", "dynamic", "threshold"])
def test_a_test_only_load_gives_the_full_loads_test_split_without_reading_the_training_files(idx_dir, binarize):
    """``test_only`` (evaluate and compare on the test split): MNIST's training files are not
    read (here they are made unreadable after a full load), no training rows are returned, and
    the test split, its labels and its binarization draw are the full load's."""
    full = load_dataset("mnist", idx_dir, binarize=binarize, split_seed=3)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (idx_dir / name).write_bytes(b"\x1f\x8b not gzip")  # a read of it would fail
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        load_dataset("mnist", idx_dir, binarize=binarize, split_seed=3)
    alone = load_dataset("mnist", idx_dir, binarize=binarize, split_seed=3, test_only=True)
    assert torch.equal(alone.test, full.test) and torch.equal(alone.test_labels, full.test_labels)
    assert alone.train.shape == (0, 1, 5, 4) and alone.event_shape == full.event_shape
    assert alone.dynamic_binarization == full.dynamic_binarization
    if binarize != "none":
        assert set(alone.test.unique().tolist()) <= {0.0, 1.0}


def test_a_labelled_runs_test_only_load_reads_no_training_file(idx_dir):
    """A semi-supervised run (M2, ``--labels``): its labelled split is drawn from the training
    labels, which a test-only load (evaluate, compare) leaves unread; the test split and its
    labels are the full load's, and a full load still masks all but the kept training labels."""
    from ppl_vae.config import DataConfig, ModelConfig, RunConfig
    from ppl_vae.data.labels import UNLABELLED
    from ppl_vae.pipeline import load_data

    config = RunConfig(
        model=ModelConfig(model="m2"),
        data=DataConfig(dataset="mnist", data_dir=str(idx_dir), binarize="dynamic", labels=10),
    )
    full = load_data(config)
    assert int((full.train_labels != UNLABELLED).sum()) == 10
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (idx_dir / name).write_bytes(b"\x1f\x8b not gzip")
    alone = load_data(config, test_only=True)
    assert torch.equal(alone.test, full.test) and torch.equal(alone.test_labels, full.test_labels)
    assert alone.train.shape[0] == 0


def test_a_test_only_load_of_data_without_test_files_loads_whole():
    """The embedded digits draw their test split from all the images: test_only changes nothing."""
    full = load_dataset("digits", split_seed=1)
    alone = load_dataset("digits", split_seed=1, test_only=True)
    assert torch.equal(alone.test, full.test) and torch.equal(alone.train, full.train)


def test_a_train_size_beyond_the_data_is_refused_except_where_the_test_split_alone_is_read():
    """train_size 5000 on the digits' 1438 training points was kept as given: the run recorded a
    size it never trained on. A test-only load (evaluate of a run) takes the test split as before."""
    from ppl_vae.data import load_dataset
    from ppl_vae.errors import DataError

    with pytest.raises(DataError, match=r"train_size 5000 is larger than the training set of digits \(1438 points\)"):
        load_dataset("digits", train_size=5000)
    assert load_dataset("digits", train_size=5000, test_only=True).test.shape[0] == 359
    assert load_dataset("digits", train_size=1438).train.shape[0] == 1438


def _write_idx_typed(path, array: np.ndarray) -> None:
    """An IDX file of another element type (0x0D float32, 0x0C int32), big-endian as the format is."""
    code = {np.dtype(np.float32): 0x0D, np.dtype(np.int32): 0x0C}[array.dtype]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(array.dtype.newbyteorder(">")).tobytes()))


def test_mnist_files_other_than_8_bit_images_and_whole_labels_are_refused(idx_dir):
    """Images are divided by 255, so a float file already in [0, 1] became [0, 1/255] and an int32
    file was refused only after the division; float labels 0.5 were truncated to class 0."""
    rng = np.random.default_rng(1)
    _write_idx_typed(idx_dir / "t10k-images-idx3-ubyte.gz", rng.random((7, 5, 4)).astype(np.float32))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz holds float32 images; .* 8-bit grey levels"):
        load_dataset("mnist", idx_dir)
    write_idx(idx_dir / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (7, 5, 4)))
    _write_idx_typed(idx_dir / "t10k-labels-idx1-ubyte.gz", np.full(7, 0.5, dtype=np.float32))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz must be whole numbers"):
        load_dataset("mnist", idx_dir)


def test_a_test_class_no_training_label_has_is_refused_for_a_model_of_the_labels(idx_dir, tmp_path):
    """m2 and cvae take num_classes = max(label) + 1: a stray test label 200 built 201 classes.
    Anomaly labels (0/1 with only normal training data) stay allowed for other models."""
    from ppl_vae import pipeline
    from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    rng = np.random.default_rng(2)
    write_idx(idx_dir / "train-labels-idx1-ubyte.gz", rng.integers(0, 3, 20))
    write_idx(idx_dir / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 0, 1, 2, 200]))
    config = RunConfig(
        model=ModelConfig(model="cvae", latent_dim=2, hidden_dim=8),
        data=DataConfig(dataset="mnist", data_dir=str(idx_dir)),
        train=TrainConfig(epochs=1, batch_size=10, device="cpu"),
    )
    with pytest.raises(DataError, match="the test labels hold class 200, which no training label has"):
        pipeline.fit(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    config.model = ModelConfig(model="bernoulli_mlp", latent_dim=2, hidden_dim=8)  # labels are not its classes
    pipeline.fit(config, tmp_path / "plain", progress=False)


def test_a_home_folder_tilde_is_expanded_in_data_dir_and_file_names(idx_dir, monkeypatch):
    """--data-dir ~/datasets/mnist was read as a folder literally named '~'."""
    home = idx_dir.parent
    monkeypatch.setenv("HOME", str(home))
    data = load_dataset("mnist", f"~/{idx_dir.name}")
    assert data.test.shape[0] == 7
    np.save(idx_dir / "a.npy", np.random.default_rng(0).random((30, 4)).astype(np.float32))
    assert load_dataset(f"~/{idx_dir.name}/a.npy").train.shape[1:] == (4,)


def test_a_new_run_records_a_tilde_data_dir_as_the_folder_it_names(idx_dir, monkeypatch, tmp_path):
    from ppl_vae.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from ppl_vae.pipeline import absolute_data_paths

    monkeypatch.setenv("HOME", str(idx_dir.parent))
    config = RunConfig(
        model=ModelConfig(), data=DataConfig(dataset="mnist", data_dir=f"~/{idx_dir.name}"), train=TrainConfig()
    )
    assert absolute_data_paths(config).data.data_dir == str(idx_dir)


def test_data_file_errors_say_what_is_wrong(tmp_path):
    """A folder given as the data file read "data file not found"; an IDX header whose dimensions
    overflow int64 gave a numpy reshape error naming no file; an .npz without arrays "holds arrays ;"."""
    from ppl_vae.data.readers import read_idx

    with pytest.raises(DataError, match="is a folder, not a data file: .* --data-dir FOLDER"):
        load_dataset(str(tmp_path))
    header = struct.pack(">BBBB", 0, 0, 0x08, 3) + struct.pack(">3I", 2**22, 2**21, 2**21)
    (tmp_path / "huge.idx").write_bytes(header)
    with pytest.raises(DataError, match=r"huge.idx is truncated or corrupt: header says shape \(4194304, 2097152"):
        read_idx(tmp_path / "huge.idx")
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(DataError, match="holds no array; expected 'train' and 'test', or one array"):
        load_dataset(str(tmp_path / "empty.npz"))


def test_data_dir_errors_name_the_real_problem(idx_dir, tmp_path):
    """An unknown name with a data_dir was called 'a file, read from its own path'; a data_dir
    that is a file read 'not found in <file>'; an empty IDX file had a 'bad magic number'."""
    from ppl_vae.data.datasets import check_data_dir
    from ppl_vae.data.readers import read_idx

    with pytest.raises(ValueError, match="unknown dataset 'binarized_mnist'; valid datasets: digits"):
        check_data_dir("binarized_mnist", str(idx_dir))
    with pytest.raises(DataError, match="data_dir .*train-images-idx3-ubyte.gz is a file; give the folder holding"):
        load_dataset("mnist", idx_dir / "train-images-idx3-ubyte.gz")
    (tmp_path / "empty.idx").write_bytes(b"")
    with pytest.raises(DataError, match="empty.idx is empty"):
        read_idx(tmp_path / "empty.idx")
