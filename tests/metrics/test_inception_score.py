"""Inception Score on class probabilities with known scores."""

import numpy as np
import pytest
from scipy.stats import entropy

from ditcache.metrics.inception_score import inception_score


def test_every_sample_on_one_class_scores_one():
    probs = np.zeros((100, 10))
    probs[:, 3] = 1.0
    assert inception_score(probs)[0] == pytest.approx(1.0)


def test_uniform_predictions_score_one():
    assert inception_score(np.full((50, 7), 1 / 7), num_splits=5)[0] == pytest.approx(1.0)


def test_confident_and_balanced_scores_number_of_classes():
    classes = 10
    probs = np.tile(np.eye(classes), (20, 1))  # (200, 10); every split of 20 is balanced
    mean, std = inception_score(probs, num_splits=10)
    assert mean == pytest.approx(classes)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_matches_direct_formula_and_splits():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(5, 0.3), size=60)
    parts = np.split(probs, 3)
    direct = [np.exp(np.mean([entropy(p, part.mean(axis=0)) for p in part])) for part in parts]
    mean, std = inception_score(probs, num_splits=3)
    assert mean == pytest.approx(np.mean(direct))
    assert std == pytest.approx(np.std(direct))


def test_too_few_samples_for_splits_raise():
    with pytest.raises(ValueError):
        inception_score(np.full((5, 3), 1 / 3), num_splits=10)
