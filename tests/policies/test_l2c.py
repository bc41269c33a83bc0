"""L2C at inference: the published DiT-XL/2 schedules exactly, the threshold maths, and clear refusals."""

import numpy as np
import pytest
import torch

from ditcache.calibration.artifact import Artifact, ArtifactKey, save_artifact
from ditcache.policies import make_policy
from ditcache.policies.l2c import cache_steps, fraction_schedule, preset_schedule, router_schedule, schedules_file
from ditcache.types import RunInfo


def blocks(*spans):
    """blocks(0, (3, 5)) -> {0, 3, 4, 5}: single blocks and inclusive ranges."""
    out = set()
    for s in spans:
        out |= set(range(s[0], s[1] + 1)) if isinstance(s, tuple) else {s}
    return out


ALL = blocks((0, 27))
# methods.md §3.6: the DDIM-20 router at θ = 0.1, step -> (cached attention blocks, cached MLP blocks)
DDIM20 = {
    1: (ALL, ALL),
    3: (ALL, ALL),
    5: (blocks((0, 1), (3, 26)), blocks((0, 2), (4, 26))),
    7: (blocks((0, 23), 25), blocks(0, (4, 24), 27)),
    9: (blocks((0, 1), (3, 5), (10, 12), 15, 20, 22), blocks(0, (4, 20), 22)),
    11: (blocks(0, 1), blocks(0)),
    13: ({1}, set()),
    15: ({1}, set()),
    17: ({1}, set()),
    19: (set(), set()),
}


def cached_blocks(schedule, step, branch):
    return set(np.flatnonzero(schedule.cached[step, :, branch]).tolist())


def test_ddim20_preset_is_the_published_schedule_step_by_step():
    s = preset_schedule("dit-xl2-ddim20")
    assert (s.num_steps, s.depth) == (20, 28)
    for step in range(20):
        attn, mlp = DDIM20.get(step, (set(), set()))  # even steps compute everything
        assert cached_blocks(s, step, 0) == attn, step
        assert cached_blocks(s, step, 1) == mlp, step


def test_preset_totals():
    s20, s50 = preset_schedule("dit-xl2-ddim20"), preset_schedule("dit-xl2-ddim50")
    assert int(s20.cached.sum()) == 248 and s20.cached.size == 1120
    assert int(s50.cached.sum()) == 664 and s50.cached.size == 2800
    assert round(100 * s20.cached_fraction, 2) == 22.14
    assert round(100 * s50.cached_fraction, 2) == 23.71
    # 248 of the 560 cache-step sub-layers, 664 of 1400
    assert s20.cached[1::2].size == 560 and round(100 * s50.cached[1::2].mean(), 2) == 47.43
    for s in (s20, s50):
        assert not s.cached[0::2].any()  # reuse only at the odd (cache) steps


def test_ddim50_preset_pattern():
    s = preset_schedule("dit-xl2-ddim50")
    per_step = s.cached.sum(axis=1)  # (50, 2)
    assert per_step[47:].sum() == 0  # steps 47-49 cache nothing
    assert all(cached_blocks(s, i, 0) <= {0, 1} and not cached_blocks(s, i, 1) for i in range(29, 46, 2))
    assert per_step[9:22:2].min() >= 22


def test_policy_with_preset_and_wrong_shapes():
    policy = make_policy("l2c", preset="dit-xl2-ddim20")
    policy.reset(RunInfo(num_steps=20, depth=28, num_tokens=256))
    assert policy.schedule().cached_fraction == pytest.approx(248 / 1120)
    with pytest.raises(ValueError, match="20 steps x 28 blocks.*50 steps x 28 blocks"):
        policy.reset(RunInfo(num_steps=50, depth=28, num_tokens=256))
    with pytest.raises(ValueError, match="20 steps x 28 blocks.*20 steps x 6 blocks"):
        policy.reset(RunInfo(num_steps=20, depth=6, num_tokens=49))


def test_threshold_maths_on_a_hand_made_router():
    # 5 steps x 2 blocks; logit -> β: 0 -> 0.5, -3 -> 0.047, -2 -> 0.119, 3 -> 0.95
    logits = torch.tensor([
        [-3.0, -3.0, -3.0, -3.0],  # step 0: never cached, whatever β is
        [-3.0, 0.0, -2.0, 3.0],  # step 1: attn0 (0.047) cached; mlp0, attn1, mlp1 computed at θ = 0.1
        [-3.0, -3.0, -3.0, -3.0],  # step 2: even, computed
        [0.0, -3.0, 3.0, -2.0],
        [-3.0, -3.0, -3.0, -3.0],  # step 4: even (the last step of an odd count), computed
    ])
    s = router_schedule(logits, 0.1)
    expected = np.zeros((5, 2, 2), dtype=bool)
    expected[1, 0, 0] = True
    expected[3, 0, 1] = True
    assert np.array_equal(s.cached, expected)
    s2 = router_schedule(logits, 0.2)  # β = 0.119 is now at or below θ: cached too
    expected[1, 1, 0] = expected[3, 1, 1] = True
    assert np.array_equal(s2.cached, expected)
    assert cache_steps(5) == [1, 3] and cache_steps(20) == list(range(1, 20, 2))


def test_computed_iff_beta_above_threshold():
    logits = torch.logit(torch.tensor([[0.3, 0.3], [0.3, 0.31]]))  # β exactly around θ = 0.3
    s = router_schedule(logits, float(torch.sigmoid(logits[1, 0])))
    assert s.cached[1, 0].tolist() == [True, False]  # β == θ is cached, β > θ computed


