"""Cost of the per-step non-finite check (ditcache.finite), two ways, in CPU time of this process
(``time.process_time``), which a machine shared with other jobs disturbs far less than wall-clock:

1. end to end: sampling with the check against the same sampling with it replaced by a no-op,
   interleaved paired repeats, median and min-max of the relative cost;
2. the check alone: ``check_step`` on an output of the run's shape (and the engine's per-site
   ``FiniteWatch.note`` for every corrected site of a step), against the CPU time of one step.

    OMP_NUM_THREADS=1 nice python benchmarks/finite_check_cost.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ditcache.bench.compare import parse_cache
from ditcache.bench.speed import random_dit
from ditcache.engine import CacheEngine
from ditcache.finite import FiniteWatch
from ditcache.models.loading import load_model
from ditcache.sampling import loops
from ditcache.sampling.generate import SampleConfig, generate


def timed(loaded, config, spec) -> float:
    policy, correctors = parse_cache(spec)
    with CacheEngine(loaded.module, policy, correctors) as engine:
        start = time.process_time()
        generate(loaded, config, engine=engine)
        return time.process_time() - start


def check_alone(loaded, config, notes: int, calls: int = 200) -> float:
    """CPU seconds of one step's checks: check_step on the output plus ``notes`` corrected-site flags."""
    rows = config.num_samples * (2 if config.cfg_scale != 1 else 1)
    out = torch.randn(rows, loaded.out_channels, loaded.latent_size, loaded.latent_size)
    feature = torch.randn(rows, loaded.module.num_patches, loaded.module.hidden_size)

    class Hooks:
        finite_watch, correctors = FiniteWatch(), []

    hooks = Hooks()
    start = time.process_time()
    for _ in range(calls):
        hooks.finite_watch.clear()
        for _ in range(notes):
            hooks.finite_watch.note("mlp0", "goc", feature)
        loops.check_step(out, 0, 999, hooks)
    return (time.process_time() - start) / calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--specs", nargs="+", default=["none", "rule:preset=rm-50", "rule:preset=rm-50+goc:w=1.2"])
    args = p.parse_args()
    jobs = [("mnist DDIM-20 batch 64 (+CFG)", load_model("mnist"), SampleConfig(num_samples=64, steps=20)),
            ("DiT-S/2-random DDIM-8 batch 2 (+CFG)", random_dit("DiT-S/2"), SampleConfig(num_samples=2, steps=8))]
    real_check, real_note = loops.check_step, FiniteWatch.note
    for label, loaded, config in jobs:
        for spec in args.specs:
            with_check, without = [], []
            timed(loaded, config, spec)  # warm-up
            for _ in range(args.repeats):
                with_check.append(timed(loaded, config, spec))
                loops.check_step, FiniteWatch.note = (lambda *a, **k: None), (lambda *a, **k: None)
                try:
                    without.append(timed(loaded, config, spec))
                finally:
                    loops.check_step, FiniteWatch.note = real_check, real_note
            ratios = [a / b - 1 for a, b in zip(with_check, without)]
            depth = len(loaded.module.blocks)
            notes = depth if "+" in spec else 0  # rm-50 reuses every site at half the steps: ~depth per step
            alone = check_alone(loaded, config, notes)
            step = statistics.median(without) / config.steps
            print(f"{label:38s} {spec:30s} end to end: with {statistics.median(with_check):.3f} s, without "
                  f"{statistics.median(without):.3f} s CPU, cost {statistics.median(ratios):+.2%} (min "
                  f"{min(ratios):+.2%}, max {max(ratios):+.2%}, {args.repeats} paired repeats); check alone "
                  f"{alone * 1e3:.3f} ms per step = {alone / step:.3%} of a step's {step * 1e3:.1f} ms", flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
