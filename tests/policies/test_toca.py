"""ToCa: the interval and fresh-ratio schedules, and partial steps that are exact at their limits."""

import pytest
import torch

from ditcache.engine import CacheEngine
from ditcache.models.dit import modulate
from ditcache.policies import POLICIES, make_policy
from ditcache.policies.toca import (
    TocaConfig,
    TocaPolicy,
    fresh_counts,
    fresh_ratio,
    interval_at,
    step_types,
)
from ditcache.registry import parse_spec
from ditcache.types import Branch, Kind, RunInfo, Site, StepInfo

from ..conftest import tiny_dit

STEPS = 9  # ToCa N = 3 at 9 steps is "fpppfffpf": a partial step with k = 0, then two with k > 0
DUCA_DDIM50 = "fpapffpapfpapfpapfpfapfapfapfapfpfpfpfpfpfpfpfpfpf"  # methods.md §6.2, step 49 down to 0


def inputs(model, batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    return x, y


def trajectory(model, policy=None, x=None, y=None, steps=STEPS):
    """A sampling-like loop (each input depends on the last output); returns outputs and the report."""
    if x is None:
        x, y = inputs(model)
    engine = CacheEngine(model, policy).install() if policy is not None else None
    if engine is not None:
        engine.begin_run(RunInfo(num_steps=steps, depth=0, num_tokens=0))
    outs = []
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((x.shape[0],), 999 - 100 * i)
            if engine is not None:
                engine.begin_step(StepInfo(i, steps, int(t[0])))
            out = model(x, t, y)
            outs.append(out)
            x = x - 0.1 * out[:, : model.in_channels]
    report = None
    if engine is not None:
        engine.end_run()
        report = engine.report()
        engine.remove()
    return outs, report


def reference(model, types, mlp_reused, x, y, steps=STEPS):
    """Written without the engine: 'f' computes everything; 'p' reuses attention and reuses the MLP
    of block l where mlp_reused[i][l] (else computes it in full); 'a' reuses the last stack output."""
    store, outs = {}, []
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((x.shape[0],), 999 - 100 * i)
            h, c = model.embed(x, t, y)
            if types[i] != "a":
                for l, block in enumerate(model.blocks):
                    sh1, sc1, g1, sh2, sc2, g2 = block.adaLN_modulation(c).chunk(6, dim=1)
                    if types[i] == "f":
                        store[(l, "attn")] = block.attn(modulate(block.norm1(h), sh1, sc1))
                    h = h + g1.unsqueeze(1) * store[(l, "attn")]
                    if types[i] == "f" or not mlp_reused[i][l]:
                        store[(l, "mlp")] = block.mlp(modulate(block.norm2(h), sh2, sc2))
                    h = h + g2.unsqueeze(1) * store[(l, "mlp")]
                store["stack"] = h
            out = model.unpatchify(model.final_layer(store["stack"], c))
            outs.append(out)
            x = x - 0.1 * out[:, : model.in_channels]
    return outs


# -- schedules ------------------------------------------------------------------------------------
def test_ddim50_n3_has_20_full_and_30_partial_steps():
    types = step_types(50, 3)
    assert (types.count("f"), types.count("p")) == (20, 30)
    assert types == DUCA_DDIM50.replace("a", "p")  # DuCa splits exactly ToCa's partial steps


def test_interval_rule():
    assert interval_at(49, 50, 3) == 5  # round(3 / (1.4 - 0.8 * 49/50)) = round(4.87)
    assert interval_at(30, 50, 3) == 3  # round(3.26)
    assert interval_at(0, 50, 3) == 2  # round(3 / 1.4)
    assert [interval_at(r, 50, 3) for r in range(10, 20)] == [2] * 10  # the [0.2T, 0.4T) override
    # the override covers [0.2T, 0.4T) exactly: round(7 / 1.256) = 6 below it, round(7 / 1.08) = 6 at 0.4T
    assert [interval_at(r, 50, 7) for r in (9, 10, 19, 20)] == [6, 2, 2, 6]
    # the first step is full even off the grid (49 % 3 != 0) and sets I = 5: 48, 47, 46 partial, 45 full
    assert step_types(50, 3)[:5] == "fpppf"


def test_fresh_ratio_schedule_ddim50():
    # R (1 + 2 - 4 r/T)(1 - 0.2 + 0.4 l/27) 2.5, written out at two points
    assert fresh_ratio(1, 50, 27, 28, 0.07) == pytest.approx(0.07 * (3 - 4 / 50) * 1.2 * 2.5)
    assert fresh_ratio(10, 50, 0, 28, 0.07) == pytest.approx(0.07 * (3 - 0.8) * 0.8 * 2.5)
    assert fresh_ratio(40, 50, 13, 28, 0.07) < 0  # r/T > 0.75: nothing recomputed
    k = fresh_counts(step_types(50, 3), 28, 256, 0.07)
    assert k.shape == (50, 28)
    assert k[48, 27] == 156 and k[48, 0] == 104  # int(0.6132 * 256), int(0.4088 * 256)
    assert (k[:12] == 0).all()  # the first quarter recomputes no token
    full = [i for i, c in enumerate(step_types(50, 3)) if c == "f"]
    assert (k[full] == 0).all()


def test_fresh_ratio_ddpm250_variant_and_general_depth():
    # step weight 0.4, layer weight +0.8 in the form 1 + w - 2w x
    assert fresh_ratio(0, 250, 0, 28, 0.07, "ddpm250") == pytest.approx(0.07 * 1.4 * 1.8 * 2.5)
    assert fresh_ratio(125, 250, 27, 28, 0.07, "ddpm250") == pytest.approx(0.07 * 1.0 * 0.2 * 2.5)
    # layer / (depth - 1) runs from 0 to 1 at any depth
    assert fresh_ratio(0, 50, 2, 3, 0.07) == fresh_ratio(0, 50, 27, 28, 0.07)
    assert fresh_ratio(0, 50, 0, 1, 0.07) == fresh_ratio(0, 50, 0, 28, 0.07)
    assert (fresh_counts("fp", 3, 16, 100.0)[1] == 16).all()  # clamped at every token


def test_policy_plan_registry_and_spec():
    policy = make_policy("toca")
    assert policy.config == TocaConfig(interval=3, ratio=0.07, score="attention", freq_weight=0.25, bonus=0.6)
    assert policy.plan(50) == step_types(50, 3)
    spec = parse_spec(POLICIES, "toca:interval=4,ratio=0.05,score=vnorm,ratio_schedule=ddpm250")
    assert (spec.config.interval, spec.config.ratio, spec.config.score) == (4, 0.05, "vnorm")
    for bad in ({"score": "entropy"}, {"ratio_schedule": "x"}, {"interval": 0}, {"vnorm_recompute": "big"}):
        with pytest.raises(ValueError):
            make_policy("toca", **bad)


def test_scores_that_read_attention_need_the_engine_to_bind_modules():
    with pytest.raises(RuntimeError, match="bind"):
        TocaPolicy(TocaConfig(ratio=0.5)).reset(RunInfo(num_steps=STEPS, depth=3, num_tokens=16))
    TocaPolicy(TocaConfig(ratio=0.5, score="random")).reset(RunInfo(num_steps=STEPS, depth=3, num_tokens=16))


# -- runs on the tiny DiT ---------------------------------------------------------------------------
def test_partial_step_with_every_token_equals_computing_the_mlp():
    dit = tiny_dit()
    policy = make_policy("toca", ratio=1.0, mlp_weight=250.0)  # R·m_MLP = 100: every partial step with a positive ratio takes all 16
    x, y = inputs(dit)
    outs, _ = trajectory(dit, policy, x, y)
    k = policy.fresh
    assert (k[k > 0] == 16).all() and (k == 16).any()
    ref = reference(dit, policy.types, (k == 0).tolist(), x, y)
    for a, b in zip(outs, ref):
        # the MLP runs on the same rows in top-k order; scatter puts them back. Only the matmul's
        # blocking over a permuted row order can differ: float32 rounding over 3 blocks.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_partial_step_with_no_token_equals_plain_reuse_exactly():
    dit = tiny_dit()
    policy = make_policy("toca", ratio=0.0)
    x, y = inputs(dit)
    outs, report = trajectory(dit, policy, x, y)
    ref = reference(dit, policy.types, [[True] * dit.depth] * STEPS, x, y)
    for a, b in zip(outs, ref):
        assert torch.equal(a, b)
    assert [f for f, c in zip(report["per_step_compute_fraction"], policy.types) if c == "p"] == [0.0] * 4


def test_counters_follow_the_fresh_table_and_attention_is_reused():
    dit = tiny_dit()
    policy = make_policy("toca", ratio=0.5)
    _, report = trajectory(dit, policy)
    k = policy.fresh
    expected = [1.0 if c == "f" else k[i].sum() / 16 / (2 * dit.depth) for i, c in enumerate(policy.types)]
    assert report["per_step_compute_fraction"] == pytest.approx(expected, abs=1e-12)
    assert 0 < k[2].sum() < 16 * dit.depth  # a real partial step
    assert policy.action(StepInfo(2, STEPS), Site(0, Branch.ATTN)).kind is Kind.REUSE


@pytest.mark.parametrize("score,per_layer", [("attention", 2 * 16 * 32 * 32 + 16 * 16 * 32),
                                             ("vnorm", 16 * 32 * 32), ("random", 0)])
def test_scoring_cost_is_reported_for_the_full_steps_that_feed_partial_steps(score, per_layer):
    dit = tiny_dit()
    policy = make_policy("toca", ratio=0.5, score=score)
    _, report = trajectory(dit, policy)
    # "fpppfffpf": full steps 0 and 6 are followed by partial steps with k > 0; 4, 5, 8 are not
    scored = [(i, l) for i in range(STEPS) for l in range(dit.depth) if policy.scored[i, l]]
    if score != "random":
        assert scored == [(i, l) for i in (0, 6) for l in range(dit.depth)]
    assert report["extra_macs"] == 4 * per_layer * len(scored)  # batch 4
    assert report["macs_run"] > report["extra_macs"]


def test_cfg_halves_pick_their_own_tokens():
    """Batch [cond; uncond]: every row is scored and selected on its own, as if run alone."""
    dit = tiny_dit()
    picks = []

    class Spy(TocaPolicy):
        def action(self, step, site):
            a = super().action(step, site)
            if a.kind is Kind.PARTIAL:
                picks.append(a.tokens.clone())
            return a

    x, y = inputs(dit, batch=2)
    x, y = torch.cat([x, x]), torch.cat([y, torch.full_like(y, dit.null_class)])  # (4, ...) cond; uncond
    both, _ = trajectory(dit, Spy(TocaConfig(ratio=0.5)), x, y)
    together, picks[:] = list(picks), []
    cond, _ = trajectory(dit, Spy(TocaConfig(ratio=0.5)), x[:2], y[:2])
    cond_picks, picks[:] = list(picks), []
    uncond, _ = trajectory(dit, Spy(TocaConfig(ratio=0.5)), x[2:], y[2:])
    for t, c, u in zip(together, cond_picks, picks):
        assert torch.equal(t, torch.cat([c, u]))
    assert any(not torch.equal(t[:2], t[2:]) for t in together)  # the halves really differ
    for a, c, u in zip(both, cond, uncond):
        torch.testing.assert_close(a, torch.cat([c, u]), rtol=1e-5, atol=1e-6)  # batched matmul rounding


def test_random_selection_is_reproducible_and_runs_do_not_leak():
    dit = tiny_dit()
    a, _ = trajectory(dit, make_policy("toca", ratio=0.5, score="random", seed=0))
    b, _ = trajectory(dit, make_policy("toca", ratio=0.5, score="random", seed=0))
    c, _ = trajectory(dit, make_policy("toca", ratio=0.5, score="random", seed=1))
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[-1], c[-1])
    policy = make_policy("toca", ratio=0.5)
    first, _ = trajectory(dit, policy)
    trajectory(dit, policy, *inputs(dit, seed=5))
    again, _ = trajectory(dit, policy)
    assert all(torch.equal(p, q) for p, q in zip(first, again))
