"""GOC: the gradient queue by hand, identity at w 0, allowed steps, inflection detection, EOC order."""

import dataclasses

import numpy as np
import pytest
import torch

from ditcache.calibration.artifact import Artifact
from ditcache.calibration.prior import PRIOR_KIND, Prior
from ditcache.correctors.base import CORRECTORS
from ditcache.correctors.eoc import EocConfig, EocCorrector
from ditcache.correctors.goc import (PRESETS, GocConfig, GocCorrector, direction_cosines, excluded_steps,
                                     inflection_steps)
from ditcache.engine import CacheEngine
from ditcache.policies import make_policy
from ditcache.policies.l2c import preset_schedule
from ditcache.policies.rule import schedule_policy
from ditcache.policies.schedule import Schedule
from ditcache.registry import parse_spec
from ditcache.types import BRANCHES, Branch, Kind, Site, StepInfo

from .conftest import KEY, STEPS, run_for, run_steps, save_prior

A0, M0 = Site(0, Branch.ATTN), Site(0, Branch.MLP)
COMPUTE, REUSE = Kind.COMPUTE, Kind.REUSE


def call(correctors, step, site, kind, feature, num_steps=KEY.steps):
    """What the engine does at one site call: correct in order on REUSE, then let every corrector observe."""
    info = StepInfo(step, num_steps)
    out = feature
    if kind is REUSE:
        for c in correctors:
            out = c.correct(info, site, out)
    for c in correctors:
        c.observe(info, site, kind, out)
    return out


