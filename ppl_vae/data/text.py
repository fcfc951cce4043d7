"""Character-level text data: sentences as fixed-length rows of character indices.

A fixed alphabet keeps every corpus (and a trained model) compatible: index 0 is the end of
text (and the padding after it), index 1 stands for any character outside the alphabet, and
indices 2.. are printable ASCII (space to ``~``). Whitespace runs become one space. A sentence
of ``max_length - 1`` characters or fewer is stored with its end token; longer ones are
dropped by the corpus loaders (as Semeniuta et al. 2017 keep only short tweets), or truncated
by :func:`encode_text`. Indices are stored as float32 (the :class:`Dataset` tensor type) and
are exact integers; models cast them with ``.long()``.

Corpora: ``fortunes`` (Debian's fortune-cookie packages, ``apt-get install fortunes`` or
``fortunes-min``, in /usr/share/games/fortunes: the entries between ``%`` lines) and
``text-lines`` (a user's UTF-8 text file, or a folder of ``.txt`` files, one sentence per line,
named by ``--data-dir``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np
import torch

from ppl_vae.data.datasets import DATASETS, Arrays, Dataset
from ppl_vae.errors import DataError

END_INDEX = 0
UNKNOWN_INDEX = 1
CHARACTERS = "".join(chr(c) for c in range(32, 127))  # printable ASCII, space first
VOCAB_SIZE = 2 + len(CHARACTERS)
DEFAULT_MAX_LENGTH = 64
FORTUNES_DEFAULT_DIR = Path("/usr/share/games/fortunes")
_INDEX = {ch: i + 2 for i, ch in enumerate(CHARACTERS)}


def normalize_text(text: str) -> str:
    """Collapse whitespace (newlines, tabs) to single spaces and strip the ends."""
    return " ".join(text.split())


def encode_text(text: str, max_length: int = DEFAULT_MAX_LENGTH) -> np.ndarray:
    """Indices ``(max_length,)`` int64 of a sentence: characters, the end token, then padding.

    A sentence too long for its end token is truncated to ``max_length`` characters.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    chars = [_INDEX.get(ch, UNKNOWN_INDEX) for ch in normalize_text(text)[:max_length]]
    out = np.full(max_length, END_INDEX, dtype=np.int64)
    out[: len(chars)] = chars
    return out


def decode_indices(indices: Sequence[int] | np.ndarray | torch.Tensor) -> str:
    """The sentence of one row of indices, up to its first end token (unknown characters as U+FFFD)."""
    out = []
    for i in np.asarray(torch.as_tensor(indices).cpu(), dtype=np.int64).reshape(-1):
        if i == END_INDEX:
            break
        out.append(CHARACTERS[i - 2] if 2 <= i < VOCAB_SIZE else "\ufffd")
    return "".join(out)


def encode_corpus(sentences: Iterable[str], max_length: int = DEFAULT_MAX_LENGTH, what: str = "text") -> np.ndarray:
    """``(N, max_length)`` indices of the non-empty sentences that fit with their end token."""
    kept = [s for s in (normalize_text(t) for t in sentences) if s and len(s) < max_length]
    if not kept:
        raise DataError(f"{what} holds no non-empty sentence of fewer than {max_length} characters")
    return np.stack([encode_text(s, max_length) for s in kept])


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None


def read_text_lines(path: str | Path) -> List[str]:
    """Sentences of a text file (one per non-empty line), or of every ``.txt`` file in a folder."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise DataError(f"folder {path} holds no .txt files")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"text file not found: {path}")
    lines = [line for f in files for line in _read_text(f).splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{path} is empty: it holds no line of text")
    return lines


def read_fortunes(folder: str | Path = FORTUNES_DEFAULT_DIR) -> List[str]:
    """Entries of the fortune-cookie files in ``folder`` (the text between ``%`` lines).

    A fortune file is one that ``strfile`` indexed: ``NAME`` beside a ``NAME.dat`` whose header
    says so (version 1 or 2, delimiter ``%``). Only those are read, so a ``data_dir`` that names
    some other folder (``/etc`` in a received config) reads nothing of it; the ``.u8`` symlinks
    are skipped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(
            f"fortune files not found in {folder}; install Debian's package 'fortunes' (or 'fortunes-min') "
            "or pass --data-dir"
        )
    entries: List[str] = []
    for f in sorted(folder.iterdir()):
        if (
            f.suffix in (".dat", ".u8")
            or f.is_symlink()
            or not f.is_file()
            or not is_strfile_index(f.with_name(f.name + ".dat"))
        ):
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        entries += [e for e in re.split(r"^%\s*$", text, flags=re.M) if e.strip()]
    if not entries:
        raise DataError(f"{folder} holds no fortune files (a file NAME with its strfile index NAME.dat)")
    return entries


def is_strfile_index(path: Path) -> bool:
    """Whether ``path`` is a ``strfile`` index (``.dat``): a big-endian header of five 32-bit
    words (version 1 or 2, count, longest, shortest, flags), then the delimiter ``%``."""
    try:
        if path.is_symlink() or not path.is_file():
            return False
        with open(path, "rb") as fh:
            head = fh.read(21)
    except OSError:
        return False
    return len(head) == 21 and int.from_bytes(head[:4], "big") in (1, 2) and head[20:21] == b"%"


@DATASETS.register(
    "fortunes",
    doc=f"fortune cookies under {DEFAULT_MAX_LENGTH} characters (Debian package fortunes), character indices",
)
def load_fortunes_arrays(data_dir: Optional[Path] = None) -> Arrays:
    """Fortune cookies shorter than 64 characters as character indices ``(N, 64)``."""
    folder = FORTUNES_DEFAULT_DIR if data_dir is None else Path(data_dir)
    return encode_corpus(read_fortunes(folder), what=f"fortunes in {folder}").astype(np.float32), None, None, None


@DATASETS.register(
    "text-lines",
    doc="a user's text file (or folder of .txt), one sentence per line, as data_dir (--data-dir); character indices",
)
def load_text_lines_arrays(data_dir: Optional[Path]) -> Arrays:
    """Lines shorter than 64 characters of the text file (or ``.txt`` folder) that ``--data-dir`` names."""
    if data_dir is None:
        raise DataError(
            "dataset 'text-lines' needs data_dir: a text file (or folder of .txt files), one sentence per line"
        )
    return encode_corpus(read_text_lines(data_dir), what=str(data_dir)).astype(np.float32), None, None, None


def text_dataset(
    sentences: Sequence[str],
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    test_fraction: float = 0.1,
    seed: int = 0,
    name: str = "text",
) -> Dataset:
    """A :class:`Dataset` of sentences (any ``max_length``), split at random into train and test;
    ``info`` holds ``vocab_size`` and ``max_length``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    x = torch.from_numpy(encode_corpus(sentences, max_length, what=name).astype(np.float32))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(test_fraction * len(x))))
    if len(x) - n_test < 1:
        raise DataError(f"{name} has {len(x)} sentence(s): too few to hold out a test set")
    return Dataset(name, x[perm[n_test:]], x[perm[:n_test]], info={"vocab_size": VOCAB_SIZE, "max_length": max_length})
