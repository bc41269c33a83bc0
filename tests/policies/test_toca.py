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
    layer_type,
    step_types,
)
from ditcache.registry import parse_spec
from ditcache.types import Branch, Kind, RunInfo, Site, StepInfo

from ..conftest import tiny_dit

STEPS = 9  # ToCa N = 3 at 9 steps is "fpppPfppf": partial steps with k = 0 and k > 0, and a mixed step 4

# DDIM-50, N = 3, our step 0 (r = 49) first, derived by hand from the authors' cal_type / force_init /
# force_scheduler (methods.md §6.2 "Correction"). Step 0 is full and sets I = round(3 / (1.4 - 0.8 * 49/50))
# = round(4.87) = 5; r = 48, 47, 46 are 3, 2, 1 mod 5 (ToCa p p p; DuCa p a p). r = 45 is 0 mod 5, so layer 0
# is full and re-initialises I = round(3 / 0.68) = round(4.41) = 4; 45 mod 4 = 1, so layers 1-27 are partial:
# 'P'. r = 44 (I = round(4.31) = 4), 40 (round(3.95) = 4) and 36 (round(3.64) = 4) are full, each followed
# by 3 non-full steps. r = 32 is 0 mod 4: layer 0 re-initialises I = round(3 / 0.888) = round(3.38) = 3
# and 32 mod 3 = 2, so layers 1-27 are partial in ToCa ('P') and aggressive in DuCa ('A'). Then r = 31 is 1
# mod 3, r = 30 full (I = round(3.26) = 3), r = 29, 28 non-full, r = 27 full; from r = 19 down to 10 the
# window range(int(0.2T), int(0.4T)) = range(10, 20) gives I = 2, and below it round(3 / (1.4 - 0.8 r/50))
# is 2 as well, so full and partial alternate to the end (r = 0 full).
TOCA_DDIM50 = "fpppPfpppfpppfpppPpfppfppfppfppfpfpfpfpfpfpfpfpfpf"  # 18 f, 30 p, 2 P
DUCA_DDIM50 = "fpapPfpapfpapfpapApfapfapfapfapfpfpfpfpfpfpfpfpfpf"  # 18 f, 22 p, 8 a, 1 P, 1 A


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
    """Written without the engine, layer by layer as the authors' DiTBlock: a layer of type 'f'
    computes everything; 'p' reuses attention and reuses the MLP where mlp_reused[i][l] (else computes
    it in full); 'a' is skipped, and a step whose last layer is 'a' reuses the last stack output."""
    store, outs = {}, []
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((x.shape[0],), 999 - 100 * i)
            h, c = model.embed(x, t, y)
            for l, block in enumerate(model.blocks):
                kind = layer_type(types[i], l)
                if kind == "a":
                    continue
                sh1, sc1, g1, sh2, sc2, g2 = block.adaLN_modulation(c).chunk(6, dim=1)
                if kind == "f":
                    store[(l, "attn")] = block.attn(modulate(block.norm1(h), sh1, sc1))
                h = h + g1.unsqueeze(1) * store[(l, "attn")]
                if kind == "f" or not mlp_reused[i][l]:
                    store[(l, "mlp")] = block.mlp(modulate(block.norm2(h), sh2, sc2))
                h = h + g2.unsqueeze(1) * store[(l, "mlp")]
            if layer_type(types[i], len(model.blocks) - 1) != "a":
                store["stack"] = h
            out = model.unpatchify(model.final_layer(store["stack"], c))
            outs.append(out)
            x = x - 0.1 * out[:, : model.in_channels]
    return outs


# -- schedules ------------------------------------------------------------------------------------
def test_ddim50_n3_types_per_layer():
    types = step_types(50, 3)
    assert types == TOCA_DDIM50
    assert (types.count("f"), types.count("p"), types.count("P")) == (18, 30, 2)
    assert [i for i, c in enumerate(types) if c.isupper()] == [4, 17]  # count-down r = 45 and 32
    assert [layer_type(types[4], l) for l in (0, 1, 27)] == ["f", "p", "p"]  # only layer 0 is full
    assert types == DUCA_DDIM50.replace("a", "p").replace("A", "P")  # DuCa splits exactly ToCa's partial layers


