"""`ditcache sample`: class-conditional images from a DiT, with or without a feature cache."""

from __future__ import annotations

import dataclasses
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from ..engine import CacheEngine
from ..images import grid, save_png
from ..models.loading import load_model
from ..policies.schedule import write_json_atomic
from ..outdir import claim
from ..sampling.sharded import assemble, barrier, init_distributed, recover, run_shard, samples_complete, sum_reports
from .common import (add_cache_args, add_model_args, add_overwrite_arg, add_pipeline_args, add_sampling_args,
                     build_cache, cache_tag, print_json, sample_config, wants_pipeline)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sample", help="sample images, optionally with a feature cache",
        description="Sample class-conditional images (or, with a diffusers pipeline and --prompt, text-to-image) "
                    "and report how much computation the cache skipped. "
                    "Writes grid.png, samples.npz (ADM format: uint8 NHWC under arr_0, plus labels) and "
                    "report.json into --out. Batches are written as they finish, so rerunning the same "
                    "command resumes an interrupted run. For many samples on several GPUs or processes, "
                    "launch it with `torchrun --nproc_per_node=K -m ditcache.cli.main sample ...`: ranks "
                    "split the batches and rank 0 assembles samples.npz.",
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    add_model_args(p)
    add_sampling_args(p)
    add_pipeline_args(p)
    add_cache_args(p)
    p.add_argument("--out", default=None, help="output folder (default: runs/<model>-<sampling>-<cache>)")
    add_overwrite_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    if wants_pipeline(args):
        from .sample_pipeline import run_pipeline

        return run_pipeline(args)
    config = sample_config(args)
    policy, correctors = build_cache(args.policy, args.corrector)
    rank, world = init_distributed(args.device)
    loaded = load_model(args.model, vae=args.vae, device=args.device, num_heads=args.num_heads)
    config.validate(loaded.num_classes)
    tag = cache_tag(policy, correctors)
    out = Path(args.out or f"runs/{loaded.name}-{config.tag()}-{tag}")
    settings = {"model": loaded.name, "fingerprint": loaded.fingerprint, **dataclasses.asdict(config),
                "policy": policy.describe(), "correctors": [c.describe() for c in correctors]}
    with claim(out, settings, args.overwrite, "a sampling run") if rank == 0 else nullcontext():
        if rank == 0:
            for note in recover(out, config):
                print(f"note: {note}", file=sys.stderr)
        barrier()
        done = {"batches": 0, "resumed_batches": 0, "seconds": 0.0, "reports": []}
        if not samples_complete(out, config):
            with CacheEngine(loaded.module, policy, correctors) as engine:
                done = run_shard(loaded, config, engine, out, rank, world,
                                 progress=not (args.no_progress or args.json), device=args.device)
        barrier()
        if rank != 0:
            return 0
        if not samples_complete(out, config):
            images, _ = assemble(out, config)
        else:
            with np.load(out / "samples.npz") as data:
                images = data["arr_0"]
        _finish(args, loaded, config, policy, correctors, tag, out, world, done, images)
    return 0


def _finish(args, loaded, config, policy, correctors, tag, out, world, done, images) -> None:
    """grid.png and report.json (kept from the run that made the samples when nothing was new), printed."""
    paths = {"grid": str(out / "grid.png"), "npz": str(out / "samples.npz"), "report": str(out / "report.json")}
    save_png(grid(images[:64]), paths["grid"], scale=4 if images.shape[1] <= 64 else 1)
    counters = sum_reports(done["reports"]) or {}
    report = {
        "model": loaded.name, "fingerprint": loaded.fingerprint, "sampler": config.sampler, "steps": config.steps,
        "cfg_scale": config.cfg_scale, "seed": config.seed, "num_samples": config.num_samples,
        "batch_size": config.batch_size, "world_size": world, "policy": policy.describe(),
        "correctors": [c.describe() for c in correctors],
        "seconds": done["seconds"], "batches_sampled": done["batches"], "batches_resumed": done["resumed_batches"],
        "compute_fraction": counters.get("compute_fraction"), "macs_ratio": counters.get("macs_ratio"),
        "cache_peak_bytes": counters.get("cache_peak_bytes", 0), "outputs": paths,
    }
    if done["batches"] == 0 and (out / "report.json").is_file():
        report = json.loads((out / "report.json").read_text())  # nothing new: keep the run's own figures
    else:
        write_json_atomic(paths["report"], report)
    if args.json:
        print_json(report)
    else:
        counted = (f"computed {report['compute_fraction']:.1%} of attention/MLP calls, MACs ratio "
                   f"{report['macs_ratio']:.3f}" if report.get("macs_ratio") is not None else "every batch was on disk")
        print(f"{config.num_samples} samples from {loaded.name} with {tag}: {done['batches']} batches in "
              f"{done['seconds']:.2f} s on rank 0 ({done['resumed_batches']} resumed); {counted}; wrote {out}/")
