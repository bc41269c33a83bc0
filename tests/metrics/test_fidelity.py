"""PSNR, SSIM and absolute errors against hand values and an independent SSIM."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from ditcache.metrics.fidelity import fidelity, max_abs_error, mean_abs_error, psnr, ssim


def _images(seed, shape=(3, 24, 24)):
    rng = np.random.default_rng(seed)
    smooth = gaussian_filter(rng.uniform(0, 255, shape), sigma=(0, 2, 2) + (0,) * (len(shape) - 3))
    return np.clip(smooth * 3 - 255, 0, 255).astype(np.uint8)


def _ssim_reference(a, b, data_range=255.0):
    """Straightforward SSIM of one gray image pair with scipy's Gaussian filter, valid region only."""
    a, b = a.astype(np.float64), b.astype(np.float64)

    def blur(x):  # truncate 3.5 * sigma 1.5 -> radius 5 -> an 11-tap window
        return gaussian_filter(x, 1.5, truncate=3.5, mode="constant")[5:-5, 5:-5]

    mx, my = blur(a), blur(b)
    vx, vy, cxy = blur(a * a) - mx**2, blur(b * b) - my**2, blur(a * b) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return np.mean((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))


def test_psnr_identical_is_inf_and_known_mse():
    a = _images(0)
    assert psnr(a, a) == np.inf
    zeros, tens = np.zeros((2, 16, 16), np.uint8), np.full((2, 16, 16), 10, np.uint8)  # MSE 100
    assert psnr(zeros, tens) == pytest.approx(10 * np.log10(255**2 / 100))
    assert psnr(zeros, tens, per_image=True).shape == (2,)


def test_ssim_of_identical_images_is_one():
    a = _images(1)
    assert ssim(a, a) == pytest.approx(1.0)


def test_ssim_matches_independent_implementation():
    a = _images(2)
    b = np.clip(a.astype(int) + np.random.default_rng(3).integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    expected = [_ssim_reference(x, y) for x, y in zip(a, b)]
    np.testing.assert_allclose(ssim(a, b, per_image=True), expected, rtol=1e-10)
    assert ssim(a, b) == pytest.approx(np.mean(expected))
    assert ssim(a, b) < 0.95


def test_ssim_of_colour_images_averages_channels():
    a, b = _images(4, (2, 20, 20, 3)), _images(5, (2, 20, 20, 3))
    per_channel = [np.mean([_ssim_reference(x[..., c], y[..., c]) for c in range(3)]) for x, y in zip(a, b)]
    np.testing.assert_allclose(ssim(a, b, per_image=True), per_channel, rtol=1e-10)


def test_absolute_errors_and_summary():
    a = np.zeros((2, 12, 12), np.uint8)
    b = a.copy()
    b[0, 0, 0], b[1, 5, 5] = 200, 8
    assert max_abs_error(a, b) == 200.0
    assert mean_abs_error(a, b) == pytest.approx(208 / a.size)
    assert set(fidelity(a, b)) == {"psnr", "ssim", "max_abs_error", "mean_abs_error"}


def test_shape_mismatch_and_tiny_images_raise():
    with pytest.raises(ValueError):
        psnr(np.zeros((1, 8, 8)), np.zeros((1, 8, 9)))
    with pytest.raises(ValueError):
        ssim(np.zeros((1, 8, 8), np.uint8), np.zeros((1, 8, 8), np.uint8))
