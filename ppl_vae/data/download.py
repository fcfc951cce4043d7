"""Optional download of MNIST and Frey Face, each file checked against its sha256.

Nothing in the library downloads by itself: :func:`download` runs only when asked (``ppl-vae
experiment download``). Each file is streamed to a temporary name beside its destination and
renamed into place only when its sha256 matches the expected one, so a failed or tampered
download never leaves a file that :func:`~ppl_vae.data.load_dataset` would read. Files already
present with the right checksum are kept.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from ppl_vae.data.datasets import FREY_FACE_SHA256, MNIST_SHA256
from ppl_vae.errors import DataError
from ppl_vae.io import atomic_path
from ppl_vae.registry import Registry

CHUNK = 1 << 16


@dataclass(frozen=True)
class Source:
    """Where a dataset's files live: ``base_url`` + file name, with each file's sha256."""

    base_url: str
    files: Dict[str, str]


SOURCES: Registry[Source] = Registry("downloadable dataset")
SOURCES.register("mnist", doc="MNIST IDX gzip files (PyTorch's public mirror of LeCun's files)")(
    Source("https://ossci-datasets.s3.amazonaws.com/mnist/", MNIST_SHA256)
)
SOURCES.register("frey-face", doc="frey_rawface.mat from Sam Roweis' data page")(
    Source("https://cs.nyu.edu/~roweis/data/", {"frey_rawface.mat": FREY_FACE_SHA256})
)


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(
    dataset: str,
    data_dir: str | Path,
    *,
    url: Optional[str] = None,
    timeout: float = 60.0,
    progress: bool = True,
) -> List[Path]:
    """Fetch ``dataset``'s files into ``data_dir``, verifying each sha256; returns their paths.

    ``url``: base URL the file names are appended to (default: the dataset's known source;
    ``file://`` URLs work, for mirrors on disk). A checksum mismatch raises
    :class:`~ppl_vae.errors.DataError` and leaves no file behind.
    """

    source = SOURCES.get(dataset)
    base = url if url is not None else source.base_url
    if not base.endswith("/"):
        base += "/"
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise ValueError(f"data_dir {data_dir} exists and is not a folder")
    created = [p for p in [data_dir, *data_dir.parents] if not p.exists()]
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _fetch_all(dataset, source, base, data_dir, timeout, progress)
    except BaseException:
        for folder in created:  # a failed download leaves no empty folder behind (deepest first)
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _fetch_all(dataset: str, source: Source, base: str, data_dir: Path, timeout: float, progress: bool) -> List[Path]:
    from tqdm.auto import tqdm

    paths = []
    for name, expected in source.files.items():
        path = data_dir / name
        paths.append(path)
        if path.is_file() and sha256_of(path) == expected:
            continue
        digest = hashlib.sha256()
        try:
            with atomic_path(path) as tmp:
                with urllib.request.urlopen(base + name, timeout=timeout) as response, open(tmp, "wb") as out:
                    total = response.headers.get("Content-Length")
                    with tqdm(
                        total=int(total) if total else None,
                        unit="B",
                        unit_scale=True,
                        desc=name,
                        disable=not progress,
                        leave=False,
                    ) as bar:
                        for chunk in iter(lambda: response.read(CHUNK), b""):
                            digest.update(chunk)
                            out.write(chunk)
                            bar.update(len(chunk))
                if digest.hexdigest() != expected:
                    raise DataError(
                        f"{dataset}: {name} from {base + name} has sha256 {digest.hexdigest()}, expected {expected}; "
                        "nothing was written"
                    )
        except (urllib.error.URLError, OSError) as exc:
            raise DataError(
                f"{dataset}: could not download {base + name} ({_reason(exc)}); check the network "
                "connection, or pass --url with a mirror (file:// works)"
            ) from None
    return paths


def _reason(exc: BaseException) -> str:
    """Why a download failed, in words: urllib's ``<urlopen error None>`` says nothing."""
    reason = getattr(exc, "reason", None)
    if isinstance(reason, BaseException):
        text = getattr(reason, "strerror", None) or str(reason)
        if text and text != "None":
            return text
        return type(reason).__name__
    if isinstance(reason, str) and reason and reason != "None":
        return reason
    text = getattr(exc, "strerror", None) or str(exc)
    if not text or "None" in text:
        return (
            "no connection could be made (offline?)" if isinstance(exc, urllib.error.URLError) else type(exc).__name__
        )
    return " ".join(text.split())
