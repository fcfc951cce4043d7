"""Text corpora as character indices; sensor CSVs as sliding windows; one-class Fashion-MNIST."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ppl_vae.data.datasets import load_dataset
from ppl_vae.data.text import (
    END_INDEX,
    FORTUNES_DEFAULT_DIR,
    UNKNOWN_INDEX,
    VOCAB_SIZE,
    decode_indices,
    encode_text,
    read_fortunes,
    read_text_lines,
    text_dataset,
)
from ppl_vae.data.timeseries import load_timeseries_arrays, read_timeseries_csv, sliding_windows
from ppl_vae.errors import DataError


def test_encode_decode_round_trip_and_padding():
    x = encode_text("Hi,\n  there!", 16)
    assert x.shape == (16,) and x.dtype == np.int64
    assert decode_indices(x) == "Hi, there!"
    assert (x[10:] == END_INDEX).all() and x[:10].min() >= 2 and x.max() < VOCAB_SIZE
    assert encode_text("é", 4)[0] == UNKNOWN_INDEX
    assert decode_indices(encode_text("x" * 20, 8)) == "x" * 8  # truncated


def test_text_file_loader_keeps_lines_that_fit(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first line\n\n" + "y" * 70 + "\nsecond one\nthird\nfourth\n")
    assert read_text_lines(path) == ["first line", "y" * 70, "second one", "third", "fourth"]
    data = load_dataset("text-lines", path, test_fraction=0.25)
    assert data.event_shape == (64,)
    assert len(data.train) + len(data.test) == 4  # the 70-character line does not fit
    both = torch.cat([data.train, data.test])
    assert torch.equal(both, both.round())
    assert sorted(decode_indices(r) for r in both) == ["first line", "fourth", "second one", "third"]
    small = text_dataset(["ab", "cd", "ef"], max_length=8, test_fraction=0.34)
    assert small.info == {"vocab_size": VOCAB_SIZE, "max_length": 8} and small.event_shape == (8,)


def test_empty_or_missing_text_gives_one_line_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="empty") as info:
        load_dataset("text-lines", empty)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="needs data_dir"):
        load_dataset("text-lines")
    with pytest.raises(DataError, match="no .txt files"):
        read_text_lines(tmp_path / "sub" if (tmp_path / "sub").mkdir() is None else tmp_path)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(DataError, match="not UTF-8"):
        read_text_lines(binary)


def strfile_header(count: int) -> bytes:
    """The header strfile writes: version 2, count, longest, shortest, flags, then '%'."""
    import struct

    return struct.pack(">5I", 2, count, 10, 5, 0) + b"%\0\0\0"


def test_fortune_loader_reads_only_indexed_fortune_files(tmp_path):
    # a received config with dataset fortunes, data_dir /etc read every file there as sentences
    (tmp_path / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (tmp_path / "notes.dat").write_bytes(b"not an index")
    (tmp_path / "notes").write_text("secret note\n")
    with pytest.raises(DataError, match="no fortune files"):
        read_fortunes(tmp_path)
    (tmp_path / "wisdom").write_text("Short one.\n%\nOther.\n")
    (tmp_path / "wisdom.dat").write_bytes(strfile_header(2))
    assert [" ".join(e.split()) for e in read_fortunes(tmp_path)] == ["Short one.", "Other."]


def test_fortune_files_split_on_percent_lines(tmp_path):
    (tmp_path / "wisdom").write_text("Short one.\n%\nTwo\nlines.\n%\n%\n")
    (tmp_path / "wisdom.dat").write_bytes(strfile_header(2))
    assert [" ".join(e.split()) for e in read_fortunes(tmp_path)] == ["Short one.", "Two lines."]
    data = load_dataset("fortunes", tmp_path, test_fraction=0.5)
    assert {decode_indices(r) for r in torch.cat([data.train, data.test])} == {"Short one.", "Two lines."}
    with pytest.raises(DataError, match="fortunes"):
        read_fortunes(tmp_path / "absent")


@pytest.mark.skipif(not FORTUNES_DEFAULT_DIR.is_dir(), reason="Debian package fortunes is not installed")
def test_real_fortune_corpus_loads():
    data = load_dataset("fortunes")
    assert len(data.train) > 1000 and data.event_shape == (64,)


def _write_csv(path, values, labels=None):
    header = ",".join([f"s{i}" for i in range(values.shape[1])] + (["label"] if labels is not None else []))
    rows = [
        ",".join([f"{v:.6f}" for v in row] + ([str(int(label))] if labels is not None else []))
        for row, label in zip(values, labels if labels is not None else [None] * len(values))
    ]
    path.write_text(header + "\n" + "\n".join(rows) + "\n")


def test_sliding_windows_known_values():
    values = np.arange(20, dtype=float).reshape(10, 2)  # two sensors
    w = sliding_windows(values, 4, 3)
    assert w.shape == (3, 2, 4)  # starts 0, 3, 6
    assert w[1, 0].tolist() == [6, 8, 10, 12] and w[1, 1].tolist() == [7, 9, 11, 13]


def test_timeseries_csv_windows_split_standardize_and_label(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.normal(5.0, 2.0, size=(200, 3))
    labels = np.zeros(200, dtype=int)
    labels[50:52] = 1  # in the training part: those windows are dropped
    labels[180] = 1
    path = tmp_path / "sensors.csv"
    _write_csv(path, values, labels)
    v, lab, names = read_timeseries_csv(path)
    assert names == ["s0", "s1", "s2"] and v.shape == (200, 3) and lab.sum() == 3
    train, test, train_y, test_y = load_timeseries_arrays(path, window=8, stride=4, test_fraction=0.3)
    assert train.shape[1:] == (3, 8) and test.shape[1:] == (3, 8)
    assert (train_y == 0).all()  # only normal windows to learn from
    assert len(train) == (140 - 8) // 4 + 1 - 2  # the windows starting at rows 44 and 48 hold rows 50-51
    # chronological split: the test windows cover rows 140..199; row 180 is in windows starting at 176, 180
    assert test_y.tolist().count(1) == 2
    # standardized with the training rows' statistics
    x_train = (values[:140] - values[:140].mean(0)) / values[:140].std(0)
    assert np.allclose(train[0], x_train[:8].T, atol=1e-5)
    data = load_dataset("timeseries-csv", path)
    assert data.event_shape[0] == 3 and data.test_labels is not None


def test_non_numeric_csv_column_is_a_one_line_error(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("a,b\n1,x\n2,y\n")
    with pytest.raises(DataError, match="non-numeric value 'x'") as info:
        load_dataset("timeseries-csv", path)
    assert "\n" not in str(info.value)
    short = tmp_path / "short.csv"
    _write_csv(short, np.zeros((10, 2)))
    with pytest.raises(DataError, match="too few"):
        load_dataset("timeseries-csv", short)


def test_fashion_mnist_one_class_labels():
    from ppl_vae.data.datasets import FASHION_MNIST_DEFAULT_DIR

    if not FASHION_MNIST_DEFAULT_DIR.is_dir():
        pytest.skip("Fashion-MNIST is not installed")
    data = load_dataset("fashion-mnist-oneclass-3")
    assert len(data.train) == 6000 and (data.train_labels == 0).all()
    assert len(data.test) == 10000 and int(data.test_labels.sum()) == 9000
