"""`ditcache bench --preset gpu`: eager, compiled and graph-captured speed-ups on a GPU, in one command.

For every batch (model rows, CFG included: 2, 16, 64) and dtype (float32, bfloat16) the same
sampling job runs with every cache spec in three modes:

- ``eager``: the ``CacheEngine`` as everywhere else;
- ``compiled``: ``torch.compile`` of the model carrying a ``StaticCompileEngine`` (one graph per
  schedule row, engine/compiled.py);
- ``graphs``: the same with ``mode="reduce-overhead"``: CUDA graphs, one per step kind.

Each (mode, spec) has its own copy of the model, so compiled graphs and their guards stay valid
from one repeat to the next, and every one runs once untimed (compilation, capture) before the
interleaved repeats. Speed-ups are against the bare eager model of the same batch and dtype, paired
by repeat, next to the MACs bound; every row also reports the largest difference of its images
from the eager run of the same spec, so a graph that replayed stale features would show.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Optional

import torch

from ..engine import CacheEngine
from ..engine.compiled import StaticCompileEngine, compile_cached
from .compare import parse_cache
from .speed import BARE, SpeedRow, random_dit, round_robin

MODES = ("eager", "compiled", "graphs")
GPU_BATCHES = (2, 16, 64)  # model rows per call, both CFG halves
GPU_DTYPES = ("float32", "bfloat16")
GPU_SPECS = (BARE, "none", "rule:preset=rm-50", "fora:interval=2", "fora:interval=3")
NEEDS_CUDA = "bench --preset gpu needs a CUDA device (torch.cuda.is_available() is False here); run it where a GPU is lent"


@dataclasses.dataclass
class GpuRow:
    batch: int
    dtype: str
    mode: str
    row: SpeedRow
    max_diff: float  # largest |image difference| from the eager run of the same spec (uint8 levels)


def check_device(device: str) -> None:
    """Raise ValueError with one line when ``device`` is CUDA and none is available."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(NEEDS_CUDA)


def mode_runner(loaded, config, spec: str, mode: str, device: str, backend: str = "inductor") -> Callable:
    """A function that runs ``generate`` once for (spec, mode) on its own copy of the model."""
    from ..sampling.generate import generate

    if mode == "eager":
        def run():
            if spec == BARE:
                return generate(loaded, config, device=device)
            policy, correctors = parse_cache(spec)
            with CacheEngine(loaded.module, policy, correctors) as engine:
                return generate(loaded, config, engine=engine, device=device)
        return run
    module = copy.deepcopy(loaded.module)
    engine = None
    if spec != BARE:
        policy, correctors = parse_cache(spec)
        engine = StaticCompileEngine(module, policy, correctors).install()  # stays installed: guards stay valid
    compiled = compile_cached(module, mode="reduce-overhead" if mode == "graphs" else None, backend=backend,
                              device=device)
    own = dataclasses.replace(loaded, module=compiled)
    return lambda: generate(own, config, engine=engine, device=device)


def time_modes(loaded, config, specs=GPU_SPECS, modes=MODES, repeats: int = 3, device: str = "cuda",
               backend: str = "inductor", progress: bool = True) -> list[tuple[str, SpeedRow, float]]:
    """(mode, row, max_diff) for every mode x spec; speed-ups against the first spec in eager mode."""
    runners = {(mode, spec): mode_runner(loaded, config, spec, mode, device, backend) for mode in modes for spec in specs}
    images, failed = {}, []
    for key, run in runners.items():  # untimed: compile, capture, warm up
        try:
            images[key] = run().images
        except Exception as err:  # one mode that cannot run must not cost the rest of a one-shot GPU session
            if key[0] == "eager":
                raise
            failed.append((key, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"))
    keys = [key for key in runners if key in images]
    rows = round_robin(lambda key: runners[key](), keys, repeats, progress=progress)
    out = []
    for (mode, spec), row in zip(keys, rows):
        row.spec = spec
        diff = float(abs(images[(mode, spec)].astype(int) - images[("eager", spec)].astype(int)).max())
        out.append((mode, row, diff))
    for (mode, spec), why in failed:
        print(f"  {mode} {spec} failed, left out of the table: {why}", flush=True)
    return out


def gpu_table(rows: list[GpuRow], repeats: int) -> str:
    """A markdown table for docs/results.md."""
    lines = ["| batch | dtype | mode | configuration | seconds (min-max) | MACs ratio | speed-up (min-max) | MACs bound "
             "| share of bound | max image diff vs eager |", "|---|---|---|---|---|---|---|---|---|---|"]
    for g in rows:
        r = g.row
        lines.append(f"| {g.batch} | {g.dtype} | {g.mode} | `{r.spec}` | {r.seconds:.3f} ({min(r.seconds_all):.3f}-"
                     f"{max(r.seconds_all):.3f}) | {r.macs_ratio:.3f} | {r.speedup:.2f}x ({min(r.speedup_all):.2f}-"
                     f"{max(r.speedup_all):.2f}) | {r.bound:.2f}x | {r.speedup / r.bound:.0%} | {g.max_diff:.0f} |")
    lines.append(f"\nmedian of {repeats} interleaved repeats per batch and dtype, in one process; speed-ups against "
                 "the bare eager model of the same batch and dtype")
    return "\n".join(lines)


def run_gpu_preset(model: str = "DiT-XL/2", steps: int = 8, batches=GPU_BATCHES, dtypes=GPU_DTYPES, specs=GPU_SPECS,
                   modes=MODES, repeats: int = 3, device: str = "cuda", backend: str = "inductor",
                   progress: bool = True, log: Optional[Callable[[str], None]] = print) -> list[GpuRow]:
    """The whole grid; ``model`` is a DiT size preset with random weights (speed does not depend on them)."""
    from ..sampling.generate import SampleConfig

    check_device(device)
    out = []
    loaded = random_dit(model)
    loaded.module.to(device)
    for dtype in dtypes:
        for batch in batches:
            if batch % 2:
                raise ValueError(f"gpu batches count both CFG halves, so they must be even; got {batch}")
            config = SampleConfig(num_samples=batch // 2, batch_size=batch // 2, steps=steps, cfg_scale=1.5)
            if log:
                log(f"{loaded.name} {dtype} batch {batch}, ddim-{steps}: {len(modes)} modes x {len(specs)} caches")
            # bfloat16 as users run it: float32 weights and sampler maths, the model's matmuls under autocast
            with torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype),
                                enabled=dtype != "float32"):
                for mode, row, diff in time_modes(loaded, config, specs, modes, repeats, device, backend, progress):
                    out.append(GpuRow(batch, dtype, mode, row, diff))
            torch._dynamo.reset()  # drop this batch's graphs before the next
    return out
