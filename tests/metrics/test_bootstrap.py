"""Bootstrap intervals: each replicate is the FID (or PSNR) of an explicit resample, intervals behave as stated."""

import numpy as np
import pytest

from ditcache.metrics.bootstrap import (FIDBootstrap, centred_interval, draw_counts, paired_difference, psnr_interval,
                                       psnr_replicates)
from ditcache.metrics.fid import features_to_stats, frechet_distance
from ditcache.metrics.fidelity import psnr, squared_error


def gaussian_set(seed: int, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.gamma(2.0, 0.2, (n, d)) + shift


@pytest.mark.parametrize("n, d", [(30, 48), (60, 8)])  # the n <= D kernel path and the D x D path
def test_replicate_is_the_fid_of_the_resample(n, d):
    ref = gaussian_set(0, 400, d)
    feats = gaussian_set(1, n, d, shift=0.05)
    boot = FIDBootstrap(*features_to_stats(ref), replicates=3)
    for counts in draw_counts(n, 3):
        resample = np.repeat(feats, counts, axis=0)  # the drawn rows, duplicates included
        expected = frechet_distance(*features_to_stats(resample), boot.mu, boot.sigma)
        # 1e-6 relative: the kernel path takes the trace term from an n x n eigenproblem instead of
        # the D x D one, which differ by float64 round-off amplified by near-zero eigenvalues
        assert boot.replicate(feats, counts) == pytest.approx(expected, rel=1e-6)


def test_draws_are_reproducible_and_paired():
    a = [c.copy() for c in draw_counts(20, 4, seed=7)]
    b = list(draw_counts(20, 4, seed=7))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert all(c.sum() == 20 for c in a)


def test_interval_is_the_replicate_spread_around_the_estimate():
    reps = np.arange(1001, dtype=float) ** 2 / 1000  # skewed; quantiles 2.5% -> 0.625, 97.5% -> 950.625
    iv = centred_interval(100.0, reps)
    mean = reps.mean()
    assert (iv.low, iv.high) == pytest.approx((100.0 + 0.625 - mean, 100.0 + 950.625 - mean))
    assert iv.low < 100.0 < iv.high and iv.excludes_zero is False
    assert centred_interval(2000.0, reps).excludes_zero


def test_paired_difference_sees_what_unpaired_noise_hides():
    # b is a with a small constant shift: sample i of both comes from the same "noise"
    ref = gaussian_set(2, 2000, 6)
    a = gaussian_set(3, 200, 6)
    b = a + 0.005
    boot = FIDBootstrap(*features_to_stats(ref), replicates=200)
    fid_a, reps_a = boot.interval(a)
    fid_b, reps_b = boot.interval(b)
    diff = paired_difference(fid_b.value, reps_b, fid_a.value, reps_a)
    assert diff.value == pytest.approx(fid_b.value - fid_a.value)
    assert diff.excludes_zero  # the shift is detected ...
    assert fid_a.low < fid_b.value < fid_a.high  # ... although b's FID lies inside a's interval
    assert fid_a.low < fid_a.value < fid_a.high
    same = paired_difference(fid_a.value, reps_a, fid_a.value, reps_a)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero
    with pytest.raises(ValueError, match="paired"):
        paired_difference(1.0, reps_a, 1.0, reps_b[:10])


def image_pair(seed: int, n: int = 40, noise: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """(cached, uncached) uint8-range images (N, 8, 8) differing by per-image noise of varying size."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 8, 8)).astype(np.float64)
    scale = noise * rng.uniform(0.2, 2.0, (n, 1, 1))
    return np.clip(base + scale * rng.standard_normal(base.shape), 0, 255), base


def test_psnr_replicate_is_the_psnr_of_the_resample():
    cached, base = image_pair(4)
    reps = psnr_replicates(squared_error(cached, base), replicates=3, seed=5)
    for r, counts in zip(reps, draw_counts(len(base), 3, seed=5)):
        idx = np.repeat(np.arange(len(base)), counts)  # the drawn images, duplicates included
        assert r == pytest.approx(psnr(cached[idx], base[idx]))  # fidelity.psnr: PSNR of the pooled MSE


def test_psnr_interval_is_deterministic_and_contains_the_estimate():
    cached, base = image_pair(6)
    mse = squared_error(cached, base)
    iv, reps = psnr_interval(mse, replicates=300, seed=1)
    again, reps_again = psnr_interval(mse, replicates=300, seed=1)
    assert iv == again and np.array_equal(reps, reps_again)
    assert iv.value == pytest.approx(psnr(cached, base))
    assert iv.low < iv.value < iv.high
    assert psnr_interval(mse, replicates=300, seed=2)[0] != iv  # the seed is what fixes it


def test_paired_psnr_difference_of_a_configuration_with_itself_is_exactly_zero():
    cached, base = image_pair(7)
    iv, reps = psnr_interval(squared_error(cached, base), replicates=200)
    same = paired_difference(iv.value, reps, iv.value, reps)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero


def test_paired_psnr_difference_finds_a_small_consistent_gain():
    # b is a with 10% less error on every image: its PSNR sits inside a's interval, the paired gain does not
    cached, base = image_pair(8, n=60)
    better = base + 0.9 * (cached - base)
    a, reps_a = psnr_interval(squared_error(cached, base), replicates=300)
    b, reps_b = psnr_interval(squared_error(better, base), replicates=300)
    diff = paired_difference(b.value, reps_b, a.value, reps_a)
    assert diff.value == pytest.approx(-20 * np.log10(0.9)) and diff.excludes_zero
    assert a.low < b.value < a.high


def test_identical_images_give_an_infinite_psnr_without_nan():
    _, base = image_pair(9)
    iv, reps = psnr_interval(squared_error(base, base), replicates=50)
    assert (iv.value, iv.low, iv.high) == (np.inf, np.inf, np.inf)
    diff = paired_difference(iv.value, reps, iv.value, reps)
    assert (diff.value, diff.low, diff.high) == (0.0, 0.0, 0.0)
