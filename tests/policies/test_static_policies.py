"""FORA and the rule presets produce exactly the published schedules; bad schedules are errors."""

import re

import numpy as np
import pytest

from ditcache.policies import POLICIES, make_policy
from ditcache.policies.fora import fora_schedule
from ditcache.policies.rule import rm_steps
from ditcache.policies.schedule import Schedule, step_schedule
from ditcache.registry import parse_spec
from ditcache.types import Branch, RunInfo, Site


def cached_steps(schedule):
    return [i for i in range(schedule.num_steps) if schedule.cached[i].all()]


def test_rm_presets_are_the_eoc_goc_matrices_at_ddim20():
    assert rm_steps("rm-25", 20) == [1, 3, 5, 7, 9]
    assert rm_steps("rm-50", 20) == list(range(1, 20, 2))
    assert len(rm_steps("rm-75", 20)) == 15


@pytest.mark.parametrize("preset,fraction", [("rm-25", 0.25), ("rm-50", 0.5), ("rm-75", 0.75)])
def test_rm_presets_cache_the_named_fraction_at_20_steps(preset, fraction):
    policy = make_policy("rule", preset=preset)
    policy.reset(RunInfo(num_steps=20, depth=28, num_tokens=256))
    assert policy.schedule().cached_fraction == fraction
    # every block, attention and MLP alike, at a cached step
    for i in cached_steps(policy.schedule()):
        assert policy.schedule().cached[i].all()


def test_fora_full_steps_follow_the_count_down_rule():
    # 10 steps, N = 3: respaced r = 9..0; full iff first step or r % 3 == 0 -> r in {9, 6, 3, 0}
    s = fora_schedule(10, 4, 3)
    full = [i for i in range(10) if not s.cached[i].any()]
    assert full == [0, 3, 6, 9]
    assert cached_steps(s) == [1, 2, 4, 5, 7, 8]


def test_fora_first_step_is_full_even_off_the_grid():
    # 20 steps, N = 3: r = 19 is not a multiple of 3 but is the first step
    s = fora_schedule(20, 2, 3)
    assert not s.cached[0].any()
    assert [i for i in range(20) if not s.cached[i].any()] == [0, 1, 4, 7, 10, 13, 16, 19]


def test_schedule_for_another_shape_is_an_error_not_a_truncation():
    s = step_schedule(20, 28, [1, 3], "x")
    with pytest.raises(ValueError, match="20 steps x 28 blocks"):
        s.check_fits(50, 28)
    with pytest.raises(ValueError, match="28 blocks"):
        s.check_fits(20, 12)


def test_rule_file_round_trip_and_errors(tmp_path):
    s = step_schedule(6, 3, [1, 3], "mine")
    s.cached[5, 2, 1] = True
    path = tmp_path / "s.json"
    s.save(path)
    back = Schedule.load(path)
    assert np.array_equal(back.cached, s.cached)
    policy = make_policy("rule", path=str(path))
    with pytest.raises(ValueError, match="6 steps x 3 blocks"):
        policy.reset(RunInfo(num_steps=20, depth=3, num_tokens=4))
    with pytest.raises(FileNotFoundError):
        make_policy("rule", path=str(tmp_path / "missing.json"))
    bad = s.to_json()
    bad["schedule"][1]["cached_attn"] = [7]
    with pytest.raises(ValueError, match="block 7 is outside"):
        Schedule.from_json(bad)


def test_rule_steps_reuse_exactly_the_listed_steps():
    policy = parse_spec(POLICIES, "rule:steps=1/3/4/9")  # as the command line gives it
    policy.reset(RunInfo(num_steps=10, depth=3, num_tokens=4))
    cached = policy.schedule().cached  # (steps, depth, branch)
    assert [i for i in range(10) if cached[i].any()] == [1, 3, 4, 9]
    assert all(cached[i].all() for i in (1, 3, 4, 9))
    with pytest.raises(ValueError, match="outside 0..9"):
        make_policy("rule", steps=(1, 12)).reset(RunInfo(num_steps=10, depth=3, num_tokens=4))
    with pytest.raises(ValueError, match="step 0"):
        make_policy("rule", steps=(0, 1))
    with pytest.raises(ValueError, match="not both"):
        make_policy("rule", steps=(1,), path="x.json")


def test_step_zero_cannot_reuse():
    arr = np.zeros((4, 2, 2), dtype=bool)
    arr[0, 1, 0] = True
    with pytest.raises(ValueError, match="step 0"):
        Schedule(arr)


def test_rule_steps_listed_twice_are_refused():
    with pytest.raises(ValueError, match=r"rule steps list step\(s\) \[1\] more than once"):
        parse_spec(POLICIES, "rule:steps=1/1/3")


@pytest.mark.parametrize("spec,message", [
    ("toca:ratio=1.5", "must be in [0, 1], got 1.5"),
    ("duca:ratio=2", "must be in [0, 1], got 2.0"),
    ("toca:ratio=nan", "must be in [0, 1], got nan"),
    ("toca:bonus=inf", "bonus must be a finite number >= 0, got inf"),
])
def test_token_policy_options_outside_their_domain_are_refused(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_spec(POLICIES, spec)


def test_unknown_names_and_options_are_clear_errors():
    with pytest.raises(ValueError, match="unknown cache policy 'foo'"):
        make_policy("foo")
    with pytest.raises(ValueError, match="no option"):
        make_policy("fora", every=2)
    with pytest.raises(ValueError, match="positive integer"):
        make_policy("fora", interval=0)
    with pytest.raises(ValueError, match="unknown rule preset"):
        make_policy("rule", preset="rm-99")


def test_schedule_text_map():
    s = step_schedule(3, 4, [1], "t")
    s.cached[2, 0, 0] = True
    s.cached[2, 1, 1] = True
    lines = s.to_text().splitlines()
    assert lines[-3:] == ["   0  ....", "   1  ####", "   2  am.."]
    assert s.is_cached(2, Site(0, Branch.ATTN)) and not s.is_cached(2, Site(0, Branch.MLP))
