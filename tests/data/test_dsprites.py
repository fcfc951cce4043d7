"""The dSprites re-rendering: deterministic, each factor does what it says; factor labels load."""

from __future__ import annotations

import numpy as np
import pytest

from ppl_vae.data import dsprites, load_dataset
from ppl_vae.errors import DataError


def _centre(image: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(image)
    return np.array([cols.mean(), rows.mean()])


def test_rendering_is_deterministic_and_the_subset_is_seeded():
    a, b = dsprites.subset_indices(300, seed=4), dsprites.subset_indices(300, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, dsprites.subset_indices(300, seed=5))
    assert len(np.unique(a)) == 300 and a.max() < dsprites.NUM_COMBINATIONS
    classes = dsprites.index_to_classes(a)
    assert np.array_equal(dsprites.render(classes), dsprites.render(classes, chunk=7))
    assert dsprites.index_to_classes([0, dsprites.NUM_COMBINATIONS - 1]).tolist() == [[0] * 5, [2, 5, 39, 31, 31]]


def test_each_factor_moves_scales_rotates_or_changes_the_shape():
    base = [1, 3, 5, 10, 20]

    def img(**change):
        c = list(base)
        for name, value in change.items():
            c[dsprites.FACTOR_NAMES.index(name)] = value
        return dsprites.render(np.array([c]))[0]

    # position: the centre of mass moves right with pos_x and down with pos_y, by the grid's step
    step = (64 - 2 * dsprites.GEOMETRY["margin"]) / 31
    assert _centre(img(pos_x=20))[0] - _centre(img())[0] == pytest.approx(10 * step, abs=0.5)
    assert _centre(img(pos_y=25))[1] - _centre(img())[1] == pytest.approx(5 * step, abs=0.5)
    # scale: the area grows as scale squared
    areas = [img(scale=s).sum() for s in range(6)]
    assert all(np.diff(areas) > 0)
    ratio = (dsprites.factor_values()["scale"][5] / dsprites.factor_values()["scale"][0]) ** 2
    assert areas[5] / areas[0] == pytest.approx(ratio, rel=0.15)
    # orientation: the ellipse turned by a quarter turn is its transpose about the centre
    quarter = img(orientation=10, pos_x=15, pos_y=15)
    flat = img(orientation=0, pos_x=15, pos_y=15)
    assert not np.array_equal(quarter, flat) and abs(int(quarter.sum()) - int(flat.sum())) <= 4
    # shape: three different silhouettes, the ellipse (axes 1 x 0.5) smallest
    shapes = [img(shape=s) for s in range(3)]
    assert len({s.tobytes() for s in shapes}) == 3 and shapes[1].sum() < min(shapes[0].sum(), shapes[2].sum())
    assert set(np.unique(np.concatenate(shapes))) <= {0, 1}


def test_the_dsprites_dataset_has_factors_split_with_the_images():
    data = load_dataset("dsprites", num_images=200, split_seed=3)
    assert data.train.shape[1:] == (1, 64, 64) and len(data.train) + len(data.test) == 200
    assert data.factor_names == dsprites.FACTOR_NAMES
    assert data.train_factors.shape == (len(data.train), 5) and data.test_factors.shape == (len(data.test), 5)
    # each image is the rendering of its own factor row, after the split's shuffle
    again = dsprites.render(data.test_factors.numpy())
    assert np.array_equal(again[:, None].astype(np.float32), data.test.numpy())
    with pytest.raises(ValueError, match="num_images"):
        load_dataset("dsprites", num_images=0)
    with pytest.raises(ValueError, match="num_images applies"):
        load_dataset("digits", num_images=10)
    with pytest.raises(DataError, match="dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz not found"):
        load_dataset("dsprites", data_dir="/nonexistent", num_images=10)


def test_a_wrong_file_under_the_original_name_is_refused(tmp_path):
    np.savez(
        tmp_path / dsprites.ORIGINAL_FILE,
        imgs=np.zeros((3, 64, 64), np.uint8),
        latents_classes=np.zeros((3, 6), np.int64),
    )
    with pytest.raises(DataError, match="expected"):
        load_dataset("dsprites", data_dir=tmp_path, num_images=2)


def test_factor_labels_from_a_users_npz(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((50, 4)).astype(np.float32)
    factors = rng.integers(0, 3, (50, 2))
    np.savez(tmp_path / "f.npz", data=x, factors=factors, factor_names=np.array(["colour", "size"]))
    data = load_dataset(str(tmp_path / "f.npz"), test_fraction=0.2)
    assert data.factor_names == ("colour", "size")
    restored = np.concatenate([data.train_factors.numpy(), data.test_factors.numpy()])
    rows = {tuple(r) for r in np.concatenate([x, factors], 1).round(6).tolist()}
    got = np.concatenate([np.concatenate([data.train.numpy(), data.test.numpy()]), restored], 1)
    assert {tuple(r) for r in got.round(6).tolist()} == rows  # each point keeps its own factors
    np.savez(tmp_path / "bad.npz", data=x, factors=factors[:40])
    with pytest.raises(DataError, match="40 factor rows for 50"):
        load_dataset(str(tmp_path / "bad.npz"))
