"""The shipped MNIST digit classifier: loads, is small, and beats 98% on the held-out split."""

import numpy as np
import pytest
import torch

from ditcache.data.mnist import load_mnist
from ditcache.metrics.classifier import (WEIGHTS, DigitClassifier, accuracy, classifier_probs, load_classifier,
                                         split_indices, to_input, train_classifier)


@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


def test_shipped_weights_beat_98_percent_on_held_out(mnist):
    images, labels = mnist
    _, held = split_indices(len(images))
    assert len(held) == 1000
    assert accuracy(images[held], labels[held], load_classifier()) > 0.98


def test_weights_are_small_and_match_the_architecture():
    assert WEIGHTS.stat().st_size < 1_000_000
    n_params = sum(p.numel() for p in DigitClassifier().parameters())
    assert n_params * 4 < 1_000_000


def test_split_is_fixed_and_disjoint():
    train, held = split_indices(10000, seed=0)
    assert len(train) == 9000 and len(np.intersect1d(train, held)) == 0
    np.testing.assert_array_equal(held, split_indices(10000, seed=0)[1])


def test_probs_are_distributions_and_rgb_is_accepted(mnist):
    images = mnist[0][:6]
    probs = classifier_probs(images)
    assert probs.shape == (6, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    rgb = np.repeat(images[..., None], 3, axis=-1)
    np.testing.assert_allclose(classifier_probs(rgb), probs, atol=1e-6)
    assert to_input(np.zeros((1, 32, 32), np.uint8)).shape == (1, 1, 28, 28)


def test_training_is_deterministic(mnist):
    images, labels = mnist[0][:128], mnist[1][:128]
    a = train_classifier(images, labels, epochs=1, seed=3).state_dict()
    b = train_classifier(images, labels, epochs=1, seed=3).state_dict()
    c = train_classifier(images, labels, epochs=1, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
