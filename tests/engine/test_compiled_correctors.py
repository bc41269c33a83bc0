"""Correctors under torch.compile: a step's corrections are made on the host at its start, so a
static schedule with GOC, EOC or forecast runs with no graph break, one graph per step plan, and the
eager engine's outputs bit for bit (dynamo with backends that skip code generation, as in
test_compiled.py)."""

import dataclasses

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from ditcache.correctors.eoc import EocConfig, EocCorrector
from ditcache.correctors.forecast import ForecastConfig, ForecastCorrector
from ditcache.correctors.goc import GocConfig, GocCorrector
from ditcache.engine import CacheEngine
from ditcache.engine.compiled import StaticCompileEngine
from ditcache.policies import make_policy

from ..correctors.conftest import STEPS, run_steps

COUNTED = ("compute_fraction", "macs_ratio")
pytestmark = pytest.mark.usefixtures("fresh_dynamo")


# (policy, correctors, distinct plans): "c" computed, "r" reused as stored, "x" reused corrected
CASES = {
    # FORA 2 reuses at steps 2 and 4; GOC extrapolates only at 4, so step 2 reuses as stored
    "goc": ("fora:interval=2", lambda p: [GocCorrector(GocConfig(steps=(4,)))], 3),
    "eoc": ("fora:interval=2", lambda p: [EocCorrector(EocConfig(prior=p, max_step=STEPS - 1))], 2),
    "goc+eoc": ("fora:interval=2", lambda p: [GocCorrector(GocConfig()), EocCorrector(EocConfig(prior=p, max_step=STEPS - 1))], 2),
    "forecast": ("fora:interval=3", lambda p: [ForecastCorrector(ForecastConfig(order=1))], 3),
}


def sample_with(loaded, engine, forward=None):
    with engine:
        outs = run_steps(loaded if forward is None else dataclasses.replace(loaded, module=forward), engine)
        return outs, engine.report()


@pytest.mark.parametrize("name", sorted(CASES))
def test_correctors_compile_without_breaks_and_equal_eager(loaded, prior, name):
    policy, correctors, plans = CASES[name]
    ref, ref_report = sample_with(loaded, CacheEngine(loaded.module, _policy(policy), correctors(prior)))
    backend = CompileCounter()
    engine = StaticCompileEngine(loaded.module, _policy(policy), correctors(prior))
    outs, report = sample_with(loaded, engine, torch.compile(loaded.module, backend=backend, dynamic=False))
    assert not counters["graph_break"]  # no break anywhere in a step
    assert engine.variants == plans
    assert backend.frame_count == plans + 1  # one per plan, plus the first step's (empty store)
    assert all(torch.equal(a, b) for a, b in zip(ref, outs))
    assert {k: report[k] for k in COUNTED} == {k: ref_report[k] for k in COUNTED}
    assert report["corrector_seconds"] > 0


def test_a_second_sampling_call_compiles_nothing_new(loaded, prior):
    backend = CompileCounter()
    compiled = torch.compile(loaded.module, backend=backend, dynamic=False)
    engine = StaticCompileEngine(loaded.module, make_policy("fora", interval=2), [GocCorrector(GocConfig())])
    first, _ = sample_with(loaded, engine, compiled)
    seen = backend.frame_count
    second, _ = sample_with(loaded, engine, compiled)
    assert backend.frame_count == seen and all(torch.equal(a, b) for a, b in zip(first, second))


def _policy(spec: str):
    """"fora:interval=2" -> the FORA policy with interval 2."""
    name, arg = spec.split(":")
    key, value = arg.split("=")
    return make_policy(name, **{key: int(value)})
