"""Reference statistics for FID/sFID and reference features for precision/recall, cached on disk.

A reference is one of
- ``"mnist"``: the real MNIST test split (``ditcache.data.mnist``);
- an ``.npz`` of uint8 NHWC images under ``arr_0``; an ADM reference batch
  (``VIRTUAL_imagenet256_labeled.npz``) also carries ``mu``, ``sigma``, ``mu_s``, ``sigma_s``,
  which are used as they are (they came from the TF evaluator over all of ImageNet), while its
  images feed precision/recall;
- a folder of PNG images.

Statistics are computed once per (dataset, resolution, extractor preprocessing key, image limit)
and cached as ``.npz`` under ``$DITCACHE_CACHE`` (else ``~/.cache/ditcache``), never in the package.
The features behind them are computed in chunks of ``CHUNK`` images, each kept on disk as it
finishes, so an interrupted computation (the MNIST test split takes over an hour on two CPU
cores) resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ditcache.atomic import write_atomic
from ditcache.metrics.fid import features_to_stats

CACHE_ENV = "DITCACHE_CACHE"
PAIRS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}  # feature layer -> its statistics


@dataclass
class Reference:
    """What the metrics need from a reference set: Gaussian statistics and pool features."""

    name: str
    resolution: int
    mu: np.ndarray  # (2048,)
    sigma: np.ndarray  # (2048, 2048)
    mu_s: np.ndarray  # (2023,)
    sigma_s: np.ndarray  # (2023, 2023)
    pool: np.ndarray | None  # (M, 2048) features of the reference images; None without images
    pool_radii: np.ndarray | None  # (M,) float32 squared k-NN radii of ``pool`` for precision/recall
    num_images: int  # images in the reference set (M, or 0 when only statistics exist)
    precomputed: bool  # True when mu/sigma came from the file rather than from our extractor
    cache_path: Path


def default_cache_dir() -> Path:
    """``$DITCACHE_CACHE`` if set, else ``~/.cache/ditcache``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ditcache").expanduser()


def _open_png(path: Path) -> Image.Image:
    """An 8-bit gray or RGB image; palette and alpha images are converted to RGB."""
    im = Image.open(path)
    return im if im.mode in ("L", "RGB") else im.convert("RGB")


def read_png_folder(folder: str | os.PathLike) -> np.ndarray:
    """All ``*.png`` in a folder (sorted by name) as uint8 (N, H, W, C); gray files give C = 1.
    An alpha channel is dropped (the stored RGB values are kept)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.png"))
    if not files:
        raise ValueError(f"no .png images in {folder}")
    arrays = [np.asarray(_open_png(f)) for f in files]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"images in {folder} differ in shape: {sorted(shapes)}")
    images = np.stack(arrays)  # (N, H, W) or (N, H, W, C)
    if images.dtype != np.uint8:
        raise ValueError(f"images in {folder} must be 8-bit, got {images.dtype}")
    return images if images.ndim == 4 else images[..., None]


def load_npz_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an ``.npz``; a truncated, non-zip or pickled file is a one-line ValueError."""
    if Path(path).is_file() and not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a .npz: not a zip archive (truncated, or another kind of file)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        detail = " ".join(str(err).split())[:120] or type(err).__name__
        raise ValueError(f"{path} is not a readable .npz (truncated, not a zip archive, or holding pickled "
                         f"objects: {detail})") from None


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz``; ValueError when it holds neither images (arr_0) nor mu/sigma."""
    arrays = load_npz_arrays(path)
    if "arr_0" not in arrays and "mu" not in arrays:
        raise ValueError(f"{path} holds no images under 'arr_0' and no 'mu'/'sigma' (keys: {sorted(arrays)})")
    if "arr_0" in arrays:
        images = arrays["arr_0"]
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) == 0:
            raise ValueError(
                f"{path}: 'arr_0' must be uint8 (N, H, W[, C]) with N > 0, got {images.dtype} {images.shape}")
    return arrays


def _fingerprint(paths: list[Path]) -> str:
    """Short hash of file paths, sizes and modification times: a changed file gets a new cache key."""
    h = hashlib.sha1()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:10]


def _npz_image_shape(path: Path) -> tuple[int, ...] | None:
    """Shape of ``arr_0`` read from its .npy header, without loading the images."""
    with zipfile.ZipFile(path) as zf:
        if "arr_0.npy" not in zf.namelist():
            return None
        with zf.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            return reader(f)[0]


def _describe(spec: str) -> tuple[str, int, str]:
    """(name, resolution, kind) of a reference spec without reading its images."""
    if spec == "mnist":
        return "mnist", 28, "mnist"
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"reference {spec!r} is neither 'mnist' nor an existing .npz or folder")
    if path.is_dir():
        files = sorted(path.glob("*.png"))
        if not files:
            raise ValueError(f"no .png images in reference folder {path}")
        with Image.open(files[0]) as im:
            resolution = im.size[1]
        return f"{path.name}-{_fingerprint(files)}", resolution, "folder"
    if path.suffix != ".npz":
        raise ValueError(f"reference {path} must be an .npz file or a folder of PNGs")
    shape = _npz_image_shape(path)
    return f"{path.stem}-{_fingerprint([path])}", shape[1] if shape else 0, "npz"


def reference_image_shape(spec: str) -> tuple[int, int, int] | None:
    """(H, W, C) of a reference's images without reading them all; None when it holds only statistics."""
    if spec == "mnist":
        return (28, 28, 1)
    path = Path(spec).expanduser()
    _describe(spec)  # the existence and kind checks
    if path.is_dir():
        with _open_png(sorted(path.glob("*.png"))[0]) as im:
            return (im.size[1], im.size[0], len(im.getbands()))
    try:
        shape = _npz_image_shape(path)
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not a .npz: not a zip archive (truncated, or another kind of file)") from None
    if shape is None:
        return None
    return (shape[1], shape[2], shape[3] if len(shape) == 4 else 1)


