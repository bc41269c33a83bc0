"""Fréchet distance against closed forms and an independent symmetric formula."""

import numpy as np
import pytest

from ditcache.metrics.fid import METHODS, features_to_stats, frechet_distance


@pytest.mark.parametrize("method", METHODS)
def test_diagonal_gaussians_match_closed_form(method):
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    # for diagonal covariances sqrtm(S1 S2) = diag(sqrt(v1 v2))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2), method=method) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_one_dimensional_case(method):
    # N(0, 4) vs N(3, 1): 3^2 + (2 - 1)^2 = 10
    assert frechet_distance([0.0], [[4.0]], [3.0], [[1.0]], method=method) == pytest.approx(10.0)


def test_identical_statistics_give_zero():
    feats = np.random.default_rng(1).normal(size=(200, 8))
    mu, sigma = features_to_stats(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_features_to_stats_is_mean_and_unbiased_covariance():
    feats = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]])
    mu, sigma = features_to_stats(feats)
    centred = feats - feats.mean(axis=0)
    np.testing.assert_allclose(mu, [2.0, 2.0])
    np.testing.assert_allclose(sigma, centred.T @ centred / 2)


def test_singular_covariances_stay_finite_and_close_to_symmetric_formula():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(5, 20)), rng.normal(size=(6, 20))  # fewer samples than dimensions
    (mu1, s1), (mu2, s2) = features_to_stats(a), features_to_stats(b)
    # tr sqrt(S1 S2) = sum of sqrt(eig(R S2 R)) with R = S1^(1/2), a symmetric PSD route
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    d = frechet_distance(mu1, s1, mu2, s2, method="sqrtm")  # scipy sqrtm, with its ridge retry
    assert np.isfinite(d)
    assert d == pytest.approx(expected, rel=1e-4)


def test_eigh_route_matches_scipy_sqrtm_on_full_rank_covariances():
    # scipy.linalg.sqrtm of the non-symmetric product is the independent reference here; on
    # well-conditioned covariances both are exact up to float64 round-off
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(400, 64)), rng.normal(size=(300, 64)) @ rng.normal(size=(64, 64)) * 0.3
    (mu1, s1), (mu2, s2) = features_to_stats(a), features_to_stats(b)
    expected = frechet_distance(mu1, s1, mu2, s2, method="sqrtm")
    assert frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(expected, rel=1e-9)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="method"):
        frechet_distance([0.0], [[1.0]], [0.0], [[1.0]], method="svd")


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError):
        features_to_stats(np.zeros((1, 3)))
