"""What skipping a reused site's input saves: whole runs with ``skip_inputs`` on and off, interleaved.

A reused site's input (its norm and modulation) is thrown away by the block; the engine runs it on
one token instead (engine.py, ``CacheEngine.skip_inputs``). The outputs are the same bits
(tests/engine/test_skip_inputs.py); this measures the time, as ``ditcache bench`` does (one
warm-up, repeats interleaved, paired speed-ups against uncached).

- default: the embedded model, DDIM-20 or --steps, cfg 1.5, batch 64 (128 rows with CFG);
- xl: DiT-XL/2 with random weights (--xl-depth blocks), DDIM-8, batch 1 (2 rows with CFG).

    PYTHONPATH=src python benchmarks/skip_inputs.py --which default --repeats 5
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/skip_inputs.py --which default --steps 50
    PYTHONPATH=src python benchmarks/skip_inputs.py --which xl --xl-depth 4

Rows SPEC|full (every input in full, as before) and SPEC|skip (the default); "reuse 1-19" reuses
every step after the first (its whole-step cost is the floor of any step schedule).
"""

import argparse
import os

import torch

from ditcache.bench.speed import random_dit, speed_table, time_engine_variants
from ditcache.models.loading import load_model
from ditcache.sampling.generate import SampleConfig

VARIANTS = {"full": {"skip_inputs": False}, "skip": {"skip_inputs": True}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--which", default="default", choices=["default", "xl"])
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: 20, xl: 8)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--xl-depth", type=int, default=28, help="blocks of the XL model (default 28, DiT-XL/2's)")
    args = p.parse_args()
    if args.which == "default":
        loaded, steps, batch = load_model("mnist"), args.steps or 20, 64
    else:
        loaded, steps, batch = random_dit("DiT-XL/2", depth=args.xl_depth), args.steps or 8, 1
    config = SampleConfig(num_samples=batch, batch_size=batch, steps=steps, cfg_scale=1.5)
    every = "rule:steps=" + "/".join(str(s) for s in range(1, steps))
    specs = ["none", "rule:preset=rm-50", "fora:interval=3", "rule:preset=rm-50+goc", every]
    print(f"{args.which}, DDIM-{steps}, {2 * batch} rows; {torch.get_num_threads()} threads; "
          f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    print(speed_table(time_engine_variants(loaded, config, specs, VARIANTS, args.repeats)))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
