"""Improved precision/recall: exact answers on point sets, and the ADM evaluator's float16 arithmetic
checked against a pair-by-pair brute force written here."""

import math

import numpy as np
import pytest

from ditcache.metrics import precision_recall as pr
from ditcache.metrics.precision_recall import half_distances, knn_radii, precision_recall


def test_identical_sets_give_full_precision_and_recall():
    x = np.random.default_rng(0).normal(size=(50, 4))
    assert precision_recall(x, x.copy()) == (1.0, 1.0)


def test_far_apart_clusters_give_zero():
    rng = np.random.default_rng(1)
    ref, samples = rng.normal(size=(40, 3)), rng.normal(size=(30, 3)) + 100.0
    assert precision_recall(ref, samples) == (0.0, 0.0)


def test_samples_covering_half_the_reference():
    # reference: two far-apart clusters of 20 points; samples: a copy of the first cluster only.
    # every sample sits on a reference point (precision 1); sample balls reach exactly cluster A.
    rng = np.random.default_rng(2)
    a = rng.normal(size=(20, 3))
    ref = np.concatenate([a, rng.normal(size=(20, 3)) + 50.0])
    precision, recall = precision_recall(ref, a.copy())
    assert precision == 1.0
    assert recall == 0.5


def test_radius_is_squared_kth_neighbour_counting_self_as_zeroth():
    points = np.array([[0.0], [1.0], [3.0], [7.0], [15.0], [31.0]])  # small integers: exact in float16
    # neighbours of 0: 1, 3, 7 -> 7^2; of 1: 1, 2, 6 -> 6^2; of 15: 8, 12, 14 -> 14^2
    radii = knn_radii(points, k=3).numpy()
    np.testing.assert_array_equal(radii[[0, 1, 4]], [49.0, 36.0, 196.0])
    np.testing.assert_array_equal(knn_radii(points, k=1).numpy()[:3], [1.0, 1.0, 4.0])


def test_partial_precision_on_a_line():
    # reference 0..9 (radius: 3rd neighbour), samples at 2.5 (inside) and 40 (outside) -> 1/2
    ref = np.arange(10.0)[:, None]
    samples = np.array([[2.5], [40.0], [41.0], [42.0], [43.0], [3.5], [4.5], [5.5]])
    precision, _ = precision_recall(ref, samples)
    assert precision == pytest.approx(4 / 8)


def test_too_few_points_and_mismatched_dimensions_raise():
    with pytest.raises(ValueError, match="more than k=3"):
        knn_radii(np.zeros((3, 2)), k=3)
    with pytest.raises(ValueError, match="dimension"):
        precision_recall(np.zeros((10, 2)), np.zeros((10, 3)))


# --- brute force: the evaluator's arithmetic, one pair at a time ------------------------------------

F16 = np.float16


def brute_distance(u: np.ndarray, v: np.ndarray, half: bool = True) -> np.float32:
    """One squared distance as the evaluator's DistanceBlock computes it on a GPU: inputs cast to
    float16; every square, the dot product and each norm a float16 value (sums accumulated wide,
    here exactly with fsum, then rounded to float32 and float16); (|u|^2 - 2 u.v) + |v|^2 in
    float16; negatives clamped to 0. half=False: the float32 fallback."""
    if not half:
        u, v = u.astype(np.float32), v.astype(np.float32)
        nu, nv, dot = np.float32(np.dot(u, u)), np.float32(np.dot(v, v)), np.float32(np.dot(u, v))
        return max(np.float32(nu - np.float32(2) * dot + nv), np.float32(0))
    u, v = u.astype(np.float32).astype(F16), v.astype(np.float32).astype(F16)
    to16 = lambda s: F16(np.float32(s))  # noqa: E731
    nu = to16(math.fsum(float(F16(np.float32(a) * np.float32(a))) for a in u))
    nv = to16(math.fsum(float(F16(np.float32(b) * np.float32(b))) for b in v))
    dot = to16(math.fsum(float(a) * float(b) for a, b in zip(u, v)))
    d = F16(F16(nu - F16(2) * dot) + nv)
    return np.float32(max(d, F16(0)))


