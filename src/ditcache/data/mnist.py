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
_IMAGES_MAGIC = 2051  # then count, rows, cols
_LABELS_MAGIC = 2049  # then count
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


def _read_idx(path: Path, magic: int, dims: int) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, uint8 data) of one gzipped IDX file, with its header checked against what it must be.

    A truncated download, a file that is not gzip, the image and label files swapped, or a body
    shorter than its header says are one-line ValueErrors naming the file.
    """
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:  # BadGzipFile is an OSError; a cut-off stream is an EOFError
        raise ValueError(f"{path} is not a complete gzip file ({err or type(err).__name__}); download it again")
    offset = 4 * (1 + dims)
    found_magic = int(np.frombuffer(data[:4], ">i4")[0]) if len(data) >= 4 else None
    if found_magic is not None and found_magic != magic:
        kinds = {_IMAGES_MAGIC: "an image file", _LABELS_MAGIC: "a label file"}
        found = kinds.get(found_magic, f"magic number {found_magic}")
        raise ValueError(f"{path} should be {kinds[magic]} but holds {found}: are the image and label files swapped?")
    if len(data) < offset:
        raise ValueError(f"{path} is too short for an IDX header ({len(data)} bytes); download it again")
    header = np.frombuffer(data[:offset], ">i4")
    shape = tuple(int(v) for v in header[1:])
    body = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {body.size} bytes of data, its header promises {int(np.prod(shape))} "
                         f"for shape {shape}; download it again")
    return shape, body.copy()  # writable


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
    shape, images = _read_idx(folder / IMAGES_FILE, _IMAGES_MAGIC, 3)
    if shape[1:] != (_SIDE, _SIDE):
        raise ValueError(f"{folder / IMAGES_FILE} holds {shape[1]}x{shape[2]} images, MNIST's are {_SIDE}x{_SIDE}")
    labels = _read_idx(folder / LABELS_FILE, _LABELS_MAGIC, 1)[1].astype(np.int64)  # (N,)
    images = images.reshape(shape)  # (N, 28, 28)
    if len(images) != len(labels):
        raise ValueError(f"MNIST files in {folder} disagree: {len(images)} images, {len(labels)} labels")
    return images, labels
