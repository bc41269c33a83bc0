"""DuCa: the aggressive / conservative step sequence, and aggressive steps that reuse the whole trunk."""

import pytest
import torch

from ditcache.engine import CacheEngine
from ditcache.policies import make_policy
from ditcache.policies.duca import DucaConfig, DucaPolicy
from ditcache.sampling.loops import sample
from ditcache.policies.toca import step_types
from ditcache.types import COMPUTE, REUSE, Kind, RunInfo, StepInfo

from ..conftest import tiny_dit
from .test_toca import DUCA_DDIM50, inputs, reference, trajectory

# DuCa N = 3 at 12 steps is "fapApfapPfpf": step 0 sets I = 4 (float32: 3 / 0.6667 is 4.5, rounded to even),
# so r = 10 is 2 mod 4, aggressive; step 3 (r = 8) is full in layer 0, which sets I = round(3.46) = 3, and
# 8 mod 3 = 2 makes layers 1, 2 aggressive ('A'); step 8 (r = 3) is 'P' the same way with I = 2.
STEPS = 12


def test_ddim50_sequence_is_the_derived_one():
    plan = make_policy("duca").plan(50)
    assert plan == DUCA_DDIM50 == step_types(50, 3, dual=True)  # derived in test_toca.py
    assert [plan.count(c) for c in "fpaPA"] == [18, 22, 8, 1, 1]


def test_defaults_and_trunk_actions():
    policy = make_policy("duca")
    assert policy.config == DucaConfig(interval=3, ratio=0.05, freq_weight=0.25, bonus=0.8, score="attention")
    assert policy.uses_trunk
    policy = make_policy("duca", score="random")  # resets without an engine: needs no module
    policy.reset(RunInfo(num_steps=50, depth=28, num_tokens=256))
    trunk = "".join("a" if policy.trunk_action(StepInfo(i, 50)) == REUSE else "." for i in range(50))
    assert trunk == "".join("a" if c in "aA" else "." for c in DUCA_DDIM50)  # step 17 ('A') is aggressive too
    assert policy.trunk_action(StepInfo(0, 50)) == COMPUTE
    # at step 17 only layer 0 still runs (it re-initialises the interval); at a plain 'a' step none does
    assert [b for b in range(28) if policy.runs_in_reused_trunk(StepInfo(17, 50), b)] == [0]
    assert not any(policy.runs_in_reused_trunk(StepInfo(2, 50), b) for b in range(28))


def test_plan_at_the_test_length():
    assert step_types(STEPS, 3, dual=True) == "fapApfapPfpf"


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
    assert [fractions[i] for i, c in enumerate(policy.types) if c == "A"] == [1 / 3]  # layer 0 of 3 blocks


def test_duca_without_fresh_tokens_equals_the_hand_written_loop_exactly():
    """A ratio too small for any token: conservative steps reuse every site; aggressive steps reuse the
    last stack output (computed at the step before, itself possibly a conservative step); at step 3 ('A')
    layer 0 is computed and stored, and step 4 reuses it. (Ratio 0 would be the code's FORA intervals.)"""
    dit = tiny_dit()
    policy = make_policy("duca", ratio=1e-9)
    assert policy.plan(STEPS) == "fapApfapPfpf"
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


@pytest.mark.parametrize("cfg", [1.5, 1.0])
def test_random_tokens_are_shared_by_the_guidance_halves(cfg):
    """score=random as the authors': one draw for [cond; uncond] under guidance, a draw per row without."""
    dit = tiny_dit()
    picks = []

    class Spy(DucaPolicy):
        def action(self, step, site):
            a = super().action(step, site)
            if a.kind is Kind.PARTIAL:
                picks.append(a.tokens)
            return a

    g = torch.Generator().manual_seed(0)
    noise, labels = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1, 3])
    with CacheEngine(dit, Spy(DucaConfig(ratio=0.2, score="random"))) as engine:
        sample(dit, noise, labels, sampler="ddim", num_steps=STEPS, cfg_scale=cfg, null_class=dit.null_class,
               learn_sigma=True, hooks=engine)
    assert picks and all(p.shape[0] == (4 if cfg != 1 else 2) for p in picks)
    if cfg != 1:
        assert all(torch.equal(p[:2], p[2:]) for p in picks)
    assert any(not torch.equal(p[0], p[1]) for p in picks)  # the two samples still differ
