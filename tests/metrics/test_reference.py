"""Reference statistics: computed once, cached under a key that names the preprocessing, reused."""

import numpy as np
import pytest
from PIL import Image

from ditcache.metrics.precision_recall import knn_radii
from ditcache.metrics.reference import cache_file, default_cache_dir, get_reference


class CountingExtractor:
    """Stands in for Inception: flattened pixels as 'pool', their first 5 values as 'spatial'."""

    def __init__(self, key="stub-a"):
        self.preprocessing_key = key
        self.calls = 0

    def features(self, images, progress=False):
        self.calls += 1
        flat = np.asarray(images, np.float64).reshape(len(images), -1)
        return {"pool": flat, "spatial": flat[:, :5]}


@pytest.fixture
def png_folder(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def test_cache_is_written_once_then_reused(png_folder, tmp_path, capsys):
    cache, stub = tmp_path / "cache", CountingExtractor()
    first = get_reference(str(png_folder), stub, cache_dir=cache)
    assert stub.calls == 1 and first.cache_path.is_file()
    assert "computing" in capsys.readouterr().err  # a one-time cost is announced, with the cache path
    np.testing.assert_array_equal(first.pool_radii, knn_radii(first.pool).numpy())  # kept for precision/recall
    assert first.cache_path.is_relative_to(cache)
    assert first.num_images == 12 and first.resolution == 6 and not first.precomputed
    second = get_reference(str(png_folder), stub, cache_dir=cache)
    assert stub.calls == 1  # read from the cache, not recomputed
    np.testing.assert_array_equal(first.sigma, second.sigma)
    assert first.pool.shape == (12, 6 * 6 * 3) and first.sigma_s.shape == (5, 5)


def test_key_includes_preprocessing_and_limit(png_folder, tmp_path):
    a, b = CountingExtractor("stub-a"), CountingExtractor("stub-b")
    ref_a = get_reference(str(png_folder), a, cache_dir=tmp_path)
    ref_b = get_reference(str(png_folder), b, cache_dir=tmp_path)
    assert b.calls == 1 and ref_a.cache_path != ref_b.cache_path
    assert "stub-b" in ref_b.cache_path.name and "6px" in ref_b.cache_path.name
    limited = get_reference(str(png_folder), a, cache_dir=tmp_path, limit=5)
    assert limited.num_images == 5 and limited.cache_path == cache_file(str(png_folder), "stub-a", tmp_path, 5)


def test_adm_batch_uses_precomputed_statistics(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
    mu, sigma = rng.normal(size=48), np.eye(48) * 2.0
    path = tmp_path / "VIRTUAL_tiny_labeled.npz"
    np.savez(path, arr_0=images, mu=mu, sigma=sigma, mu_s=mu[:5], sigma_s=np.eye(5))
    ref = get_reference(str(path), CountingExtractor(), cache_dir=tmp_path / "cache")
    assert ref.precomputed and ref.num_images == 8 and ref.resolution == 4
    np.testing.assert_array_equal(ref.mu, mu)  # as stored, not recomputed from arr_0
    np.testing.assert_array_equal(ref.pool, images.reshape(8, -1))


def test_partial_or_statistics_only_batches(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "pool_only.npz", arr_0=images, mu=np.ones(48), sigma=np.eye(48))
    ref = get_reference(str(tmp_path / "pool_only.npz"), CountingExtractor(), cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(ref.mu, np.ones(48))  # stored pair kept
    np.testing.assert_allclose(ref.mu_s, images.reshape(6, -1)[:, :5].mean(axis=0))  # missing pair computed
    np.savez(tmp_path / "stats_only.npz", mu=np.ones(3), sigma=np.eye(3), mu_s=np.ones(2), sigma_s=np.eye(2))
    ref = get_reference(str(tmp_path / "stats_only.npz"), CountingExtractor(), cache_dir=tmp_path / "c")
    assert ref.pool is None and ref.num_images == 0 and ref.precomputed


def test_mnist_reference_reads_the_test_split(tmp_path):
    ref = get_reference("mnist", CountingExtractor(), cache_dir=tmp_path, limit=20)
    assert ref.name == "mnist" and ref.resolution == 28 and ref.num_images == 20


def test_bad_references_raise(tmp_path):
    with pytest.raises(FileNotFoundError):
        get_reference(str(tmp_path / "nope.npz"), CountingExtractor(), cache_dir=tmp_path)
    np.savez(tmp_path / "wrong.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="arr_0"):
        get_reference(str(tmp_path / "wrong.npz"), CountingExtractor(), cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="png"):
        get_reference(str(tmp_path / "empty"), CountingExtractor(), cache_dir=tmp_path)


def test_cache_dir_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DITCACHE_CACHE", str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"
    monkeypatch.delenv("DITCACHE_CACHE")
    assert default_cache_dir().name == "ditcache"


class InterruptedExtractor(CountingExtractor):
    """Like CountingExtractor, but Ctrl-C arrives during call number ``stop_at``."""

    def __init__(self, stop_at):
        super().__init__()
        self.stop_at = stop_at

    def features(self, images, progress=False):
        if self.calls + 1 == self.stop_at:
            raise KeyboardInterrupt
        return super().features(images, progress)


def test_an_interrupted_computation_resumes_at_its_last_chunk(png_folder, tmp_path, monkeypatch):
    from ditcache.metrics import reference

    monkeypatch.setattr(reference, "CHUNK", 5)  # 12 images: chunks of 5, 5 and 2
    whole = get_reference(str(png_folder), CountingExtractor(), cache_dir=tmp_path / "a")
    stub = InterruptedExtractor(stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        get_reference(str(png_folder), stub, cache_dir=tmp_path / "b")
    parts = cache_file(str(png_folder), "stub-a", tmp_path / "b").with_suffix(".parts")
    assert len(list(parts.glob("chunk_*.npz"))) == 2  # the two finished chunks are kept
    resumed_stub = CountingExtractor()
    resumed = get_reference(str(png_folder), resumed_stub, cache_dir=tmp_path / "b")
    assert resumed_stub.calls == 1  # only the last chunk was computed again
    assert not parts.exists()
    for field in ("mu", "sigma", "mu_s", "sigma_s", "pool"):
        assert np.array_equal(getattr(whole, field), getattr(resumed, field))


def test_a_reference_being_computed_by_another_process_is_refused(png_folder, tmp_path):
    import json
    import os
    import socket

    from ditcache.outdir import FolderInUse, lock_path

    parts = cache_file(str(png_folder), "stub-a", tmp_path / "c").with_suffix(".parts")
    lock_path(parts).parent.mkdir(parents=True)
    lock_path(parts).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(FolderInUse, match="is in use by pid"):
        get_reference(str(png_folder), CountingExtractor(), cache_dir=tmp_path / "c")
    lock_path(parts).unlink()
    assert get_reference(str(png_folder), CountingExtractor(), cache_dir=tmp_path / "c").num_images == 12
    assert not lock_path(parts).exists()