def test_interval_rule():
    assert interval_at(49, 50, 3) == 5  # round(3 / (1.4 - 0.8 * 49/50)) = round(4.87)
    assert interval_at(30, 50, 3) == 3  # round(3.26)
    assert interval_at(0, 50, 3) == 2  # round(3 / 1.4)
    assert [interval_at(r, 50, 3) for r in range(10, 20)] == [2] * 10  # range(int(0.2T), int(0.4T))
    # round(7 / 1.256) = 6 below the window, round(7 / 1.08) = 6 at r = 0.4T
    assert [interval_at(r, 50, 7) for r in (9, 10, 19, 20)] == [6, 2, 2, 6]
    # integer bounds: at T = 9 the window is range(1, 3), not 1.8 <= r < 3.6
    assert [interval_at(r, 9, 7) for r in (1, 2, 3)] == [2, 2, 6]  # r = 1: not round(7 / 1.31) = 5; r = 3: 6
    # float32 as the code's torch.tensor: 3 / (1.4 - 0.8 * 11/12) is 4.500000000000001 in float64 (rounds
    # to 5) and exactly 4.5 in float32, which torch.round takes to the even 4
    assert interval_at(11, 12, 3) == 4
    # ratio 0 is the code's FORA mode: I = N at every step, no window
    assert {interval_at(r, 50, 3, ratio=0.0) for r in range(50)} == {3}
    assert step_types(9, 3, ratio=0.0) == "fpfppfppf"  # r = 8 full, then every r divisible by 3


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
    # step 17 (r = 32) is 'P': layer 0 is full (k = 0), layers 1.. are partial; 0.07 * 0.44 * (0.8 + 0.4/27)
    # * 2.5 * 256 = 16.06
    assert k[17, 0] == 0 and k[17, 1] == 16 and (k[17, 1:] > 0).all()


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
    assert policy.plan(50) == TOCA_DDIM50
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
    assert policy.types == "fpfppfppf"  # ratio 0: the code's FORA intervals
    ref = reference(dit, policy.types, [[True] * dit.depth] * STEPS, x, y)
    for a, b in zip(outs, ref):
        assert torch.equal(a, b)
    assert [f for f, c in zip(report["per_step_compute_fraction"], policy.types) if c == "p"] == [0.0] * 5


def test_mixed_step_computes_layer_zero_only_and_matches_the_loop():
    """Step 4 (r = 4, "fpppPfppf") is full in layer 0, which re-initialises I = 2; layers 1, 2 are partial."""
    dit = tiny_dit()
    policy = make_policy("toca", ratio=1.0, mlp_weight=1000.0)  # a partial layer with a positive ratio takes all 16 tokens
    x, y = inputs(dit)
    outs, report = trajectory(dit, policy, x, y)
    assert policy.types[4] == "P" and policy.fresh[4].tolist() == [0, 16, 16]
    assert [policy.action(StepInfo(4, STEPS), Site(0, b)).kind for b in (Branch.ATTN, Branch.MLP)] == [Kind.COMPUTE] * 2
    assert policy.action(StepInfo(4, STEPS), Site(1, Branch.ATTN)).kind is Kind.REUSE
    # layer 0 both sub-layers, layers 1 and 2 all 16 MLP tokens: 4 of 6 sub-layer calls
    assert report["per_step_compute_fraction"][4] == pytest.approx(4 / 6, abs=1e-12)
    ref = reference(dit, policy.types, (policy.fresh == 0).tolist(), x, y)
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # permuted-row matmul rounding, as below


def test_counters_follow_the_fresh_table_and_attention_is_reused():
    dit = tiny_dit()
    policy = make_policy("toca", ratio=0.5)
    _, report = trajectory(dit, policy)
    k = policy.fresh
    full = [[layer_type(c, l) == "f" for l in range(dit.depth)] for c in policy.types]
    expected = [(2 * sum(f) + k[i].sum() / 16) / (2 * dit.depth) for i, f in enumerate(full)]
    assert report["per_step_compute_fraction"] == pytest.approx(expected, abs=1e-12)
    assert 0 < k[2].sum() < 16 * dit.depth  # a real partial step
    assert policy.action(StepInfo(2, STEPS), Site(0, Branch.ATTN)).kind is Kind.REUSE


@pytest.mark.parametrize("score,per_layer", [("attention", 2 * 16 * 32 * 32 + 16 * 16 * 32),
                                             ("vnorm", 16 * 32 * 32), ("random", 0)])
def test_scoring_cost_is_reported_for_the_full_steps_that_feed_partial_steps(score, per_layer):
    dit = tiny_dit()
    policy = make_policy("toca", ratio=0.5, score=score)
    _, report = trajectory(dit, policy)
    # "fpppPfppf": k > 0 at step 2 and 3 (all layers), 4 (layers 1, 2) and 6, 7 (all layers). Layers 1, 2
    # were last full at step 0 before that; layer 0 at step 4, but its next partial step comes after the
    # full step 5. So step 0 scores every layer and step 5 every layer; steps 4 and 8 score none.
    scored = [(i, l) for i in range(STEPS) for l in range(dit.depth) if policy.scored[i, l]]
    if score != "random":
        assert scored == [(i, l) for i in (0, 5) for l in range(dit.depth)]
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
