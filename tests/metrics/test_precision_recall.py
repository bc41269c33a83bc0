"""Improved precision/recall on point sets whose answers are known exactly."""

import numpy as np
import pytest

from ditcache.metrics.precision_recall import knn_radii, precision_recall


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


def test_radius_is_kth_neighbour_excluding_self():
    points = np.array([[0.0], [1.0], [3.0], [7.0], [15.0], [31.0]])
    # neighbours of 0: 1, 3, 7 -> 7; of 1: 1, 2, 6 -> 6; of 15: 8, 12, 14 -> 14
    radii = knn_radii(points, k=3).numpy()
    np.testing.assert_allclose(radii[[0, 1, 4]], [7.0, 6.0, 14.0], atol=1e-9)
    np.testing.assert_allclose(knn_radii(points, k=1).numpy()[:3], [1.0, 1.0, 2.0], atol=1e-9)


def test_partial_precision_on_a_line():
    # reference 0..9 (radius: 3rd neighbour), samples at 2.5 (inside) and 40 (outside) -> 1/2
    ref = np.arange(10.0)[:, None]
    samples = np.array([[2.5], [40.0], [41.0], [42.0], [43.0], [3.5], [4.5], [5.5]])
    precision, _ = precision_recall(ref, samples)
    assert precision == pytest.approx(4 / 8)


def test_blocks_do_not_change_the_answer():
    rng = np.random.default_rng(3)
    ref, samples = rng.normal(size=(37, 5)), rng.normal(size=(29, 5)) * 1.3 + 0.4
    assert precision_recall(ref, samples, block=4) == precision_recall(ref, samples, block=1024)


def test_too_few_points_raise():
    with pytest.raises(ValueError):
        knn_radii(np.zeros((3, 2)), k=3)
