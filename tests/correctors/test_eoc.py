"""EOC: exact trend maths, identity at gamma 0, branch / step limits, key checks, FORA gaps."""

import dataclasses

import pytest
import torch

from ditcache.calibration.prior import load_prior
from ditcache.correctors.base import CORRECTORS
from ditcache.correctors.eoc import EocConfig, EocCorrector, eoc_plan
from ditcache.engine import CacheEngine
from ditcache.policies import make_policy
from ditcache.policies.schedule import step_schedule
from ditcache.registry import parse_spec
from ditcache.types import Branch, Kind, Site, StepInfo

from .conftest import KEY, STEPS, Spy, run_for, run_steps, save_prior

A0, M0 = Site(0, Branch.ATTN), Site(0, Branch.MLP)


def hand_prior(tmp_path):
    """S=5, L=1, H=2 (cond, uncond), N=1, C=2; attn trend P[1]-P[0] = [[1, -2]], [[0, 4]]."""
    attn = torch.zeros(5, 1, 2, 1, 2)
    attn[0, 0] = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])
    attn[1, 0] = torch.tensor([[[2.0, 0.0]], [[3.0, 8.0]]])
    mlp = torch.zeros(5, 1, 2, 1, 2)
    return save_prior(tmp_path / "hand", attn, mlp)


@pytest.mark.parametrize("mode,expected", [
    # rows 0-1 are the conditional half (trend [1, -2]), rows 2-3 the unconditional one ([0, 4]);
    # gamma 0.5 and these integers keep every product exact in float32
    ("mul", [[15.0, 0.0], [30.0, 0.0], [30.0, 90.0], [40.0, 120.0]]),  # c * (1 + 0.5 T)
    ("add", [[10.5, 9.0], [20.5, 19.0], [30.0, 32.0], [40.0, 42.0]]),  # c + 0.5 T
])
def test_hand_computed_correction_with_cfg_halves(tmp_path, mode, expected):
    eoc = EocCorrector(EocConfig(prior=hand_prior(tmp_path), gamma=0.5, mode=mode, max_step=4))
    eoc.reset(run_for())
    cached = torch.tensor([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0], [40.0, 40.0]]).view(4, 1, 2)  # (2B, N, C)
    eoc.observe(StepInfo(0, 5), A0, Kind.COMPUTE, cached)
    out = eoc.correct(StepInfo(1, 5), A0, cached)
    assert torch.equal(out, torch.tensor(expected).view(4, 1, 2))


def test_score_is_eq6_with_one_step_normaliser(tmp_path):
    """Block 0: attn +1 per step, MLP flat -> E = 0.5; block 1: attn +2 per step -> E = 1 = E_ref."""
    attn = torch.zeros(5, 2, 1, 1, 1)
    attn[:, 0] = torch.arange(5.0).view(5, 1, 1, 1)
    attn[:, 1] = 2 * torch.arange(5.0).view(5, 1, 1, 1)
    mlp = torch.zeros(5, 2, 1, 1, 1)
    key = dataclasses.replace(KEY, cfg_scale=1.0)
    path = save_prior(tmp_path / "p", attn, mlp, key)
    schedule = step_schedule(5, 2, [1, 3, 4], "test")  # step 4 reuses a feature computed at step 2
    plan = eoc_plan(EocConfig(prior=path, lam=0.5, tau=0.6), run_for(key, depth=2), schedule)
    got = {(e.step, e.block): (e.score, e.optimised) for e in plan}
    # S = 0.5 * E / 1 + 0.5 * (1 - t / 4); the step-4 gap spans two steps, so its E doubles
    assert got == {(1, 0): (0.625, True), (1, 1): (0.875, True), (3, 0): (0.375, False), (3, 1): (0.625, True),
                   (4, 0): (0.5, False), (4, 1): (1.0, True)}
    assert all(e.branches == (("attn", "mlp") if e.optimised else ()) for e in plan)


