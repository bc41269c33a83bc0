"""Share of the run's wall-clock spent in the correctors, at the default model and at DiT-XL/2 shape.

The same measurement as ``ditcache bench`` (bench/speed.py ``time_policies``: one warm-up, repeats
interleaved, the engine timing its corrector calls in the same process), with the caches the issue-15
target is stated for: RM-50 alone, with GOC, with EOC and with both.

- default: the embedded model, DDIM-20, cfg 1.5, batch 64 (128 rows with CFG), GOC's published rm-50
  step set, an EOC prior of 20 samples (made here unless --prior is given);
- xl: DiT-XL/2 with random weights, DDIM-8, batch 1 (2 rows with CFG), as ``bench`` times it; GOC at
  every step, EOC from a 1-sample prior of that model made here, correcting every reused step.

    PYTHONPATH=src python benchmarks/corrector_share.py                 # both, 3 repeats
    PYTHONPATH=src python benchmarks/corrector_share.py --which default --repeats 5
    PYTHONPATH=src python benchmarks/corrector_share.py --which xl --xl-depth 4     # XL blocks, shorter stack
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/corrector_share.py   # one thread

With --kept each spec's policy and correctors are made once and kept across the repeats, as one
``ditcache sample`` keeps them across its batches (EOC builds its factors in the first batch only).

With --step-ahead each corrector row runs twice, interleaved: per call (the CPU default) and with
the whole step corrected at its start (``engine.step_ahead = True``, the CUDA default and the
compiled engine's way); rows are named SPEC|per-call and SPEC|step-ahead.

It prints the load average before and after: on a machine shared with other jobs, parallel
element-wise kernels wait for a descheduled thread and the share moves with the load.
"""

import argparse
import os
import tempfile

import torch

from ditcache.bench.compare import parse_cache
from ditcache.bench.speed import random_dit, round_robin, speed_table, time_engine_variants, time_policies
from ditcache.engine import CacheEngine
from ditcache.calibration.prior import extract_prior
from ditcache.models.loading import load_model
from ditcache.sampling.generate import SampleConfig, generate

PATHS = {"per-call": {"step_ahead": False}, "step-ahead": {"step_ahead": True}}


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def default_job(args):
    prior = args.prior
    loaded = load_model("mnist")
    config = SampleConfig(num_samples=64, batch_size=64, steps=20, cfg_scale=1.5)
    if prior is None:
        prior = os.path.join(tempfile.mkdtemp(prefix="share-prior-"), "p")
        extract_prior(loaded, SampleConfig(num_samples=20, batch_size=20, steps=20, cfg_scale=1.5), prior)
    specs = ["rule:preset=rm-50", "rule:preset=rm-50+goc:preset=rm-50", f"rule:preset=rm-50+eoc:prior={prior}",
             f"rule:preset=rm-50+goc:preset=rm-50+eoc:prior={prior}"]
    return "default model (mnist), DDIM-20, 128 rows", loaded, config, specs


def xl_job(args):
    # depth < 28 keeps XL's blocks and feature shape (2 x 256 x 1152) and only shortens the stack:
    # the share is set per site (a reused site's correction against a computed site's work)
    loaded = random_dit("DiT-XL/2", depth=args.xl_depth)
    config = SampleConfig(num_samples=1, batch_size=1, steps=8, cfg_scale=1.5)
    prior = os.path.join(tempfile.mkdtemp(prefix="share-prior-xl-"), "p")
    extract_prior(loaded, config, prior)
    eoc = f"eoc:prior={prior},max_step=7"
    specs = ["rule:preset=rm-50", "rule:preset=rm-50+goc", f"rule:preset=rm-50+{eoc}", f"rule:preset=rm-50+goc+{eoc}"]
    return f"DiT-XL/2 shape (random weights, depth {args.xl_depth}), DDIM-8, 2 rows", loaded, config, specs


def time_kept(loaded, config, specs: list, repeats: int):
    """As ``time_policies``, but each spec's policy and correctors are made once and kept across the
    warm-up and the repeats, as one ``ditcache sample`` keeps them across its batches: what a long
    run pays per batch once EOC has built its factors (``--kept``)."""
    made = {spec: parse_cache(spec) for spec in specs}

    def run(spec):
        policy, correctors = made[spec]
        with CacheEngine(loaded.module, policy, correctors) as engine:
            return generate(loaded, config, engine=engine)

    for spec in specs[1:]:
        run(spec)  # each corrector's first batch, untimed
    return round_robin(run, specs, repeats, progress=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--which", default="default,xl", help="default, xl or both (default: default,xl)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prior", default=None, help="an EOC prior of the default model (DDIM-20, cfg 1.5)")
    p.add_argument("--xl-depth", type=int, default=28, help="blocks of the XL model (default 28, DiT-XL/2's)")
    p.add_argument("--step-ahead", action="store_true", help="time each corrector per call and step-ahead, interleaved")
    p.add_argument("--kept", action="store_true",
                   help="keep each spec's correctors across the repeats (a long run's later batches)")
    args = p.parse_args()
    jobs = {"default": default_job, "xl": xl_job}
    for which in args.which.split(","):
        title, loaded, config, specs = jobs[which](args)
        print(f"{title}; {torch.get_num_threads()} threads; load average before: {load()}", flush=True)
        if args.kept:
            rows = time_kept(loaded, config, specs, args.repeats)
        elif args.step_ahead:
            rows = time_engine_variants(loaded, config, specs, PATHS, args.repeats)
        else:
            rows = time_policies(loaded, config, specs, args.repeats, progress=False)
        print(speed_table(rows))
        print(f"load average after: {load()}\n", flush=True)


if __name__ == "__main__":
    main()
