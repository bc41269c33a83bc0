"""Step sets: the reuse-error proxy, its greedy / trim / swap moves, and the uncached change recorder."""

import torch

from ditcache.engine import CacheEngine
from ditcache.models.loading import LoadedModel
from ditcache.sampling.generate import SampleConfig, generate
from ditcache.tune.steps import ChangeRecorder, greedy_steps, proxy_cost, steps_spec, swaps, trim

from ..conftest import tiny_dit

CHANGES = [0.0, 0.9, 0.1, 0.1, 0.8, 0.05, 0.05]  # steps 2, 3, 5, 6 barely move


def test_proxy_cost_accumulates_staleness_over_consecutive_reuse():
    assert proxy_cost([2], CHANGES) == 0.1
    assert proxy_cost([2, 3], CHANGES) == 0.1 + 0.2  # step 3 reuses step 1's feature: stale by d2 + d3
    assert proxy_cost([], CHANGES) == 0.0


def test_greedy_picks_the_quiet_steps_and_trim_drops_the_costly_ones():
    assert greedy_steps(2, CHANGES) == (2, 5)  # not 3 or 6 next to them: staleness adds up
    assert set(greedy_steps(4, CHANGES)) == {2, 3, 5, 6}
    assert trim([1, 2, 4, 5], 2, CHANGES) == (2, 5)


def test_swaps_keep_the_size_and_come_cheapest_first():
    out = swaps((1, 5), CHANGES, limit=3)
    assert len(out) == 3 and all(len(s) == 2 for s in out)
    assert out[0] == (2, 5)  # swapping the loud step 1 for quiet step 2 is the best move
    costs = [proxy_cost(s, CHANGES) for s in out]
    assert costs == sorted(costs)


def test_spec_string():
    assert steps_spec((5, 1, 3), "+goc") == "rule:steps=1/3/5+goc"


def test_recorder_measures_the_uncached_trajectory():
    module = tiny_dit(depth=2, size=8, channels=4, classes=3)
    loaded = LoadedModel(module=module, family="dit", name="tiny", image_size=8, latent_size=8, in_channels=4,
                         num_classes=3, null_class=3, learn_sigma=True, guided_channels=4, vae=None, fingerprint="t")
    recorder = ChangeRecorder()
    config = SampleConfig(num_samples=2, steps=5)
    with CacheEngine(module, recorder, []) as engine:
        cached = generate(loaded, config, engine=engine)
    changes = recorder.changes(5)
    assert changes[0] == 0.0 and all(c > 0 for c in changes[1:])
    assert cached.report["compute_fraction"] == 1.0  # recording computes everything
    plain = generate(loaded, config)
    assert torch.equal(torch.from_numpy(cached.images), torch.from_numpy(plain.images))