def brute_precision_recall(ref: np.ndarray, smp: np.ndarray, k: int = 3, half: bool = True):
    """Radii: the (k+1)-th smallest distance in each row of the set against itself (self included);
    precision: samples within some reference radius (distance ref -> sample); recall: the reverse."""
    def radii(x):
        return [sorted(brute_distance(a, b, half) for b in x)[k] for a in x]

    r_ref, r_smp = radii(ref), radii(smp)
    d = [[brute_distance(a, b, half) for b in smp] for a in ref]  # (M, N), rows reference
    precision = np.mean([any(d[j][i] <= r_ref[j] for j in range(len(ref))) for i in range(len(smp))])
    recall = np.mean([any(d[j][i] <= r_smp[i] for i in range(len(smp))) for j in range(len(ref))])
    return float(precision), float(recall), np.array(r_ref, np.float32)


def clustered(seed: int, n: int, offset: float) -> np.ndarray:
    """Non-negative features around a far centre: |x|^2 ~ 1,600 where float16 steps are 1, while
    neighbour distances are ~10, so float16 rounding moves radii and decisions."""
    rng = np.random.default_rng(seed)
    return np.abs(10.0 + offset + rng.normal(scale=0.6, size=(n, 16)))


def test_float16_distances_match_the_brute_force_pair_by_pair():
    u, v = clustered(0, 9, 0.0), clustered(1, 7, 0.2)
    ours = half_distances(pr._as_float32(u, "cpu"), pr._as_float32(v, "cpu")).numpy()
    expected = np.array([[brute_distance(a, b) for b in v] for a in u])
    np.testing.assert_array_equal(ours, expected)  # same float16 operations: bit for bit


def test_precision_recall_reproduce_the_evaluator_arithmetic(monkeypatch):
    ref, smp = clustered(2, 40, 0.0), clustered(3, 30, 0.3)
    precision, recall, r_ref = brute_precision_recall(ref, smp)
    np.testing.assert_array_equal(knn_radii(ref).numpy(), r_ref)
    assert precision_recall(ref, smp) == (precision, recall)
    # float16 matters here: exact float64 distances give other numbers for the same points
    exact = precision_recall_float64(ref, smp)
    assert exact != (precision, recall)
    # row chunks and evaluator blocks smaller than the sets do not change the answer
    monkeypatch.setattr(pr, "EVAL_BLOCK", 11)
    monkeypatch.setattr(pr, "CHUNK", 4)
    assert precision_recall(ref, smp) == (precision, recall)
    assert precision_recall(ref, smp, reference_radii=r_ref) == (precision, recall)


def test_overflowing_float16_block_falls_back_to_float32():
    # |x|^2 ~ 16 * 70^2 = 78,400 > 65,504, the float16 maximum: every distance is inf in float16
    ref, smp = clustered(4, 12, 60.0), clustered(5, 10, 60.2)
    assert half_distances(pr._as_float32(ref, "cpu"), pr._as_float32(smp, "cpu")) is None
    precision, recall, _ = brute_precision_recall(ref, smp, half=False)
    assert precision_recall(ref, smp) == pytest.approx((precision, recall), abs=0)


def precision_recall_float64(ref: np.ndarray, smp: np.ndarray, k: int = 3):
    """Textbook improved precision/recall in float64 (for contrast)."""
    def sq(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    r_ref, r_smp = np.sort(sq(ref, ref), axis=1)[:, k], np.sort(sq(smp, smp), axis=1)[:, k]
    d = sq(ref, smp)  # (M, N)
    return float((d <= r_ref[:, None]).any(0).mean()), float((d <= r_smp[None, :]).any(1).mean())