def cache_file(spec: str, preprocessing_key: str, cache_dir: str | os.PathLike | None = None,
               limit: int | None = None) -> Path:
    """Where the statistics of ``spec`` under one extractor preprocessing are cached."""
    name, resolution, _ = _describe(spec)
    suffix = f"_first{limit}" if limit else ""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "reference" / f"{name}_{resolution}px_{preprocessing_key}{suffix}.npz"


def _save_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    write_atomic(path, lambda tmp: np.savez(tmp, **arrays))


CHUNK = 1000  # reference images per resumable chunk of features (~16 MB of float32 features)


def _chunked_features(images: np.ndarray, extractor, parts: Path, progress: bool) -> dict[str, np.ndarray]:
    """Inception features of ``images`` computed ``CHUNK`` at a time, each chunk written to ``parts``
    atomically as it finishes, so an interrupted computation resumes at the first missing chunk.

    Chunks hold float32, which loses nothing (the network computes in float32), so a resumed
    result is bit-identical to an uninterrupted one. ``parts`` is removed once the caller has
    cached the statistics.
    """
    from tqdm.auto import tqdm

    pools, spatials = [], []
    bar = tqdm(total=len(images), disable=not progress, desc="reference features", unit="img")
    for start in range(0, len(images), CHUNK):
        stop = min(start + CHUNK, len(images))
        path = parts / f"chunk_{start:07d}_{stop:07d}.npz"
        chunk = None
        if path.is_file():
            try:
                chunk = load_npz_arrays(path)
                if len(chunk["pool"]) != stop - start or len(chunk["spatial"]) != stop - start:
                    chunk = None
            except (ValueError, KeyError):
                chunk = None  # damaged outside our atomic write: recompute it
        if chunk is None:
            feats = extractor.features(images[start:stop])
            chunk = {k: feats[k].astype(np.float32) for k in ("pool", "spatial")}
            _save_atomic(path, chunk)
        pools.append(chunk["pool"])
        spatials.append(chunk["spatial"])
        bar.update(stop - start)
    bar.close()
    return {"pool": np.concatenate(pools).astype(np.float64), "spatial": np.concatenate(spatials).astype(np.float64)}


