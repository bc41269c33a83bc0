"""Static schedules under torch.compile: no graph break, one variant per step kind, eager's numbers.

Dynamo is exercised with backends that skip code generation (a counting backend, "eager",
"aot_eager"): they trace, guard and recompile exactly as inductor does, in a fraction of the time.
"""

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from ditcache.correctors import Corrector
from ditcache.engine import CacheEngine
from ditcache.engine.compiled import StaticCompileEngine, compile_cached
from ditcache.policies import make_policy
from ditcache.policies.rule import schedule_policy
from ditcache.policies.schedule import Schedule

from .test_engine import trajectory

STEPS = 10
pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def mixed_schedule(depth=3):
    """Per-site reuse that differs from block to block: 4 distinct rows over 10 steps."""
    rows = {0: [], 1: [(0, 0)], 2: [(b, r) for b in range(depth) for r in (0, 1)], 3: [],
            4: [(0, 0)], 5: [(2, 1)], 6: [], 7: [(0, 0)], 8: [(2, 1)], 9: []}
    cached = np.zeros((STEPS, depth, 2), dtype=bool)
    for step, sites in rows.items():
        for block, branch in sites:
            cached[step, block, branch] = True
    return Schedule(cached, name="mixed")


def run(model, engine_cls, policy, forward=None):
    engine = engine_cls(model, policy).install()
    outs = trajectory(model if forward is None else forward, engine, steps=STEPS)
    report = engine.report()
    engine.remove()
    return outs, report


@pytest.mark.parametrize("make, rows", [
    (lambda: make_policy("fora", interval=3), 2),
    (lambda: schedule_policy(mixed_schedule()), 4),
])
def test_one_graph_per_step_kind_and_eager_results(dit, make, rows):
    ref, ref_report = run(dit, CacheEngine, make())
    backend = CompileCounter()
    outs, report = run(dit, StaticCompileEngine, make(), torch.compile(dit, backend=backend, dynamic=False))
    assert not counters["graph_break"]  # no break anywhere in a step
    # one variant per distinct schedule row, plus the first step's (its store is still empty)
    assert backend.frame_count == rows + 1
    assert all(torch.equal(a, b) for a, b in zip(ref, outs))
    assert report == ref_report  # counted from the plan: the eager engine's figures


def test_more_steps_do_not_add_variants(dit):
    backend = CompileCounter()
    compiled = torch.compile(dit, backend=backend, dynamic=False)
    engine = StaticCompileEngine(dit, make_policy("fora", interval=2)).install()
    trajectory(compiled, engine, steps=4)
    seen = backend.frame_count
    trajectory(compiled, engine, steps=4)  # a second sampling call: same kinds, no new graph
    assert engine.variants == 2 and backend.frame_count == seen == 3
    engine.remove()


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_reduce_overhead_falls_back_on_cpu_and_equals_eager(dit, backend):
    ref, _ = run(dit, CacheEngine, make_policy("fora", interval=2))
    compiled = compile_cached(dit, mode="reduce-overhead", backend=backend, device="cpu")
    outs, _ = run(dit, StaticCompileEngine, make_policy("fora", interval=2), compiled)
    assert all(torch.equal(a, b) for a, b in zip(ref, outs))


def test_reduce_overhead_is_kept_on_cuda_only(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.append(kw) or model)
    compile_cached(object(), mode="reduce-overhead", device="cpu")
    compile_cached(object(), mode="reduce-overhead", device="cuda:0")
    assert [kw["mode"] for kw in seen] == [None, "reduce-overhead"]


def test_outside_a_run_the_compiled_model_is_the_bare_model(dit):
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 5]), torch.tensor([1, 2])
    bare = dit(x, t, y)
    engine = StaticCompileEngine(dit, make_policy("fora", interval=2)).install()
    assert torch.equal(torch.compile(dit, backend="eager")(x, t, y), bare)
    engine.remove()


def test_dynamic_policies_and_correctors_are_refused_with_one_line(dit):
    engine = StaticCompileEngine(dit, make_policy("toca")).install()
    with pytest.raises(ValueError, match="static policy.*run it eagerly"):
        trajectory(dit, engine, steps=2)
    engine.remove()
    engine = StaticCompileEngine(dit, make_policy("fora", interval=2), [Corrector()]).install()
    with pytest.raises(ValueError, match="runs only correctors that can correct a step at its start"):
        trajectory(dit, engine, steps=2)
    engine.remove()
