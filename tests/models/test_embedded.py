"""The embedded default model loads by name and draws digits of the requested class."""

import numpy as np

from ditcache.metrics.classifier import accuracy
from ditcache.models.loading import load_model
from ditcache.sampling.generate import SampleConfig, generate

# measured 0.975 on 200 samples (src/ditcache/assets/mnist_dit.md); here 100 samples. The bound sits
# well below the measured figure so that seed-to-seed variation (binomial sd ~2% at 100 samples and
# p = 0.95) cannot fail it, while a broken model, sampler or guidance (chance level: 10%), or a
# return to the under-trained weights of the first release (0.57), always does.
MIN_ACCURACY = 0.85


def test_default_model_is_a_pixel_mnist_dit():
    m = load_model("mnist")
    assert (m.name, m.family, m.image_size, m.latent_size, m.in_channels) == ("mnist", "dit", 28, 28, 1)
    assert (m.num_classes, m.null_class, m.learn_sigma, m.guided_channels, m.vae) == (10, 10, True, None, None)
    assert m.module.depth == 6


def test_default_model_draws_the_requested_digits():
    m = load_model("mnist")
    result = generate(m, SampleConfig(num_samples=100, batch_size=100, steps=20, cfg_scale=1.5,
                                      labels=tuple(range(10)), seed=123))
    assert result.images.shape == (100, 28, 28, 1)
    assert accuracy(result.images, result.labels) >= MIN_ACCURACY
    assert np.array_equal(result.labels, np.arange(100) % 10)
