"""Step-ahead correction: with a static schedule the engine corrects a whole step at its start
(``Corrector.correct_step``, fused ``torch._foreach_*`` work in GOC and EOC on a GPU). Whole sampling
runs equal the per-call path (``step_ahead = False``, the correctors as they were) bit for bit. On the
CPU the engine takes the per-call path by default; these tests force step-ahead with True."""

import pytest
import torch

from ditcache.correctors import Corrector, eoc, goc
from ditcache.correctors.eoc import EocConfig, EocCorrector
from ditcache.correctors.forecast import ForecastConfig, ForecastCorrector
from ditcache.correctors.goc import GocConfig, GocCorrector
from ditcache.engine import CacheEngine
from ditcache.finite import NonFiniteError
from ditcache.policies import make_policy

from ..correctors.conftest import STEPS, run_steps


RM50 = ("rule", {"preset": "rm-50"})
CASES = {
    "rm-50+goc": (RM50, lambda p: [GocCorrector(GocConfig(steps=(3, 5)))]),
    "rm-50+goc:each": (RM50, lambda p: [GocCorrector(GocConfig(branches="each"))]),
    "rm-50+eoc": (RM50, lambda p: [EocCorrector(EocConfig(prior=p))]),
    "rm-50+eoc:add,every step": (RM50, lambda p: [EocCorrector(EocConfig(prior=p, mode="add", max_step=STEPS - 1))]),
    "rm-50+goc+eoc": (RM50, lambda p: [GocCorrector(GocConfig()), EocCorrector(EocConfig(prior=p, max_step=STEPS - 1))]),
    "fora3+forecast": (("fora", {"interval": 3}), lambda p: [ForecastCorrector(ForecastConfig(order=2))]),
}


def sample_with(loaded, policy, correctors, ahead: bool, batch=2):
    name, kw = policy
    engine = CacheEngine(loaded.module, make_policy(name, **kw), correctors)
    engine.step_ahead = ahead
    engine.finite_watch.clear = lambda: None  # keep every step's notes
    with engine:
        outs = run_steps(loaded, engine, batch=batch)
        notes = [(site, name) for site, name, _ in engine.finite_watch.flags]
        return outs, engine.report(), notes


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_whole_run_equals_the_per_call_correctors_bit_for_bit(loaded, prior, case, fused, monkeypatch):
    if fused:  # the torch._foreach_* path a GPU takes, here on the CPU
        monkeypatch.setattr(goc, "FUSED_DEVICES", ("cuda", "cpu"))
        monkeypatch.setattr(eoc, "FUSED_DEVICES", ("cuda", "cpu"))
    policy, correctors = CASES[case]
    ref, ref_report, ref_notes = sample_with(loaded, policy, correctors(prior), ahead=False)
    outs, report, notes = sample_with(loaded, policy, correctors(prior), ahead=True)
    assert all(torch.equal(a, b) for a, b in zip(ref, outs))
    assert notes == ref_notes and len(notes) > 0  # the same features checked, in the same order
    assert report["macs_ratio"] == ref_report["macs_ratio"] and report["corrector_seconds"] > 0


class _Counting(Corrector):
    name = "counting"
    ahead = True

    def __init__(self):
        self.steps, self.calls = [], 0

    def correct_step(self, step, sites, features):
        self.steps.append(step.index)
        return super().correct_step(step, sites, features)

    def correct(self, step, site, cached):
        self.calls += 1
        return cached * 1.0


def test_a_static_schedule_is_corrected_once_per_step_at_its_start(loaded):
    counting = _Counting()
    sample_with(loaded, RM50, [counting], ahead=True)
    reused = [1, 3, 5]  # rm-50 at 6 steps
    assert counting.steps == reused and counting.calls == len(reused) * 2 * loaded.module.depth


def test_a_dynamic_policy_keeps_the_per_call_path(loaded):
    counting = _Counting()
    engine = CacheEngine(loaded.module, make_policy("toca"), [counting])
    engine.step_ahead = True
    with engine:
        run_steps(loaded, engine)
    assert counting.steps == [] and counting.calls > 0


def test_on_the_cpu_the_default_is_the_per_call_path(loaded):
    counting = _Counting()
    engine = CacheEngine(loaded.module, make_policy("rule", preset="rm-50"), [counting])
    assert engine.step_ahead is None
    with engine:
        run_steps(loaded, engine)
    assert counting.steps == [] and counting.calls > 0


def test_a_non_finite_correction_names_the_same_site_and_corrector(loaded):
    messages = []
    for ahead in (False, True):
        with pytest.raises(NonFiniteError) as err:
            sample_with(loaded, RM50, [GocCorrector(GocConfig(w=1e300))], ahead=ahead)
        messages.append(str(err.value))
    assert "corrector goc" in messages[0] and messages[0] == messages[1]


def test_the_step_corrections_are_counted_in_cache_memory(loaded, prior):
    peaks = [sample_with(loaded, RM50, [EocCorrector(EocConfig(prior=prior, max_step=STEPS - 1))], ahead)[1]
             ["cache_peak_bytes"] for ahead in (False, True)]
    # the step's corrected features exist together at its start: up to one step of reused features more
    assert peaks[1] > peaks[0]