def test_hand_computed_queue_with_a_corrected_entry_feeding_the_next_gradient():
    goc = GocCorrector(GocConfig(w=0.5, branches="each"))
    goc.reset(run_for(dataclasses.replace(KEY, steps=8)))
    a, b, c = torch.tensor([[1.0, -1.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([[4.0, 8.0]])
    assert call([goc], 0, A0, COMPUTE, a) is a
    assert call([goc], 1, A0, REUSE, a) is a  # one history entry: plain reuse
    call([goc], 2, A0, COMPUTE, b)
    u3 = call([goc], 3, A0, REUSE, b)  # Q = [a, b]
    assert torch.equal(u3, torch.tensor([[2.5, 0.5]]))  # b + 0.5 (b - a)
    u4 = call([goc], 4, A0, REUSE, b)  # Q = [b, u3]: the corrected u3 is the newest entry
    assert torch.equal(u4, torch.tensor([[2.75, 0.75]]))  # u3 + 0.5 (u3 - b)
    call([goc], 5, A0, COMPUTE, c)
    u6 = call([goc], 6, A0, REUSE, c)  # Q = [u4, c]: the corrected u4 is the older entry
    assert torch.equal(u6, torch.tensor([[4.625, 11.625]]))  # c + 0.5 (c - u4)


@pytest.mark.parametrize("allowed,expected", [((3,), [2.0]), ((2,), [2.5])])
def test_steps_outside_the_allowed_set_are_plain_reuse(allowed, expected):
    goc = GocCorrector(GocConfig(w=0.5, steps=allowed, branches="each"))
    goc.reset(run_for(dataclasses.replace(KEY, steps=8)))
    a, b = torch.tensor([1.0]), torch.tensor([2.0])
    call([goc], 0, A0, COMPUTE, a)
    call([goc], 1, A0, COMPUTE, b)
    out = call([goc], 2, A0, REUSE, b)  # Q = [a, b]: b + 0.5 (b - a) = 2.5 where allowed
    assert torch.equal(out, torch.tensor(expected))
    assert (out is b) == (2 not in allowed)


@pytest.mark.parametrize("policy", [("rule", {"preset": "rm-50"}), ("fora", {"interval": 3})])
def test_w_zero_equals_plain_reuse_bit_for_bit(loaded, policy):
    name, options = policy
    with CacheEngine(loaded.module, make_policy(name, **options)) as engine:
        base = run_steps(loaded, engine)
    with CacheEngine(loaded.module, make_policy(name, **options), [GocCorrector(GocConfig(w=0.0))]) as engine:
        outs = run_steps(loaded, engine)
    for x, y in zip(base, outs):
        assert torch.equal(x, y)
    with CacheEngine(loaded.module, make_policy(name, **options), [GocCorrector(GocConfig())]) as engine:
        assert not torch.equal(run_steps(loaded, engine)[-1], base[-1])  # w 1.2 does change the samples


def test_queue_memory_is_counted_once_per_tensor():
    goc = GocCorrector(GocConfig(w=0.5, branches="each"))
    goc.reset(run_for(dataclasses.replace(KEY, steps=8)))
    a, b = torch.zeros(2, 3), torch.ones(2, 3)  # 24 bytes each
    call([goc], 0, A0, COMPUTE, a)
    call([goc], 0, M0, COMPUTE, a.clone())
    assert goc.memory_bytes() == 48  # not reused yet: the engine may not keep them, so they count
    call([goc], 1, A0, REUSE, a)
    call([goc], 1, M0, COMPUTE, b)
    assert goc.memory_bytes() == 48  # A0: Q = [a, a] is the stored feature, counted by the engine; M0: both
    call([goc], 2, A0, COMPUTE, b.clone())
    call([goc], 3, A0, REUSE, goc._stored[A0])
    assert goc.memory_bytes() == 24 + 48  # A0: Q = [stored, new extrapolation]; M0 unchanged


def test_queue_memory_reaches_the_engine(loaded):
    goc = GocCorrector(GocConfig())
    with CacheEngine(loaded.module, make_policy("rule", preset="rm-50"), [goc]) as engine:
        run_steps(loaded, engine, steps=4)
        store = sum(t.numel() * t.element_size() for t in engine.store.values())
        assert goc.memory_bytes() > 0 and engine.memory_bytes() == store + goc.memory_bytes()


def flip_prior(vertex=4, steps=8):
    """Every site's mean moves along +d until ``vertex`` and back along -d after it, while drifting slowly
    along an orthogonal e that never reverses; one site does not move at all."""
    up = [min(t, vertex) * (min(t, vertex) + 1) / 2 for t in range(steps)]  # 0, 1, 3, 6, 10 (growing steps)
    along = torch.tensor([u - (t - vertex) * (t - vertex + 1) / 2 if t > vertex else u for t, u in enumerate(up)])
    drift = 0.05 * torch.arange(steps, dtype=torch.float32) ** 2
    means = {}
    for branch in ("attn", "mlp"):
        m = torch.zeros(steps, 2, 1, 2, 3)  # (S, L, H, N, C)
        for block in range(2):
            if (branch, block) == ("mlp", 1):
                continue
            flat = m[:, block].view(steps, 6)
            flat[:, block] = along
            flat[:, 5 - block] = drift
        means[branch] = m
    return Prior(Artifact(PRIOR_KIND, dataclasses.replace(KEY, steps=steps, cfg_scale=1.0), means))


def test_detection_flags_a_constructed_flip_exactly():
    prior = flip_prior(vertex=4)
    cos = direction_cosines(prior)
    assert cos[0] is None and cos[-1] is None
    assert inflection_steps(cos) == [4]
    assert all(c > 0 for v, c in enumerate(cos) if c is not None and v != 4)
    assert excluded_steps([4], 8) == [4, 5, 6]


def test_detection_from_a_prior_artifact(tmp_path):
    prior = flip_prior(vertex=4)
    path = save_prior(tmp_path / "flip", prior.means["attn"], prior.means["mlp"], prior.key)
    goc = parse_spec(CORRECTORS, f"goc:prior={path}")
    goc.reset(run_for(prior.key, depth=2, tokens=2))
    assert goc.allowed == {0, 1, 2, 3, 7}
    with pytest.raises(ValueError, match="sampler"):
        goc.reset(run_for(dataclasses.replace(prior.key, sampler="ddpm"), depth=2, tokens=2))


def test_published_rm50_set_is_one_inflection_at_16():
    excluded = set(excluded_steps([16], 20))
    cached = range(1, 20, 2)
    assert tuple(t for t in cached if t >= 2 and t not in excluded) == PRESETS["rm-50"]


def test_presets_specs_and_validation():
    goc = parse_spec(CORRECTORS, "goc:w=0.8,steps=3/5/7")
    assert goc.config == GocConfig(w=0.8, steps=(3, 5, 7))
    assert goc.describe()["steps"] == "3/5/7"
    goc = parse_spec(CORRECTORS, "goc:preset=rm-25")
    goc.reset(run_for(dataclasses.replace(KEY, steps=20)))
    assert goc.allowed == {3, 5, 7, 9}
    with pytest.raises(ValueError, match="20-step"):
        goc.reset(run_for(dataclasses.replace(KEY, steps=6)))
    with pytest.raises(ValueError, match="at most one"):
        parse_spec(CORRECTORS, "goc:steps=3,preset=rm-50")
    with pytest.raises(ValueError, match="preset"):
        parse_spec(CORRECTORS, "goc:preset=rm-33")
    with pytest.raises(ValueError, match="outside"):
        parse_spec(CORRECTORS, "goc:steps=3/9").reset(run_for(KEY))


def test_goc_then_eoc_matches_a_hand_computation(tmp_path):
    """used = (Q0 + w (Q0 - Q1)) * (1 + gamma (P[t] - P[s])); P = t on the cond half, 2t on the uncond one."""
    attn = torch.arange(5.0).view(5, 1, 1, 1, 1) * torch.tensor([1.0, 2.0]).view(1, 1, 2, 1, 1)  # (S, L, 2, 1, 1)
    prior = save_prior(tmp_path / "lin", attn, torch.zeros_like(attn))
    goc, eoc = GocCorrector(GocConfig(w=0.5, branches="each")), EocCorrector(EocConfig(prior=prior, gamma=0.5, max_step=4))
    chain = [goc, eoc]
    for c in chain:
        c.reset(run_for())
    a, b = torch.tensor([1.0, 2.0]).view(2, 1, 1), torch.tensor([2.0, 4.0]).view(2, 1, 1)  # (cond; uncond)
    call(chain, 0, A0, COMPUTE, a)
    call(chain, 1, A0, COMPUTE, b)
    u2 = call(chain, 2, A0, REUSE, b)
    # GOC: b + 0.5 (b - a) = [2.5, 5]; EOC: T = P[2] - P[1] = [1, 2] -> x (1.5, 2)
    assert torch.equal(u2, torch.tensor([3.75, 10.0]).view(2, 1, 1))
    u3 = call(chain, 3, A0, REUSE, b)
    # GOC: u2 + 0.5 (u2 - b) = [4.625, 13]; EOC: T = P[3] - P[1] = [2, 4] -> x (2, 3)
    assert torch.equal(u3, torch.tensor([9.25, 39.0]).view(2, 1, 1))


def test_eoc_before_goc_is_refused(loaded, prior_path):
    eoc = EocCorrector(EocConfig(prior=prior_path, max_step=STEPS))
    with CacheEngine(loaded.module, make_policy("rule", preset="rm-50"), [eoc, GocCorrector(GocConfig())]) as engine:
        with pytest.raises(ValueError, match="goc must be the first corrector"):
            run_steps(loaded, engine)
    with CacheEngine(loaded.module, make_policy("rule", preset="rm-50"), [GocCorrector(GocConfig()), eoc]) as engine:
        assert len(run_steps(loaded, engine)) == STEPS


# -- which reused sites are compensated: both branches of a block (released L2C code) or each ---------
class Counting(GocCorrector):
    """GOC that records the (step, site) of every compensated (not plainly reused) feature."""

    def __init__(self, config):
        super().__init__(config)
        self.hits = []

    def correct(self, step, site, cached):
        out = super().correct(step, site, cached)
        if out is not cached:
            self.hits.append((step.index, site))
        return out


@pytest.mark.parametrize("branches,expected", [("both", 168), ("each", 191)])
def test_published_l2c_ddim20_schedule_compensates_168_sublayers_under_both(branches, expected):
    """The published DDIM-20 router reuses 191 sub-layers at the l2c preset's steps {3, 5, ..., 15, 19}; in 84
    blocks both branches are reused (168 sub-layers), which is all the released dynamic_models.py compensates."""
    schedule = preset_schedule("dit-xl2-ddim20")
    goc = Counting(GocConfig(w=0.8, preset="l2c", branches=branches))
    goc.bind(schedule)
    goc.reset(run_for(dataclasses.replace(KEY, steps=20), depth=28))
    feature = torch.zeros(1)
    for step in range(20):  # every site is called at every step, as the engine does
        for block in range(28):
            for b, branch in enumerate(BRANCHES):
                kind = REUSE if schedule.cached[step, block, b] else COMPUTE
                call([goc], step, Site(block, branch), kind, goc._stored.get(Site(block, branch), feature) if
                     kind is REUSE else torch.full((1,), float(step)), num_steps=20)
    assert len(goc.hits) == expected
    assert all(schedule.cached[t, s.block].all() for t, s in goc.hits) == (branches == "both")


def one_branch_schedule(steps=STEPS, depth=3):
    """Odd steps reuse block 0 whole, block 1's attention only and block 2's MLP only."""
    cached = np.zeros((steps, depth, 2), dtype=bool)
    cached[1::2, 0] = True
    cached[1::2, 1, 0] = True
    cached[1::2, 2, 1] = True
    return Schedule(cached, "one-branch")


def test_the_engine_hands_the_schedule_over_and_both_skips_single_branch_blocks(loaded):
    hits = {}
    for branches in ("both", "each"):
        goc = Counting(GocConfig(branches=branches))
        with CacheEngine(loaded.module, schedule_policy(one_branch_schedule()), [goc]) as engine:
            run_steps(loaded, engine)
        hits[branches] = sorted(set(goc.hits))
    # steps 3 and 5 have two entries of history; step 1 has one
    assert hits["both"] == [(t, Site(0, b)) for t in (3, 5) for b in BRANCHES]
    assert hits["each"] == sorted(hits["both"] + [(t, s) for t in (3, 5) for s in (Site(1, Branch.ATTN), Site(2, Branch.MLP))])


def test_whole_block_schedules_are_the_same_under_both_rules(loaded):
    outs = {}
    for branches in ("both", "each"):
        with CacheEngine(loaded.module, make_policy("rule", preset="rm-50"), [GocCorrector(GocConfig(branches=branches))]) as engine:
            outs[branches] = run_steps(loaded, engine)
    assert all(torch.equal(a, b) for a, b in zip(outs["both"], outs["each"]))


def test_both_with_a_dynamic_policy_is_a_clear_error(loaded):
    with CacheEngine(loaded.module, make_policy("toca", ratio=0.5), [GocCorrector(GocConfig())]) as engine:
        with pytest.raises(ValueError, match="branches=each"):
            run_steps(loaded, engine)
    with CacheEngine(loaded.module, make_policy("toca", ratio=0.5), [GocCorrector(GocConfig(branches="each"))]) as engine:
        assert len(run_steps(loaded, engine)) == STEPS
    with pytest.raises(ValueError, match="branches"):
        parse_spec(CORRECTORS, "goc:branches=attn")


def test_extrapolation_is_bit_identical_to_the_formula_and_leaves_the_queue_alone():
    w = 1.2
    goc = GocCorrector(GocConfig(w=w, branches="each"))
    goc.reset(run_for(dataclasses.replace(KEY, steps=8)))
    g = torch.Generator().manual_seed(0)
    q1, q0 = torch.randn(4, 16, 32, generator=g), torch.randn(4, 16, 32, generator=g) * 1e3
    call([goc], 0, A0, COMPUTE, q1)
    call([goc], 1, A0, COMPUTE, q0)
    keep1, keep0 = q1.clone(), q0.clone()
    out = goc.correct(StepInfo(2, 8, 0), A0, q0)
    assert torch.equal(out, q0 + w * (q0 - q1))  # the paper's expression, evaluated plainly
    assert torch.equal(q1, keep1) and torch.equal(q0, keep0) and out is not q0
