"""The engine: transparent when computing everything, exact when reusing, clean to remove."""

import time

import pytest
import torch

from ditcache.correctors import Corrector
from ditcache.engine import CacheEngine
from ditcache.models.dit import modulate
from ditcache.policies import make_policy
from ditcache.policies.base import Policy
from ditcache.types import COMPUTE, REUSE, Action, Branch, Kind, RunInfo, Site, StepInfo

STEPS = 6


def trajectory(model, engine=None, steps=STEPS, batch=4, seed=1):
    """A sampling-like loop: every step's input depends on the previous output."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    if engine is not None:
        engine.begin_run(RunInfo(num_steps=steps, depth=0, num_tokens=0))
    outs = []
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((batch,), 999 - 150 * i)
            if engine is not None:
                engine.begin_step(StepInfo(i, steps, int(t[0])))
            out = model(x, t, y)
            outs.append(out)
            x = x - 0.1 * out[:, : model.in_channels]
    if engine is not None:
        engine.end_run()
    return outs


def reference_trajectory(model, cached, steps=STEPS, batch=4, seed=1):
    """Written independently of the engine: reuse the stored pre-gate A / M where cached[i][l][b]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    store, outs = {}, []
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((batch,), 999 - 150 * i)
            h, c = model.embed(x, t, y)
            for l, block in enumerate(model.blocks):
                sh1, sc1, g1, sh2, sc2, g2 = block.adaLN_modulation(c).chunk(6, dim=1)
                if not cached[i][l][0]:
                    store[(l, 0)] = block.attn(modulate(block.norm1(h), sh1, sc1))
                h = h + g1.unsqueeze(1) * store[(l, 0)]
                if not cached[i][l][1]:
                    store[(l, 1)] = block.mlp(modulate(block.norm2(h), sh2, sc2))
                h = h + g2.unsqueeze(1) * store[(l, 1)]
            out = model.unpatchify(model.final_layer(h, c))
            outs.append(out)
            x = x - 0.1 * out[:, : model.in_channels]
    return outs


def test_none_policy_equals_bare_model_bit_for_bit(dit):
    bare = trajectory(dit)
    with CacheEngine(dit, make_policy("none")) as engine:
        cached = trajectory(dit, engine)
        assert engine.report()["compute_fraction"] == 1.0
        assert engine.report()["macs_ratio"] == 1.0
        assert engine.peak_bytes == 0  # nothing is stored when nothing can be reused
    for a, b in zip(bare, cached):
        assert torch.equal(a, b)


def test_remove_restores_the_model(dit):
    bare = trajectory(dit)
    engine = CacheEngine(dit, make_policy("fora", interval=2)).install()
    assert "forward" in dit.blocks[0].attn.__dict__
    trajectory(dit, engine)
    engine.remove()
    for module in dit.modules():
        assert "forward" not in module.__dict__
    assert not hasattr(dit, "_ditcache_engine")
    for a, b in zip(bare, trajectory(dit)):
        assert torch.equal(a, b)


def test_installed_engine_outside_a_run_is_the_bare_model(dit):
    bare = trajectory(dit)
    with CacheEngine(dit, make_policy("fora", interval=2)):
        for a, b in zip(bare, trajectory(dit)):  # no begin_run: wrappers call straight through
            assert torch.equal(a, b)


@pytest.mark.parametrize("spec", [("fora", {"interval": 2}), ("fora", {"interval": 3}),
                                  ("rule", {"preset": "rm-50"}), ("rule", {"preset": "rm-25"})])
def test_static_policies_match_a_hand_written_reuse_loop(dit, spec):
    name, options = spec
    policy = make_policy(name, **options)
    with CacheEngine(dit, policy) as engine:
        outs = trajectory(dit, engine)
        schedule = policy.schedule()
        report = engine.report()
    ref = reference_trajectory(dit, schedule.cached.tolist())
    for a, b in zip(outs, ref):
        assert torch.equal(a, b)
    # counters: exactly the listed sites were skipped, step by step
    expected = [1.0 - schedule.cached[i].mean() for i in range(STEPS)]
    assert report["per_step_compute_fraction"] == pytest.approx(expected, abs=0)
    assert report["compute_fraction"] == pytest.approx(1.0 - schedule.cached_fraction, abs=1e-12)
    assert schedule.cached.any()  # the case is not trivial


def test_macs_ratio_counts_only_computed_sites(dit):
    policy = make_policy("fora", interval=2)
    with CacheEngine(dit, policy) as engine:
        trajectory(dit, engine)
        r = engine.report()
    d = engine.dims
    per_forward_sites = d.depth * (d.attn_macs() + d.mlp_macs())
    full_steps = STEPS - int(policy.schedule().cached.any(axis=(1, 2)).sum())
    expected_run = STEPS * (d.forward_macs - per_forward_sites) + full_steps * per_forward_sites
    assert r["macs_run"] == 4 * expected_run  # batch 4
    assert r["macs_total"] == 4 * STEPS * d.forward_macs


