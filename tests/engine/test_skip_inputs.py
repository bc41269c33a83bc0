"""A reused site's input module (its norm and modulation) runs on one token (``CacheEngine.skip_inputs``).

The block throws that input away when the site is reused, so whole runs must equal the engine with
full inputs bit for bit, on our DiT, diffusers' DiT and PixArt, with and without correctors; the
site module must see one token exactly at the sites the schedule reuses, and full inputs
everywhere else (computed sites, dynamic policies, policies that observe inputs, the option off).
"""

import numpy as np
import pytest
import torch

import ditcache
from ditcache.correctors.goc import GocConfig, GocCorrector
from ditcache.engine import CacheEngine
from ditcache.pipelines.toy import dit_pipeline, pixart_pipeline
from ditcache.policies import make_policy
from ditcache.policies.schedule import Schedule
from ditcache.policies.static import StaticPolicy
from ditcache.tune.steps import ChangeRecorder
from ditcache.types import WITH_CROSS

from ..correctors.conftest import STEPS, run_steps
from ..pipelines.test_enable import run_dit, run_pixart


class Fixed(StaticPolicy):
    """A hand-written schedule, including blocks that reuse one branch and compute the other."""

    name = "fixed"

    def __init__(self, cached):
        self.cached = np.asarray(cached, dtype=bool)

    def build(self, run):
        return Schedule(self.cached)


def mixed_schedule(steps: int, depth: int, columns: int) -> np.ndarray:
    """Every other step reuses; on odd blocks only the first branch (attention), on even ones all."""
    cached = np.zeros((steps, depth, columns), dtype=bool)
    for s in range(1, steps, 2):
        for b in range(depth):
            cached[s, b] = True if b % 2 == 0 else [True] + [False] * (columns - 1)
    return cached


class InputShapes:
    """Records the token count each site module is called with, per (call, site)."""

    def __init__(self, sites: dict):
        self.seen: list[tuple[object, int]] = []
        self._hooks = [m.register_forward_pre_hook(self._hook(site)) for site, m in sites.items()]

    def _hook(self, site):
        def hook(module, args, kwargs=None):
            x = args[0] if args else kwargs["hidden_states"]
            self.seen.append((site, x.shape[1]))

        return hook

    def remove(self):
        for h in self._hooks:
            h.remove()


def dit_run(loaded, policy, correctors=(), skip=True):
    engine = CacheEngine(loaded.module, policy, correctors)
    engine.skip_inputs = skip
    shapes = InputShapes(engine.adapter.site_modules(loaded.module))
    with engine:
        outs = run_steps(loaded, engine)
        report = engine.report()
    shapes.remove()
    return outs, report, shapes.seen


@pytest.mark.parametrize("case", ["rm-50", "fora-3+goc", "mixed"])
def test_our_dit_runs_equal_full_inputs_bit_for_bit_and_reused_sites_get_one_token(loaded, case):
    depth, tokens = len(loaded.module.blocks), loaded.module.num_patches

    def policy():
        if case == "mixed":
            return Fixed(mixed_schedule(STEPS, depth, 2)), []
        if case == "rm-50":
            return make_policy("rule", preset="rm-50"), []
        return make_policy("fora", interval=3), [GocCorrector(GocConfig(branches="each"))]

    ref, ref_report, full = dit_run(loaded, *policy(), skip=False)
    outs, report, seen = dit_run(loaded, *policy())
    assert all(torch.equal(a, b) for a, b in zip(ref, outs))
    assert report["macs_ratio"] == ref_report["macs_ratio"] < 1
    assert {n for _, n in full} == {tokens}  # the option off: every call in full
    p, _ = policy()
    p.reset(ditcache.types.RunInfo(num_steps=STEPS, depth=depth, num_tokens=tokens))
    per_step = 2 * depth  # the site calls of one step, in block order
    for i, (site, n) in enumerate(seen):
        reused = p.schedule().is_cached(i // per_step, site)
        assert n == (1 if reused else tokens), (i // per_step, site, n)


def test_dynamic_and_observing_policies_keep_full_inputs(loaded):
    tokens = loaded.module.num_patches
    _, report, seen = dit_run(loaded, make_policy("toca"))
    assert report["macs_ratio"] < 1 and {n for _, n in seen} == {tokens}  # ToCa picks its tokens itself
    _, _, seen = dit_run(loaded, ChangeRecorder())
    assert {n for _, n in seen} == {tokens}


def _pipeline_case(pipe, run, columns, skip, **kw):
    depth = len(pipe.transformer.transformer_blocks)
    steps = kw.pop("steps")
    handle = ditcache.enable(pipe, Fixed(mixed_schedule(steps, depth, columns)), [GocCorrector(GocConfig(branches="each"))])
    handle.engine.skip_inputs = skip
    shapes = InputShapes(handle.engine.adapter.site_modules(pipe.transformer))
    with handle:
        images = run(pipe, steps=steps, **kw)
    shapes.remove()
    return images, shapes.seen, handle.reports[-1]


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_diffusers_pipelines_equal_full_inputs_bit_for_bit(family):
    if family == "dit":
        pipe, run, columns, steps = dit_pipeline(), run_dit, 2, 5
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe, run, columns, steps = pixart_pipeline(), run_pixart, 3, 4
    ref, full, ref_report = _pipeline_case(pipe, run, columns, skip=False, steps=steps)
    images, seen, report = _pipeline_case(pipe, run, columns, skip=True, steps=steps)
    assert np.array_equal(ref, images)
    assert report["macs_ratio"] == ref_report["macs_ratio"] < 1
    ones = [site for site, n in seen if n == 1]
    assert len(ones) > 0 and len({n for _, n in full}) == 1 and 1 not in {n for _, n in full}
    # the reused attention sites get one token; cross-attention reads the stream itself (no input module)
    assert all(site.branch is not WITH_CROSS[2] for site in ones)
