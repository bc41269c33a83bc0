"""The FID Inception extractor on a handful of tiny images (the network is slow on CPU)."""

import dataclasses

import numpy as np
import pytest

from ditcache.metrics.inception import PREPROCESSING, InceptionExtractor, preprocess


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
    other = dataclasses.replace(PREPROCESSING, antialias=True)
    assert other.key() != PREPROCESSING.key()


def test_rejects_float_and_bad_shapes(extractor):
    with pytest.raises(ValueError):
        extractor.features(np.zeros((2, 16, 16), np.float32))
    with pytest.raises(ValueError):
        extractor.features(np.zeros((2, 16, 16, 2), np.uint8))
