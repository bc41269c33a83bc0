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


def test_evaluator_score_uses_consecutive_splits_of_5000():
    from ditcache.metrics.inception_score import evaluator_inception_score

    # logits 50 * one-hot: softmax puts all but ~e^-50 on one class, so a split's IS is the number of
    # classes it holds in equal shares. Splits: 5,000 cycling 10 classes (10), 5,000 of one class (1),
    # 2,000 cycling 4 classes (4): the evaluator's mean is 5; three equal splits would not give 5.
    classes = np.concatenate([np.arange(5000) % 10, np.full(5000, 3), np.arange(2000) % 4])
    pool = np.eye(16)[classes]  # (12000, 16): one "feature" per class
    weights = 50.0 * np.eye(16)  # (16, 16) logits matrix, no bias
    assert evaluator_inception_score(pool, weights) == pytest.approx(5.0, abs=1e-9)
    assert inception_score(np.eye(16)[classes], num_splits=3)[0] != pytest.approx(5.0, abs=0.1)


def test_logits_weights_are_read_and_checked(tmp_path):
    import torch

    from ditcache.metrics.inception_score import load_logits_weights

    w = np.random.default_rng(0).normal(size=(1008, 2048)).astype(np.float32)
    torch.save({"Mixed_7c.x": torch.zeros(1), "fc.weight": torch.from_numpy(w), "fc.bias": torch.zeros(1008)},
               tmp_path / "pt_inception.pth")
    np.testing.assert_array_equal(load_logits_weights(str(tmp_path / "pt_inception.pth")), w.T)  # (2048, 1008)
    np.save(tmp_path / "w.npy", w.T)
    np.testing.assert_array_equal(load_logits_weights(str(tmp_path / "w.npy")), w.T)
    np.save(tmp_path / "bad.npy", np.zeros((2048, 1000)))
    with pytest.raises(ValueError, match="1008"):
        load_logits_weights(str(tmp_path / "bad.npy"))