def test_fraction_caches_the_lowest_beta_sites_of_the_cache_steps():
    # 4 steps x 2 blocks = 16 sub-layer calls; cache steps 1 and 3
    logits = torch.tensor([
        [-9.0, -9.0, -9.0, -9.0],  # step 0: never cached, even at the lowest β
        [-1.0, 2.0, -3.0, 0.5],
        [-9.0, -9.0, -9.0, -9.0],
        [-2.0, 1.0, -0.5, 3.0],
    ])
    # β order over the cache steps: (1, attn1) -3 < (3, attn0) -2 < (1, attn0) -1 < (3, attn1) -0.5 < ...
    s = fraction_schedule(logits, 3 / 16)
    expected = np.zeros((4, 2, 2), dtype=bool)
    expected[1, 1, 0] = expected[3, 0, 0] = expected[1, 0, 0] = True
    assert np.array_equal(s.cached, expected)
    # the same sets as thresholding at a θ between the 3rd and 4th smallest β
    theta = float(torch.sigmoid(torch.tensor(-0.75)))
    assert np.array_equal(router_schedule(logits, theta).cached, expected)
    assert fraction_schedule(logits, 0.0).cached.sum() == 0
    assert fraction_schedule(logits, 0.5).cached[[1, 3]].all()  # every cache-step sub-layer
    with pytest.raises(ValueError, match=r"must be in \[0, 0.500\]"):
        fraction_schedule(logits, 0.6)


def _router(tmp_path, steps=6, depth=3, fingerprint="abc", cfg=1.5):
    logits = torch.full((steps, 2 * depth), 4.0)
    logits[1] = -4.0  # everything cached at step 1
    key = ArtifactKey(fingerprint, "ddim", steps, cfg, 8)
    return save_artifact(Artifact("l2c-router", key, {"logits": logits}), tmp_path / "router")


def test_router_artifact_is_checked_against_the_run(tmp_path):
    path = _router(tmp_path)
    policy = make_policy("l2c", router=str(path))
    run = RunInfo(num_steps=6, depth=3, num_tokens=16, sampler="ddim", cfg_scale=1.5, fingerprint="abc", resolution=8)
    policy.reset(run)
    assert policy.schedule().cached[1].all() and policy.schedule().cached.sum() == 6
    with pytest.raises(ValueError, match="model_fingerprint: artifact 'abc' vs run 'other'"):
        policy.reset(RunInfo(**{**run.__dict__, "fingerprint": "other"}))
    with pytest.raises(ValueError, match="steps: artifact 6 vs run 20"):
        policy.reset(RunInfo(**{**run.__dict__, "num_steps": 20}))
    with pytest.raises(ValueError, match="cfg_scale"):
        policy.reset(RunInfo(**{**run.__dict__, "cfg_scale": 4.0}))
    with pytest.raises(ValueError, match="does not know which model"):
        policy.reset(RunInfo(num_steps=6, depth=3, num_tokens=16))
    by_fraction = make_policy("l2c", router=str(path), fraction=3 / 36)  # 3 of 6 steps x 6 sub-layers
    by_fraction.reset(run)
    assert by_fraction.schedule().cached.sum() == 3 and by_fraction.schedule().cached[1].sum() == 3


def test_bad_configs_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="exactly one of"):
        make_policy("l2c")
    with pytest.raises(ValueError, match="exactly one of"):
        make_policy("l2c", preset="dit-xl2-ddim20", router="x")
    with pytest.raises(ValueError, match="unknown L2C preset"):
        make_policy("l2c", preset="dit-xl2-ddim10")
    with pytest.raises(ValueError, match="threshold applies to router"):
        make_policy("l2c", preset="dit-xl2-ddim20", threshold=0.5)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        router_schedule(torch.zeros(2, 2), 1.5)
    with pytest.raises(ValueError, match="router=PATH only"):
        make_policy("l2c", preset="dit-xl2-ddim20", fraction=0.1)
    with pytest.raises(FileNotFoundError, match="not a calibration artifact"):
        make_policy("l2c", router=str(tmp_path))
    other = save_artifact(Artifact("eoc-prior", ArtifactKey("a", "ddim", 6, 1.5, 8), {"x": torch.zeros(1)}),
                          tmp_path / "prior")
    with pytest.raises(ValueError, match="not a 'l2c-router'"):
        make_policy("l2c", router=str(other))
    monkeypatch.setenv("DITCACHE_SHARED", str(tmp_path / "nowhere"))
    assert schedules_file() == tmp_path / "nowhere" / "data" / "l2c_dit_xl2_schedules.json"
    with pytest.raises(FileNotFoundError, match="DITCACHE_SHARED"):
        make_policy("l2c", preset="dit-xl2-ddim20")


def test_a_three_column_router_thresholds_into_a_three_column_schedule():
    logits = torch.full((3, 6), 5.0)  # 3 steps x 2 blocks x (attn, mlp, cross)
    logits[1, 5] = -5.0  # cross-attention of block 1 at cache step 1
    logits[2, 0] = -5.0  # step 2 is even: computed whatever β is
    s = router_schedule(logits, 0.1, columns=3)
    expected = np.zeros((3, 2, 3), dtype=bool)
    expected[1, 1, 2] = True
    assert np.array_equal(s.cached, expected)
    assert np.array_equal(fraction_schedule(logits, 1 / 18, columns=3).cached, expected)
    with pytest.raises(ValueError, match="3 \\* depth"):
        router_schedule(torch.zeros(3, 4), 0.1, columns=3)
