"""Non-finite results stop the run at their step, naming the step, the site and the corrector."""

import pytest
import torch

from ditcache.correctors.base import Corrector
from ditcache.engine import CacheEngine
from ditcache.finite import NonFiniteError
from ditcache.policies import make_policy
from ditcache.sampling.loops import sample

from .conftest import tiny_dit


def _sample(model_fn, hooks=None, steps=4):
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return sample(model_fn, noise, torch.tensor([1, 2]), sampler="ddim", num_steps=steps, cfg_scale=1.0,
                  null_class=5, learn_sigma=True, hooks=hooks)


def test_nan_model_output_stops_at_that_step():
    calls = []

    def model(x, t, y):
        calls.append(int(t[0]))
        eps = torch.zeros(x.shape[0], 8, *x.shape[2:])
        return eps * float("nan") if len(calls) == 3 else eps

    with pytest.raises(NonFiniteError, match=r"sampling step 2 \(timestep \d+\): the model output is non-finite; "
                                             "no corrector was involved"):
        _sample(model)
    assert len(calls) == 3  # stopped there: step 3 never ran


class Poison(Corrector):
    """Turns the reused feature of one site into infinities."""

    name = "poison"

    def correct(self, step, site, cached):
        return cached * float("inf") if site.block == 1 else cached


def test_nonfinite_corrected_feature_names_step_site_and_corrector():
    model = tiny_dit()  # FORA N=2 over 4 steps reuses at step 2 first; attention comes before the MLP
    with CacheEngine(model, make_policy("fora", interval=2), [Poison()]) as engine:
        with pytest.raises(NonFiniteError, match=r"sampling step 2 .*corrector poison made the feature of site "
                                                 r"attn1 non-finite"):
            _sample(lambda x, t, y: model(x, t, y), hooks=engine)


def test_finite_run_with_corrector_passes():
    model = tiny_dit()
    with CacheEngine(model, make_policy("fora", interval=2), [Corrector()]) as engine:
        out = _sample(lambda x, t, y: model(x, t, y), hooks=engine)
    assert torch.isfinite(out).all()
