"""Cost of the per-step non-finite check (ditcache.finite): sampling with the check against the same
sampling with it replaced by a no-op, interleaved repeats in one process, median and min-max.

    OMP_NUM_THREADS=1 nice python benchmarks/finite_check_cost.py --repeats 5

Prints one line per configuration: seconds with and without the check and the relative cost.
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
        start = time.perf_counter()
        generate(loaded, config, engine=engine)
        return time.perf_counter() - start


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
            print(f"{label:38s} {spec:30s} with {statistics.median(with_check):.3f} s, without "
                  f"{statistics.median(without):.3f} s: cost {statistics.median(ratios):+.2%} "
                  f"(min {min(ratios):+.2%}, max {max(ratios):+.2%}, {args.repeats} paired repeats)", flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