@pytest.mark.parametrize("mode", ["mul", "add"])
def test_gamma_zero_equals_the_base_policy_bit_for_bit(loaded, prior_path, mode):
    with CacheEngine(loaded.module, make_policy("rule", preset="rm-50")) as engine:
        base = run_steps(loaded, engine)
    eoc = EocCorrector(EocConfig(prior=prior_path, gamma=0.0, mode=mode, max_step=STEPS))
    with CacheEngine(loaded.module, make_policy("rule", preset="rm-50"), [eoc]) as engine:
        outs = run_steps(loaded, engine)
    assert len(outs) == STEPS
    for a, b in zip(base, outs):
        assert torch.equal(a, b)
    with CacheEngine(loaded.module, make_policy("rule", preset="rm-50"),
                     [EocCorrector(EocConfig(prior=prior_path, max_step=STEPS))]) as engine:
        corrected = run_steps(loaded, engine)
    assert not torch.equal(corrected[-1], base[-1])  # gamma 0.01 does change the samples


def spied(loaded, prior_path, policy, **options):
    """Run with [spy_in, eoc, spy_out]; returns (inputs, outputs) of eoc at every reuse, and eoc."""
    before, after = Spy(), Spy()
    eoc = EocCorrector(EocConfig(prior=prior_path, **options))
    with CacheEngine(loaded.module, policy, [before, eoc, after]) as engine:
        run_steps(loaded, engine)
    assert before.seen.keys() == after.seen.keys() and before.seen
    return before.seen, after.seen, eoc


def test_branches_attn_leaves_mlp_reuse_untouched(loaded, prior_path):
    seen_in, seen_out, _ = spied(loaded, prior_path, make_policy("rule", preset="rm-50"), branches="attn",
                                 max_step=STEPS)
    for key, x in seen_in.items():
        if key[1].branch is Branch.MLP:
            assert seen_out[key] is x
        else:
            assert not torch.equal(seen_out[key], x)


def test_max_step_only_touches_steps_up_to_k(loaded, prior_path):
    seen_in, seen_out, _ = spied(loaded, prior_path, make_policy("rule", preset="rm-50"), max_step=3)
    steps = {k[0] for k in seen_in}
    assert steps == {1, 3, 5}
    for key, x in seen_in.items():
        if key[0] <= 3:
            assert not torch.equal(seen_out[key], x)
        else:
            assert seen_out[key] is x


def test_max_step_corrects_without_reading_the_prior_for_scores(loaded, prior_path):
    """With the paper's ablation rule the score is not needed: no |T| mean (a pass and a sync per
    site and step) is taken while sampling; the plan still reports the scores."""
    policy = make_policy("rule", preset="rm-50")
    _, _, eoc = spied(loaded, prior_path, policy, max_step=3)
    assert eoc._errors == {} and eoc._error_ref is None and len(eoc._factors) > 0
    entries = eoc.plan(policy.schedule())
    assert all(e.score > 0 for e in entries) and eoc._error_ref > 0
    assert {(e.step, e.optimised) for e in entries} == {(1, True), (3, True), (5, False)}


def test_fora_interval_3_trend_spans_the_whole_gap(loaded, prior_path):
    """FORA N=3 at 6 steps computes at 0, 2, 5: step 4 reuses step 2's feature, trend P[4] - P[2]."""
    seen_in, seen_out, eoc = spied(loaded, prior_path, make_policy("fora", interval=3), gamma=0.25, max_step=STEPS)
    assert {k[0] for k in seen_in} == {1, 3, 4}
    prior = load_prior(prior_path)
    for (step, site), x in seen_in.items():
        since = {1: 0, 3: 2, 4: 2}[step]
        means = prior.means[site.branch.value]  # (S, L, H, N, C)
        trend = means[step, site.block] - means[since, site.block]  # (2, N, C)
        expected = (x.view(2, -1, *x.shape[1:]) * (1 + 0.25 * trend.unsqueeze(1))).view_as(x)
        # the same elementwise float32 operations in the same order: equal bit for bit
        assert torch.equal(seen_out[(step, site)], expected)


