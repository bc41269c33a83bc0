"""The MNIST test split loader: real counts, IDX decoding, checksums and a helpful missing-file error."""

import gzip
import hashlib

import numpy as np
import pytest

from ditcache.data import mnist
from ditcache.data.mnist import load_mnist


def _write_idx(folder, images, labels, sums=None):
    """A tiny IDX pair in MNIST's layout (headers of 16 and 8 bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    header_i = np.array([2051, len(images), 28, 28], ">i4").tobytes()
    header_l = np.array([2049, len(labels)], ">i4").tobytes()
    (folder / mnist.IMAGES_FILE).write_bytes(gzip.compress(header_i + images.tobytes()))
    (folder / mnist.LABELS_FILE).write_bytes(gzip.compress(header_l + labels.astype(np.uint8).tobytes()))
    if sums is not None:
        (folder / mnist.SUMS_FILE).write_text(sums)


def test_real_split_has_the_readme_counts():
    images, labels = load_mnist()
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert np.bincount(labels, minlength=10).tolist() == counts
    assert images.max() == 255 and 0.1 < images.mean() / 255 < 0.2  # dark background, white strokes


def test_decodes_a_synthetic_idx_pair(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path, images, np.array([7, 0, 9]))
    got, labels = load_mnist(tmp_path)
    np.testing.assert_array_equal(got, images)
    assert labels.tolist() == [7, 0, 9]


def test_checksum_mismatch_raises(tmp_path):
    images = np.zeros((1, 28, 28), np.uint8)
    _write_idx(tmp_path, images, np.array([1]), sums=f"{'0' * 64}  {mnist.IMAGES_FILE}\n")
    with pytest.raises(ValueError, match="SHA-256"):
        load_mnist(tmp_path)
    good = hashlib.sha256((tmp_path / mnist.IMAGES_FILE).read_bytes()).hexdigest()
    (tmp_path / mnist.SUMS_FILE).write_text(f"{good}  {mnist.IMAGES_FILE}\n")
    assert load_mnist(tmp_path)[0].shape == (1, 28, 28)


def test_missing_folder_says_where_files_go(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="DITCACHE_MNIST") as err:
        load_mnist(tmp_path / "absent")
    assert "t10k-images-idx3-ubyte.gz" in str(err.value)
    monkeypatch.setenv("DITCACHE_MNIST", str(tmp_path / "elsewhere"))
    assert mnist.default_mnist_dir() == tmp_path / "elsewhere"
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        load_mnist()


def test_truncated_swapped_and_short_files_are_one_line_errors(tmp_path):
    images = np.zeros((3, 28, 28), np.uint8)
    _write_idx(tmp_path / "ok", images, np.arange(3))
    ok = tmp_path / "ok"
    bad = tmp_path / "bad"
    bad.mkdir()
    # truncated download: the gzip stream ends early
    (bad / mnist.LABELS_FILE).write_bytes((ok / mnist.LABELS_FILE).read_bytes())
    (bad / mnist.IMAGES_FILE).write_bytes((ok / mnist.IMAGES_FILE).read_bytes()[:30])
    with pytest.raises(ValueError, match="is not a complete gzip file .*; download it again"):
        load_mnist(bad)
    # image and label files swapped
    (bad / mnist.IMAGES_FILE).write_bytes((ok / mnist.LABELS_FILE).read_bytes())
    (bad / mnist.LABELS_FILE).write_bytes((ok / mnist.IMAGES_FILE).read_bytes())
    with pytest.raises(ValueError, match="should be an image file but holds a label file: are the image and label "
                                         "files swapped"):
        load_mnist(bad)
    # a complete gzip whose body is shorter than its header says
    header = np.array([2051, 3, 28, 28], ">i4").tobytes()
    (bad / mnist.IMAGES_FILE).write_bytes(gzip.compress(header + images.tobytes()[:100]))
    (bad / mnist.LABELS_FILE).write_bytes((ok / mnist.LABELS_FILE).read_bytes())
    with pytest.raises(ValueError, match="holds 100 bytes of data, its header promises 2352"):
        load_mnist(bad)
