"""Fixtures the engine tests share: the correctors' tiny loaded model and its prior, and a clean dynamo."""

import pytest

from ditcache.calibration.prior import extract_prior
from ditcache.sampling.generate import SampleConfig

from ..correctors.conftest import CFG, STEPS, tiny_loaded


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded()


@pytest.fixture(scope="module")
def prior(loaded, tmp_path_factory):
    """A real prior of the tiny model: 4 uncached samples at the correctors' steps and CFG."""
    out = tmp_path_factory.mktemp("prior") / "prior"
    return str(extract_prior(loaded, SampleConfig(num_samples=4, batch_size=4, steps=STEPS, cfg_scale=CFG), out).path)


@pytest.fixture
def fresh_dynamo():
    """dynamo's caches and counters emptied before and after a test (use it with pytest.mark.usefixtures)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
