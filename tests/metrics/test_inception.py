"""The FID Inception extractor on a handful of tiny images (the network is slow on CPU)."""

import dataclasses

import numpy as np
import pytest
import torch

from ditcache.metrics.inception import PREPROCESSING, SPATIAL_CHANNELS, InceptionExtractor, preprocess


@pytest.fixture(scope="module")
def extractor():
    return InceptionExtractor(batch_size=2)


@pytest.fixture(scope="module")
def gray():
    return np.random.default_rng(0).integers(0, 256, size=(3, 16, 16), dtype=np.uint8)


def test_feature_shapes_and_batching(extractor, gray):
    feats = extractor.features(gray)  # three images in batches of two
    assert feats["pool"].shape == (3, 2048) and feats["spatial"].shape == (3, 2023)
    assert feats["pool"].dtype == np.float64
    assert np.all(feats["pool"] >= 0)  # pool_3 follows a ReLU
    single = extractor.features(gray[2:])
    np.testing.assert_allclose(single["pool"], feats["pool"][2:], rtol=1e-4, atol=1e-5)


def test_grayscale_is_repeated_to_rgb(extractor, gray):
    from_gray = extractor.features(gray[:2])
    from_rgb = extractor.features(np.repeat(gray[:2, ..., None], 3, axis=-1))
    from_one_channel = extractor.features(gray[:2, ..., None])
    np.testing.assert_array_equal(from_gray["pool"], from_rgb["pool"])
    np.testing.assert_array_equal(from_gray["spatial"], from_one_channel["spatial"])


def test_pool_matches_the_scripted_network(extractor, gray):
    x = preprocess(gray[:2])
    assert x.shape == (2, 3, 299, 299)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 255 / 128 - 1
    expected = extractor.net(x).double().numpy()
    np.testing.assert_allclose(extractor.features(gray[:2])["pool"], expected, rtol=1e-5, atol=1e-6)


def test_preprocessing_is_in_the_key(extractor):
    assert PREPROCESSING.key() in extractor.preprocessing_key
    other = dataclasses.replace(PREPROCESSING, size=224)
    assert other.key() != PREPROCESSING.key()
    with pytest.raises(ValueError, match="resize"):
        preprocess(np.zeros((1, 8, 8), np.uint8), dataclasses.replace(PREPROCESSING, resize="torch-bilinear"))


def test_rejects_float_and_bad_shapes(extractor):
    with pytest.raises(ValueError):
        extractor.features(np.zeros((2, 16, 16), np.float32))
    with pytest.raises(ValueError):
        extractor.features(np.zeros((2, 16, 16, 2), np.uint8))


# --- the ADM evaluator's preprocessing, written here independently from TF1's kernel -----------------

def tf1_resize_bilinear(image: np.ndarray, out: int) -> np.ndarray:
    """TF1 ResizeBilinear (align_corners=False, no half-pixel centres) of (H, W, C), in the float32
    arithmetic of TF's kernel: source position i * float32(in / out), lower = floor, upper =
    min(ceil, in - 1), then lerp along x and along y."""

    def taps(n: int):
        src = np.arange(out, dtype=np.float32) * np.float32(n / out)
        lower = np.floor(src)
        upper = np.minimum(np.ceil(src), n - 1)
        return lower.astype(int), upper.astype(int), (src - lower).astype(np.float32)

    img = image.astype(np.float32)
    y0, y1, fy = taps(img.shape[0])
    x0, x1, fx = taps(img.shape[1])
    fx, fy = fx[None, :, None], fy[:, None, None]
    top = img[y0][:, x0] + (img[y0][:, x1] - img[y0][:, x0]) * fx
    bottom = img[y1][:, x0] + (img[y1][:, x1] - img[y1][:, x0]) * fx
    return top + (bottom - top) * fy  # (out, out, C)


def reference_features(extractor, images: np.ndarray):
    """pool_3 from the scripted network's own forward; mixed_6/conv's first 7 channels read off
    mixed_6's output (its 1x1 branch comes first in the concat), flattened HWC as TF does."""
    x = np.stack([im.astype(np.float32) if im.shape[0] == 299 else tf1_resize_bilinear(im, 299) for im in images])
    x = torch.from_numpy(x).permute(0, 3, 1, 2) / 128.0 - 1.0  # (N, 3, 299, 299), the graph's (x - 128) / 128
    with torch.inference_mode():
        pool = extractor.net(x).reshape(len(x), -1)  # (N, 2048)
        h = x
        for name, layer in extractor.layers.named_children():
            h = layer(h)
            if name == "mixed_6":
                break
        spatial = h[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(x), -1)  # (N, 2023)
    return pool.double().numpy(), spatial.double().numpy()


def relative_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)).max())


@pytest.mark.parametrize("side", [28, 256, 299])
def test_features_match_the_evaluator_preprocessing(extractor, side):
    """Our pool and spatial features against the TF1 resize + (x - 128) / 128 path, one image each.

    Tolerance 1e-4 relative L2: the emulated resize differs from TF's kernel by float32 rounding of
    the sample positions (at most 0.007 of 255 measured), which moved features by at most 3e-5 on
    noise images; the half-pixel torch resize this replaced moved them by ~1e-2 at 256 and ~0.16 at
    28, so a regression fails by two orders of magnitude. At 299 nothing is resampled: exact.
    """
    rng = np.random.default_rng(side)
    if side == 28:
        from ditcache.data.mnist import load_mnist

        images = np.repeat(load_mnist()[0][:1, ..., None], 3, axis=-1)  # a real digit, (1, 28, 28, 3)
    else:
        images = rng.integers(0, 256, (1, side, side, 3), dtype=np.uint8)  # noise: the hardest case
    ours = extractor.features(images)
    pool, spatial = reference_features(extractor, images)
    if side == 299:
        np.testing.assert_array_equal(ours["pool"], pool)
        np.testing.assert_array_equal(ours["spatial"], spatial)
    else:
        assert relative_l2(ours["pool"], pool) < 1e-4
        assert relative_l2(ours["spatial"], spatial) < 1e-4


def test_resize_is_tf1_legacy_bilinear():
    """The emulation against the TF kernel on raw pixels: within 0.01 of 255 (float32 positions)."""
    image = np.random.default_rng(5).integers(0, 256, (1, 28, 28, 3), dtype=np.uint8)
    ours = ((preprocess(image)[0].permute(1, 2, 0).numpy() + 1.0) * 128.0).astype(np.float64)
    expected = tf1_resize_bilinear(image[0], 299)
    assert np.abs(ours - expected).max() < 0.01
    # TF samples output pixel (0, 0) at input (0, 0) exactly; half-pixel centres would blend it
    np.testing.assert_allclose(ours[0, 0], image[0, 0, 0], atol=1e-3)