def _compute(spec: str, kind: str, extractor, limit: int | None, progress: bool,
             parts: Path) -> dict[str, np.ndarray]:
    """Read the reference images (and any precomputed statistics) and turn them into arrays to cache.

    A pair (``mu``, ``sigma``) or (``mu_s``, ``sigma_s``) stored in an .npz is kept as it is; a
    missing pair is computed from the images.
    """
    stats: dict[str, np.ndarray] = {}
    if kind == "mnist":
        from ditcache.data.mnist import load_mnist

        images = load_mnist()[0]
    elif kind == "folder":
        images = read_png_folder(spec)
    else:
        arrays = read_npz(Path(spec).expanduser())
        images = arrays.get("arr_0")
        for mu_key, sigma_key in PAIRS.values():
            if mu_key in arrays and sigma_key in arrays:
                stats[mu_key] = arrays[mu_key].astype(np.float64)
                stats[sigma_key] = arrays[sigma_key].astype(np.float64)
        stats["precomputed"] = np.array("mu" in stats)
    if images is not None and limit:
        images = images[:limit]
    if images is not None:
        if progress:
            print(f"computing reference features of {len(images)} images of {spec} once (kept under {parts.parent}; "
                  "an interruption resumes at the last finished chunk)", file=sys.stderr)
        feats = _chunked_features(images, extractor, parts, progress)
        # the network computes in float32, so storing float32 features loses nothing
        stats["pool"] = feats["pool"].astype(np.float32)  # (M, 2048)
        stats["pool_radii"] = _radii(stats["pool"])  # (M,), the costly half of precision/recall
        for layer, (mu_key, sigma_key) in PAIRS.items():
            if mu_key not in stats:
                stats[mu_key], stats[sigma_key] = features_to_stats(feats[layer])
    missing = [k for pair in PAIRS.values() for k in pair if k not in stats]
    if missing:
        raise ValueError(f"reference {spec} has no images under 'arr_0' and lacks {missing}")
    return stats


def _radii(pool: np.ndarray) -> np.ndarray:
    """Squared k-NN radii of reference features (M,), or an empty array when M <= k."""
    from ditcache.metrics.precision_recall import K, knn_radii

    return knn_radii(pool).numpy() if len(pool) > K else np.zeros(0, np.float32)


def get_reference(spec: str = "mnist", extractor=None, cache_dir: str | os.PathLike | None = None,
                  limit: int | None = None, progress: bool = True) -> Reference:
    """Reference statistics for ``spec``, read from the cache or computed once and cached.

    ``limit`` keeps only the first ``limit`` reference images (a quick look; part of the cache key);
    statistics stored in an ADM batch are used as they are, so there it limits precision/recall only.
    With ``progress``, computing a reference is announced on stderr and shows a bar (10,000 MNIST
    images take about 50 min of one idle CPU core; it happens once per key, resumably).
    """
    if extractor is None:
        from ditcache.metrics.inception import InceptionExtractor

        extractor = InceptionExtractor()
    name, resolution, kind = _describe(spec)
    path = cache_file(spec, extractor.preprocessing_key, cache_dir, limit)
    if not path.is_file():
        from ditcache.outdir import acquire, release

        parts = path.with_suffix(".parts")
        acquire(parts)  # one process computes a key; a second is refused (a dead one's lock is taken over)
        try:
            if not path.is_file():  # finished by the process that held the lock before us
                _save_atomic(path, _compute(spec, kind, extractor, limit, progress, parts))
            shutil.rmtree(parts, ignore_errors=True)
        finally:
            release(parts)
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    if "pool" in arrays and "pool_radii" not in arrays:  # cached before radii were kept
        arrays["pool_radii"] = _radii(arrays["pool"])
        _save_atomic(path, arrays)
    pool = arrays["pool"].astype(np.float64) if "pool" in arrays else None
    return Reference(
        name=name, resolution=resolution,
        mu=arrays["mu"], sigma=arrays["sigma"], mu_s=arrays["mu_s"], sigma_s=arrays["sigma_s"],
        pool=pool, pool_radii=arrays.get("pool_radii"), num_images=0 if pool is None else len(pool),
        precomputed=bool(arrays.get("precomputed", False)), cache_path=path,
    )
