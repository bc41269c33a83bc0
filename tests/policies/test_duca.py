"""DuCa: the aggressive / conservative step sequence, and aggressive steps that reuse the whole trunk."""

import pytest
import torch

from ditcache.policies import make_policy
from ditcache.policies.duca import DucaConfig
from ditcache.policies.toca import step_types
from ditcache.types import COMPUTE, REUSE, RunInfo, StepInfo

from ..conftest import tiny_dit
from .test_toca import DUCA_DDIM50, inputs, reference, trajectory

STEPS = 15  # DuCa N = 3 at 15 steps is "fpapffapfapffpf": aggressive steps right after partial ones


def test_ddim50_sequence_is_the_derived_one():
    plan = make_policy("duca").plan(50)
    assert plan == DUCA_DDIM50 == step_types(50, 3, dual=True)
    assert (plan.count("f"), plan.count("p"), plan.count("a")) == (20, 22, 8)


def test_defaults_and_trunk_actions():
    policy = make_policy("duca")
    assert policy.config == DucaConfig(interval=3, ratio=0.05, freq_weight=0.25, bonus=0.8, score="attention")
    assert policy.uses_trunk
    policy = make_policy("duca", score="random")  # resets without an engine: needs no module
    policy.reset(RunInfo(num_steps=50, depth=28, num_tokens=256))
    trunk = "".join("a" if policy.trunk_action(StepInfo(i, 50)) == REUSE else "." for i in range(50))
    assert trunk == "".join("a" if c == "a" else "." for c in DUCA_DDIM50)
    assert policy.trunk_action(StepInfo(0, 50)) == COMPUTE


def test_plan_at_the_test_length():
    assert step_types(STEPS, 3, dual=True) == "fpapffapfapffpf"


@pytest.mark.parametrize("score", ["attention", "vnorm", "random"])
def test_aggressive_steps_compute_no_site(score):
    dit = tiny_dit()
    policy = make_policy("duca", ratio=0.5, score=score)
    _, report = trajectory(dit, policy, steps=STEPS)
    fractions = report["per_step_compute_fraction"]
    idle = [i for i, c in enumerate(policy.types) if c == "a" or (c == "p" and not policy.fresh[i].any())]
    assert [i for i, f in enumerate(fractions) if f == 0.0] == idle  # aggressive, or partial with k = 0
    assert "a" in policy.types
    assert all(0 < fractions[i] < 1 for i, c in enumerate(policy.types) if c == "p" and policy.fresh[i].any())


def test_duca_without_fresh_tokens_equals_the_hand_written_loop_exactly():
    """ratio 0: conservative steps reuse every site; aggressive steps reuse the last stack output
    (computed at the step before, itself possibly a conservative step)."""
    dit = tiny_dit()
    policy = make_policy("duca", ratio=0.0)
    x, y = inputs(dit)
    outs, _ = trajectory(dit, policy, x, y, steps=STEPS)
    ref = reference(dit, policy.types, [[True] * dit.depth] * STEPS, x, y, steps=STEPS)
    for a, b in zip(outs, ref):
        assert torch.equal(a, b)


def test_duca_with_every_token_matches_the_loop_within_rounding():
    dit = tiny_dit()
    policy = make_policy("duca", ratio=1.0, mlp_weight=250.0)  # R·m_MLP = 100: every token
    x, y = inputs(dit)
    outs, _ = trajectory(dit, policy, x, y, steps=STEPS)
    assert (policy.fresh == 16).any()
    ref = reference(dit, policy.types, (policy.fresh == 0).tolist(), x, y, steps=STEPS)
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # permuted-row matmul rounding, as in ToCa


def test_token_scores_choose_different_tokens():
    dit = tiny_dit()
    outs = {s: trajectory(dit, make_policy("duca", ratio=0.3, score=s), steps=STEPS)[0][-1]
            for s in ("attention", "vnorm", "random")}
    assert not torch.equal(outs["attention"], outs["vnorm"])
    assert not torch.equal(outs["attention"], outs["random"])