def test_cache_memory_is_counted(dit):
    with CacheEngine(dit, make_policy("fora", interval=2)) as engine:
        trajectory(dit, engine)
    # every block's attention and MLP output for batch 4: (4, 16 tokens, 32) float32 each
    assert engine.peak_bytes == dit.depth * 2 * 4 * 16 * 32 * 4


class _Scripted(Policy):
    """Reuse / partial exactly where a test says."""

    name = "scripted"

    def __init__(self, plan, trunk=()):
        self.plan, self.trunk = plan, set(trunk)
        self.uses_trunk = bool(self.trunk)

    def action(self, step, site):
        return self.plan(step.index, site)

    def trunk_action(self, step):
        return REUSE if step.index in self.trunk else COMPUTE

    def may_reuse(self, site):
        return True


def _tokens(batch, idx):
    return torch.tensor([idx] * batch, dtype=torch.long)


def test_partial_with_every_token_equals_compute(dit):
    n = dit.num_patches
    full = trajectory(dit)
    plan = lambda i, s: Action.partial(_tokens(4, list(range(n)))) if (i > 0 and s.branch is Branch.MLP) else COMPUTE
    with CacheEngine(dit, _Scripted(plan)) as engine:
        outs = trajectory(dit, engine)
        assert engine.report()["compute_fraction"] == 1.0
    for a, b in zip(full, outs):
        # gather/scatter of all rows runs the same MLP on the same values; only the matmul shape's
        # blocking may differ, so allow float32 rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_partial_with_no_token_equals_reuse(dit):
    reuse = lambda i, s: REUSE if (i % 2 and s.branch is Branch.MLP) else COMPUTE
    empty = lambda i, s: Action.partial(torch.zeros(4, 0, dtype=torch.long)) if (i % 2 and s.branch is Branch.MLP) else COMPUTE
    with CacheEngine(dit, _Scripted(reuse)) as engine:
        a = trajectory(dit, engine)
    with CacheEngine(dit, _Scripted(empty)) as engine:
        b = trajectory(dit, engine)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_partial_updates_exactly_the_chosen_tokens_per_row(dit):
    """With CFG-like halves each row has its own tokens; untouched rows keep the cached values."""
    seen = {}

    class Spy(_Scripted):
        def observe(self, step, site, action, inputs, output):
            seen[(step.index, site)] = output.clone()

    picks = torch.tensor([[0, 5], [1, 2], [15, 3], [7, 7]])
    plan = lambda i, s: Action.partial(picks) if (i == 1 and s == Site(0, Branch.MLP)) else COMPUTE
    with CacheEngine(dit, Spy(plan)) as engine:
        trajectory(dit, engine, steps=2)
        assert engine.report()["per_step_compute_fraction"][1] == pytest.approx((5 + 2 / 16) / 6)  # 6 sites, one ran 2 of 16 tokens
    before, after = seen[(0, Site(0, Branch.MLP))], seen[(1, Site(0, Branch.MLP))]
    for row in range(4):
        changed = {int(j) for j in torch.nonzero((before[row] != after[row]).any(-1)).flatten()}
        assert changed == {int(j) for j in picks[row]}


def test_trunk_reuse_returns_the_stored_stack_output(dit):
    with CacheEngine(dit, _Scripted(lambda i, s: COMPUTE, trunk={2})) as engine:
        outs = trajectory(dit, engine, steps=3)
        r = engine.report()
    assert r["per_step_compute_fraction"] == [1.0, 1.0, 0.0]
    # recompute step 2 by hand: final layer on step 1's stack output with step 2's conditioning
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, dit.in_channels, dit.input_size, dit.input_size, generator=g)
    y = torch.randint(0, dit.num_classes, (4,), generator=g)
    with torch.no_grad():
        for i in range(3):
            t = torch.full((4,), 999 - 150 * i)
            h, c = dit.embed(x, t, y)
            if i < 2:
                for block in dit.blocks:
                    h = block(h, c)
                stack = h
            out = dit.unpatchify(dit.final_layer(stack, c))
            assert torch.equal(out, outs[i])
            x = x - 0.1 * out[:, : dit.in_channels]


