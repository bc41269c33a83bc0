"""The real MNIST test split (LeCun, Cortes & Burges), read from its original IDX gzip files.

The files are never part of the package: they are read from a folder that holds
``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz`` (and optionally ``SHA256SUMS``).
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np

from .shared import shared_path

ENV_VAR = "DITCACHE_MNIST"
IMAGES_FILE = "t10k-images-idx3-ubyte.gz"
LABELS_FILE = "t10k-labels-idx1-ubyte.gz"
SUMS_FILE = "SHA256SUMS"

# the IDX headers: magic number and dimensions, big-endian int32 each
_IMAGES_OFFSET = 16  # magic, count, rows, cols
_LABELS_OFFSET = 8  # magic, count
_SIDE = 28

# where CI keeps the data, inside the shared folder (see data/shared.py)
_SHARED_RELATIVE = Path("data") / "mnist"


def _has_files(folder: Path) -> bool:
    return (folder / IMAGES_FILE).is_file() and (folder / LABELS_FILE).is_file()


def default_mnist_dir() -> Path:
    """Return the folder that holds the MNIST test split.

    Resolution order: ``$DITCACHE_MNIST``; then ``data/mnist`` in the shared folder
    (``$DITCACHE_SHARED``, ``../shared`` relative to the current directory, or a ``shared`` folder
    beside any folder above this file). The first existing candidate wins; if none exists, the
    environment variable's value (or the first shared candidate) is returned so that the loader's
    error names it.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return shared_path(_SHARED_RELATIVE, _has_files)


def _check_sums(folder: Path) -> None:
    """Compare each listed file against ``SHA256SUMS`` when that file exists."""
    sums = folder / SUMS_FILE
    if not sums.is_file():
        return
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        expected, name = line.split()
        name = name.lstrip("*")
        if name not in (IMAGES_FILE, LABELS_FILE):
            continue
        digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        if digest != expected.lower():
            raise ValueError(f"MNIST file {folder / name} does not match its SHA-256 in {sums}")


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    return np.frombuffer(data, dtype=np.uint8, offset=offset).copy()  # writable


def load_mnist(root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load the 10,000-image MNIST test split.

    Returns ``(images, labels)``: uint8 of shape (N, 28, 28) and int64 of shape (N,).
    Raises FileNotFoundError (naming the folder and ``$DITCACHE_MNIST``) when the files are missing.
    """
    folder = Path(root).expanduser() if root is not None else default_mnist_dir()
    if not _has_files(folder):
        raise FileNotFoundError(
            f"MNIST test split not found in {folder}: put {IMAGES_FILE} and {LABELS_FILE} there "
            f"or set ${ENV_VAR} to the folder that holds them"
        )
    _check_sums(folder)
    images = _read_idx(folder / IMAGES_FILE, _IMAGES_OFFSET)
    labels = _read_idx(folder / LABELS_FILE, _LABELS_OFFSET).astype(np.int64)  # (N,)
    images = images.reshape(-1, _SIDE, _SIDE)  # (N, 28, 28)
    if len(images) != len(labels):
        raise ValueError(f"MNIST files in {folder} disagree: {len(images)} images, {len(labels)} labels")
    return images, labels