def test_runtime_decisions_follow_the_plan_with_default_lam_tau(loaded, prior_path):
    policy = make_policy("rule", preset="rm-50")
    seen_in, seen_out, eoc = spied(loaded, prior_path, policy)
    changed = {(s, site.block) for (s, site), x in seen_in.items() if not torch.equal(seen_out[(s, site)], x)}
    planned = {(e.step, e.block) for e in eoc.plan(policy.schedule()) if e.optimised}
    assert changed == planned
    assert {s for s, _ in planned} <= {1, 3}  # the second half of a 6-step run (t = 5) is never corrected


@pytest.mark.parametrize("field,value", [("model_fingerprint", "0" * 16), ("sampler", "ddpm"), ("steps", 7),
                                         ("cfg_scale", 4.0), ("resolution", 16)])
def test_a_prior_for_other_settings_is_refused(tmp_path, field, value):
    eoc = EocCorrector(EocConfig(prior=hand_prior(tmp_path)))
    with pytest.raises(ValueError, match=field):
        eoc.reset(run_for(dataclasses.replace(KEY, **{field: value})))


def test_a_prior_checked_again_on_every_run(tmp_path):
    eoc = EocCorrector(EocConfig(prior=hand_prior(tmp_path)))
    eoc.reset(run_for())
    with pytest.raises(ValueError, match="sampler"):
        eoc.reset(run_for(dataclasses.replace(KEY, sampler="ddpm")))


def test_spec_and_validation(tmp_path):
    path = hand_prior(tmp_path)
    eoc = parse_spec(CORRECTORS, f"eoc:prior={path},gamma=0.005,mode=add,branches=mlp,max_step=3")
    assert eoc.config == EocConfig(prior=path, gamma=0.005, mode="add", branches="mlp", max_step=3)
    with pytest.raises(ValueError, match="mode"):
        parse_spec(CORRECTORS, f"eoc:prior={path},mode=ratio")
    with pytest.raises(ValueError, match="needs prior"):
        parse_spec(CORRECTORS, "eoc")
    with pytest.raises(FileNotFoundError, match="calibrate eoc"):
        parse_spec(CORRECTORS, f"eoc:prior={tmp_path / 'nothing'}")
    for gamma in ("nan", "inf", "-inf"):
        with pytest.raises(ValueError, match=f"eoc gamma must be a finite number, got {gamma}"):
            parse_spec(CORRECTORS, f"eoc:prior={path},gamma={gamma}")


def test_memory_counts_the_prior(tmp_path):
    eoc = EocCorrector(EocConfig(prior=hand_prior(tmp_path)))
    assert eoc.memory_bytes() == 0
    eoc.reset(run_for())
    assert eoc.memory_bytes() == 2 * 5 * 2 * 2 * 4  # two branches of (5, 1, 2, 1, 2) float32


def test_the_trend_factor_is_made_once_and_counted(tmp_path):
    eoc = EocCorrector(EocConfig(prior=hand_prior(tmp_path), gamma=0.5, max_step=4))
    eoc.reset(run_for())
    prior_bytes = eoc.memory_bytes()
    cached = torch.tensor([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0], [40.0, 40.0]]).view(4, 1, 2)  # (2B, N, C)
    eoc.observe(StepInfo(0, 5), A0, Kind.COMPUTE, cached)
    first = eoc.correct(StepInfo(1, 5), A0, cached)
    assert eoc.memory_bytes() == prior_bytes + 2 * 1 * 2 * 4  # one (H, N, C) float32 factor
    eoc.reset(run_for())  # a later run (or batch) finds it made
    eoc.observe(StepInfo(0, 5), A0, Kind.COMPUTE, cached)
    assert torch.equal(eoc.correct(StepInfo(1, 5), A0, cached), first)
    assert eoc.memory_bytes() == prior_bytes + 2 * 1 * 2 * 4
