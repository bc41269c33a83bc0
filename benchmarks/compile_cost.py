"""Graph breaks and compiled graphs per sampling run under torch.compile, per engine and cache (a benchmark).

A counting backend (no code generation) on the tests' tiny DiT, 10 steps, dynamo cache limit 64:

    PYTHONPATH=src nice python benchmarks/compile_cost.py
"""

import sys

import torch
import torch._dynamo as dynamo

sys.path.insert(0, "tests")
sys.path.insert(0, ".")
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters
from conftest import tiny_dit
from tests.engine.test_engine import trajectory
from ditcache.engine import CacheEngine
from ditcache.engine.compiled import StaticCompileEngine
from ditcache.bench.compare import parse_cache
torch.set_num_threads(1)
dynamo.config.cache_size_limit = 64
STEPS = 10
for engine_cls, spec in [(StaticCompileEngine, "fora:interval=3"), (StaticCompileEngine, "fora:interval=3+goc"),
                         (StaticCompileEngine, "fora:interval=3+forecast"), (CacheEngine, "fora:interval=3"),
                         (CacheEngine, "fora:interval=3+goc"), (CacheEngine, "toca"), (CacheEngine, "duca")]:
    dynamo.reset(); counters.clear()
    m = tiny_dit()
    policy, corr = parse_cache(spec)
    eng = engine_cls(m, policy, corr).install()
    cc = CompileCounter()
    c = torch.compile(m, backend=cc, dynamic=False)
    try:
        trajectory(c, eng, steps=STEPS)
        err = ""
    except Exception as e:
        err = f" error: {str(e)[:120]}"
    breaks = sum(counters["graph_break"].values())
    plans = f", distinct step plans {eng.variants}" if isinstance(eng, StaticCompileEngine) else ""
    print(f"{engine_cls.__name__:20s} {spec:26s} steps {STEPS}: compiled graphs {cc.frame_count}, graph breaks {breaks}, "
          f"unique break reasons {len(counters['graph_break'])}{plans}{err}")
    eng.remove()
