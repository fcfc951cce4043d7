"""dSprites (Matthey et al. 2017) re-rendered: 2D shapes with five known generative factors.

The original data set (``dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz``, DeepMind) holds all
3 x 6 x 40 x 32 x 32 = 737,280 combinations of shape (square, ellipse, heart), scale (6 values
in [0.5, 1]), orientation (40 values in [0, 2 pi)) and position x, y (32 values each in [0, 1])
as 64 x 64 binary images. This module **re-renders** them procedurally (point-in-shape tests at
pixel centres, :func:`render`): the factors and their grids are the original's, the pixels are
not the original file's (the heart's outline, the shapes' sizes and the margins are this
module's choices, documented in :data:`GEOMETRY`), so numbers measured on it are comparable with
each other, not with published dSprites numbers. Rendering is deterministic, with no randomness.

``load_dataset("dsprites")`` renders a seeded random subset (``num_images``, default
:data:`DEFAULT_NUM_IMAGES`) of the 737,280 combinations; with ``data_dir`` holding the original
``.npz`` the same subset of the original images is read instead, and with ``data_dir`` holding
:data:`RENDERED_FILE` (all combinations rendered once by :func:`write_dsprites`, ``ppl-vae data
dsprites --out DIR``) the subset's rows are read from that file per minibatch, never loaded
(:class:`~ppl_vae.data.ondisk.NpyRows`). Every way the dataset's ``train_factors``/
``test_factors`` hold each image's factor classes (integer indices into the grids, columns
:data:`FACTOR_NAMES`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional, Tuple, TypedDict, Union

import numpy as np

from ppl_vae.errors import DataError
from ppl_vae.io import make_folder

if TYPE_CHECKING:  # the on-disk reader imports torch; rendering needs only numpy
    from ppl_vae.data.ondisk import NpyRows

FACTOR_NAMES: Tuple[str, ...] = ("shape", "scale", "orientation", "pos_x", "pos_y")
FACTOR_SIZES: Tuple[int, ...] = (3, 6, 40, 32, 32)
SHAPES: Tuple[str, ...] = ("square", "ellipse", "heart")
NUM_COMBINATIONS = int(np.prod(FACTOR_SIZES))  # 737,280
IMAGE_SIZE = 64
DEFAULT_NUM_IMAGES = 10_000
ORIGINAL_FILE = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
#: :func:`write_dsprites`' file: every combination in the original's order, uint8 0/1, (N, 1, 64, 64)
RENDERED_FILE = "dsprites_rendered_64x64.npy"
#: combinations rendered per write of :func:`write_dsprites` (8,192 images: 32 MiB of pixels)
WRITE_CHUNK = 8192
#: rows of a rendered file that :func:`open_rendered` renders again and compares
NUM_CHECKED_ROWS = 32


class Geometry(TypedDict):
    """The type of :data:`GEOMETRY`."""

    radius: float
    margin: float
    square_half_side: float
    ellipse_axes: Tuple[float, float]
    heart_zoom: float


#: The re-rendering's geometry, in pixels of the 64 x 64 image: a shape at scale 1 fits a circle
#: of ``radius``; its centre moves over [``margin``, 64 - ``margin``] as pos_x, pos_y go 0 -> 1.
GEOMETRY: Geometry = {
    "radius": 10.0,
    "margin": 12.0,
    "square_half_side": 0.75,
    "ellipse_axes": (1.0, 0.5),
    "heart_zoom": 1.2,
}


def factor_values() -> Dict[str, np.ndarray]:
    """Each factor's grid of values: shape 1..3, scale linspace(0.5, 1, 6), orientation
    linspace(0, 2 pi, 40), pos_x and pos_y linspace(0, 1, 32) (the original's ``latents_values``)."""
    return {
        "shape": np.arange(1.0, 4.0),
        "scale": np.linspace(0.5, 1.0, 6),
        "orientation": np.linspace(0.0, 2 * math.pi, 40),
        "pos_x": np.linspace(0.0, 1.0, 32),
        "pos_y": np.linspace(0.0, 1.0, 32),
    }


def index_to_classes(index: np.ndarray) -> np.ndarray:
    """Factor classes ``(n, 5)`` of combination indices (the original file's order)."""
    return np.stack(np.unravel_index(np.asarray(index, dtype=np.int64), FACTOR_SIZES), -1)


def subset_indices(num_images: int, seed: int) -> np.ndarray:
    """A seeded random subset of ``num_images`` combination indices, sorted."""
    if (
        isinstance(num_images, bool)
        or not isinstance(num_images, (int, np.integer))
        or not (1 <= num_images <= NUM_COMBINATIONS)
    ):
        raise ValueError(f"num_images must be an integer in 1..{NUM_COMBINATIONS}, got {num_images!r}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(NUM_COMBINATIONS, size=int(num_images), replace=False))


def render(classes: np.ndarray, *, chunk: int = 512) -> np.ndarray:
    """Binary images ``(n, 64, 64)`` (uint8 0/1) of factor classes ``(n, 5)``; deterministic."""
    classes = np.asarray(classes, dtype=np.int64)
    if classes.ndim != 2 or classes.shape[1] != len(FACTOR_NAMES):
        raise ValueError(f"classes must have shape (n, {len(FACTOR_NAMES)}), got {classes.shape}")
    if (classes < 0).any() or (classes >= np.array(FACTOR_SIZES)).any():
        raise ValueError(f"classes must lie in 0..size-1 for the sizes {FACTOR_SIZES}")
    values = factor_values()
    g = GEOMETRY
    centre = (np.arange(IMAGE_SIZE) + 0.5)[None]  # pixel centres
    out = np.empty((len(classes), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for start in range(0, len(classes), chunk):
        c = classes[start : start + chunk]
        scale = values["scale"][c[:, 1]][:, None, None] * g["radius"]
        theta = values["orientation"][c[:, 2]][:, None, None]
        span = IMAGE_SIZE - 2 * g["margin"]
        cx = (g["margin"] + values["pos_x"][c[:, 3]] * span)[:, None, None]
        cy = (g["margin"] + values["pos_y"][c[:, 4]] * span)[:, None, None]
        dx = centre[:, None, :] - cx  # columns
        dy = centre[:, :, None] - cy  # rows
        cos, sin = np.cos(theta), np.sin(theta)
        u = (cos * dx + sin * dy) / scale
        v = (-sin * dx + cos * dy) / scale
        shape = c[:, 0][:, None, None]
        square = np.maximum(np.abs(u), np.abs(v)) <= g["square_half_side"]
        a, b = g["ellipse_axes"]
        ellipse = (u / a) ** 2 + (v / b) ** 2 <= 1.0
        hx, hy = g["heart_zoom"] * u, -g["heart_zoom"] * v + 0.125  # upright: image rows grow downwards
        heart = (hx**2 + hy**2 - 1.0) ** 3 - hx**2 * hy**3 <= 0.0
        out[start : start + chunk] = np.where(shape == 0, square, np.where(shape == 1, ellipse, heart))
    return out


def read_original(path: Path, indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Images ``(n, 64, 64)`` and factor classes ``(n, 5)`` at ``indices`` of the original ``.npz``
    (its ``imgs`` and ``latents_classes``; the colour column, always 0, is dropped)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not {"imgs", "latents_classes"} <= set(archive.files):
                raise DataError(f"{path} lacks 'imgs' or 'latents_classes': not the original dSprites file")
            classes = archive["latents_classes"]
            imgs = archive["imgs"]
    except DataError:
        raise
    except Exception as exc:  # zipfile and numpy raise many types for damaged files
        raise DataError(f"cannot read {path}: {type(exc).__name__}") from None
    if imgs.shape != (NUM_COMBINATIONS, IMAGE_SIZE, IMAGE_SIZE) or classes.shape != (NUM_COMBINATIONS, 6):
        raise DataError(
            f"{path} holds imgs {imgs.shape} and latents_classes {classes.shape}; expected "
            f"({NUM_COMBINATIONS}, 64, 64) and ({NUM_COMBINATIONS}, 6)"
        )
    return imgs[indices], classes[indices, 1:].astype(np.int64)


def write_dsprites(
    out_dir: Union[str, Path], *, chunk: Optional[int] = None, overwrite: bool = False, progress: bool = False
) -> Path:
    """Render all :data:`NUM_COMBINATIONS` combinations, in the original file's order, into
    ``out_dir/`` :data:`RENDERED_FILE`: a C-ordered ``.npy`` of uint8 0/1, shape ``(N, 1, 64, 64)``
    (3.0 GB for the 737,280 images), whose row ``i`` is :func:`render` of
    ``index_to_classes(i)``, so the factors need no file of their own. Returns the file's path.

    ``chunk`` combinations (default :data:`WRITE_CHUNK`) are rendered and appended at a time, so
    memory holds one chunk, never the whole array. The file is written under a temporary name in
    ``out_dir`` and renamed when complete: an interrupted render leaves no file under
    :data:`RENDERED_FILE`, and an existing file stays as it was until the new one replaces it. An
    existing file is refused unless ``overwrite``. ``progress``: a progress bar (tqdm) of images.
    """
    chunk = WRITE_CHUNK if chunk is None else chunk
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir: {out_dir} is a file, not a folder")
    target = out_dir / RENDERED_FILE
    if target.is_symlink() or target.is_dir():
        raise ValueError(f"out_dir: {target} is a symbolic link or a folder; refusing to write there")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; remove it, or render it again with overwrite=True (--overwrite)")
    make_folder(out_dir)  # removed again by the CLI if the rendering fails before writing
    from tqdm.auto import tqdm

    n = NUM_COMBINATIONS
    shape = (n, 1, IMAGE_SIZE, IMAGE_SIZE)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    partial = out_dir / f".{RENDERED_FILE}.{os.getpid()}.partial"
    try:
        with open(partial, "wb") as f, tqdm(total=n, disable=not progress, unit="img", desc="dsprites") as bar:
            np.lib.format.write_array_header_1_0(f, header)
            for start in range(0, n, int(chunk)):
                stop = min(n, start + int(chunk))
                f.write(render(index_to_classes(np.arange(start, stop))).tobytes())
                bar.update(stop - start)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, target)
    finally:
        if partial.exists():
            partial.unlink()
    return target


def open_rendered(path: Union[str, Path]) -> "NpyRows":
    """The rows of a :func:`write_dsprites` file, on disk (:class:`~ppl_vae.data.ondisk.NpyRows`),
    after checking its shape and dtype, that its values are 0 or 1, and that
    :data:`NUM_CHECKED_ROWS` of its rows (the first, the last and a fixed spread between) equal
    this module's :func:`render`: a file from another version of the geometry, or damaged, is
    refused with a :class:`DataError` rather than trained on."""
    from ppl_vae.data.ondisk import open_npy

    path = Path(path)
    again = f"render it again with `ppl-vae data dsprites --out {path.parent} --overwrite`"
    rows = open_npy(path)
    expected = (NUM_COMBINATIONS, 1, IMAGE_SIZE, IMAGE_SIZE)
    if rows.file.shape != expected or rows.file.dtype != np.uint8:
        raise DataError(
            f"{path} holds {rows.file.dtype} {rows.file.shape}; a complete dSprites render is uint8 {expected}: {again}"
        )
    low, high, _ = rows.value_range()
    if low < 0 or high > 1:
        raise DataError(f"{path} holds values outside 0..1, not a dSprites render: {again}")
    checked = np.unique(np.linspace(0, NUM_COMBINATIONS - 1, NUM_CHECKED_ROWS).astype(np.int64))
    expected_rows = render(index_to_classes(checked))[:, None]
    if not np.array_equal(rows[checked].numpy().astype(np.uint8), expected_rows):
        raise DataError(
            f"{path}: rows differ from this version's rendering (another geometry, or a damaged file): {again}"
        )
    return rows


def provenance(data_dir: Union[str, Path, None] = None) -> str:
    """Where :func:`load_dsprites` takes the images from for ``data_dir``, in one sentence."""
    if data_dir is not None and (Path(data_dir) / ORIGINAL_FILE).is_file():
        return f"dsprites images here are read from the original file ({ORIGINAL_FILE})."
    return "dsprites here is a re-rendering, not the original file."


def load_dsprites(data_dir: Optional[Path] = None, *, num_images: Optional[int] = None, seed: int = 0):
    """(images ``(n, 1, 64, 64)``, factor classes ``(n, 5)``) of the seeded subset: rendered here
    (float32), read from ``data_dir/`` :data:`ORIGINAL_FILE` when ``data_dir`` holds it (float32),
    else the subset's rows of ``data_dir/`` :data:`RENDERED_FILE`, left on disk (an
    :class:`~ppl_vae.data.ondisk.NpyRows`)."""
    indices = subset_indices(DEFAULT_NUM_IMAGES if num_images is None else num_images, seed)
    if data_dir is not None:
        path = Path(data_dir) / ORIGINAL_FILE
        rendered = Path(data_dir) / RENDERED_FILE
        if path.is_file():
            images, classes = read_original(path, indices)
        elif rendered.is_file():
            return open_rendered(rendered).take(indices), index_to_classes(indices)
        else:
            raise DataError(
                f"dsprites: {ORIGINAL_FILE} not found in {data_dir} (the original file from "
                f"https://github.com/deepmind/dsprites-dataset), nor {RENDERED_FILE} (write it with "
                f"`ppl-vae data dsprites --out {data_dir}`); without data_dir the images are re-rendered here"
            )
    else:
        classes = index_to_classes(indices)
        images = render(classes)
    return images[:, None].astype(np.float32), classes
