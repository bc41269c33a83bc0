"""Shared fixtures: tiny models whose outputs we can check exactly."""

import pytest
import torch

from ditcache.models.dit import DiT

torch.set_num_threads(1)  # tests use tiny models; one thread avoids oversubscribing 2 cores


def tiny_dit(depth=3, hidden=32, heads=2, size=8, patch=2, channels=4, classes=5, learn_sigma=True, seed=0):
    """A tiny DiT with *random non-zero* adaLN and output weights, so every site matters."""
    torch.manual_seed(seed)
    model = DiT(input_size=size, patch_size=patch, in_channels=channels, hidden_size=hidden, depth=depth,
                num_heads=heads, num_classes=classes, learn_sigma=learn_sigma)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name or "final_layer.linear" in name:
                p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture
def dit():
    return tiny_dit()