@pytest.mark.parametrize("running", [(0,), (0, 2)])
def test_a_block_that_runs_in_a_reused_trunk_computes_its_sites_and_changes_no_output(dit, running):
    """DuCa's mixed step: block 0 runs (its sites computed and stored), the stack output is still reused,
    also when the last block runs."""
    seen = {}

    class RunsFirst(_Scripted):
        def runs_in_reused_trunk(self, step, block):
            return block in running

        def observe(self, step, site, action, inputs, output):
            seen[(step.index, site)] = action.kind

    plain = _Scripted(lambda i, s: COMPUTE, trunk={2})
    with CacheEngine(dit, plain) as engine:
        expected = trajectory(dit, engine, steps=3)
    with CacheEngine(dit, RunsFirst(lambda i, s: COMPUTE, trunk={2})) as engine:
        outs = trajectory(dit, engine, steps=3)
        fractions = engine.report()["per_step_compute_fraction"]
    assert all(torch.equal(a, b) for a, b in zip(outs, expected))  # the output is the reused stack's
    assert fractions == [1.0, 1.0, pytest.approx(len(running) / dit.depth)]  # the running blocks' sites
    assert {s: k for (i, s), k in seen.items() if i == 2} == {Site(b, br): Kind.COMPUTE for b in running
                                                             for br in (Branch.ATTN, Branch.MLP)}


def test_reuse_before_compute_is_a_clear_error(dit):
    with CacheEngine(dit, _Scripted(lambda i, s: REUSE)) as engine:
        with pytest.raises(ValueError, match="before it was ever computed"):
            trajectory(dit, engine)


def test_partial_on_attention_is_refused(dit):
    plan = lambda i, s: Action.partial(_tokens(4, [0])) if i == 1 else COMPUTE
    with CacheEngine(dit, _Scripted(plan)) as engine:
        with pytest.raises(ValueError, match="token-wise"):
            trajectory(dit, engine)


def test_installing_twice_is_refused(dit):
    with CacheEngine(dit):
        with pytest.raises(RuntimeError, match="already has an interception"):
            CacheEngine(dit).install()


def test_state_does_not_leak_between_runs(dit):
    with CacheEngine(dit, make_policy("fora", interval=2)) as engine:
        first = trajectory(dit, engine, seed=1)
        trajectory(dit, engine, seed=2)
        again = trajectory(dit, engine, seed=1)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_bind_hands_the_policy_every_site_module_and_observe_can_charge_macs(dit):
    """A policy that scores tokens gets the site modules, and the MACs it reports count as run."""

    class Charging(Policy):
        name = "charging"

        def bind(self, modules):
            self.modules = modules

        def observe(self, step, site, action, inputs, output):
            return 7 if site.branch is Branch.ATTN else None

    policy = Charging()
    with CacheEngine(dit, policy) as engine:
        trajectory(dit, engine, steps=2)
        r = engine.report()
        assert policy.modules == engine.adapter.site_modules(dit)
    assert policy.modules[Site(1, Branch.MLP)] is dit.blocks[1].mlp
    assert r["extra_macs"] == 2 * dit.depth * 7  # two steps, one charge per attention site
    assert r["macs_run"] == r["macs_total"] + r["extra_macs"]  # everything computed, plus the extra


class _Slow(Corrector):
    """An identity corrector that sleeps, so the engine's timing of corrector calls can be checked."""

    name = "slow"

    def __init__(self):
        self.corrects = self.observes = 0

    def correct(self, step, site, cached):
        self.corrects += 1
        time.sleep(0.002)
        return cached

    def observe(self, step, site, kind, used):
        self.observes += 1
        time.sleep(0.001)


def test_time_inside_correctors_is_reported(dit):
    with CacheEngine(dit, make_policy("fora", interval=2)) as engine:
        trajectory(dit, engine)
    assert engine.report()["corrector_seconds"] == 0.0  # no corrector, no timing at all
    slow = _Slow()
    with CacheEngine(dit, make_policy("fora", interval=2), [slow]) as engine:
        start = time.perf_counter()
        trajectory(dit, engine)
        total = time.perf_counter() - start
    spent = engine.report()["corrector_seconds"]
    assert slow.corrects > 0 and slow.observes == STEPS * dit.depth * 2
    # sleep() lasts at least as long as asked, and the timed calls are part of the whole run
    assert 0.002 * slow.corrects + 0.001 * slow.observes <= spent <= total


class _Scale(Corrector):
    name = "scale"

    def correct(self, step, site, cached):
        return cached * 1.0


def test_the_finite_watch_notes_only_features_a_corrector_changed(dit):
    noted = []
    for correctors in ([Corrector()], [_Scale()]):
        engine = CacheEngine(dit, make_policy("fora", interval=2), correctors).install()
        engine.finite_watch.clear = lambda: None  # keep every step's notes
        trajectory(dit, engine, steps=4)
        noted.append(len(engine.finite_watch.flags))
        reused = int(engine.policy.schedule().cached.sum())
        engine.remove()
    # the identity corrector hands every reused feature back: no sum to take; a changed one is noted
    assert reused > 0 and noted == [0, reused]
