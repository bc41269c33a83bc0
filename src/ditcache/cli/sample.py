"""`ditcache sample`: class-conditional images from a DiT, with or without a feature cache."""

from __future__ import annotations

from pathlib import Path

from ..engine import CacheEngine
from ..images import grid, save_npz, save_png
from ..models.loading import load_model
from ..policies.schedule import write_json_atomic
from ..sampling.generate import generate
from .common import add_cache_args, add_model_args, add_sampling_args, build_cache, cache_tag, print_json, sample_config


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sample", help="sample images, optionally with a feature cache",
        description="Sample class-conditional images and report how much computation the cache skipped. "
                    "Writes grid.png, samples.npz (ADM format: uint8 NHWC under arr_0, plus labels) and "
                    "report.json into --out.",
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    add_model_args(p)
    add_sampling_args(p)
    add_cache_args(p)
    p.add_argument("--out", default=None, help="output folder (default: runs/<model>-<sampling>-<cache>)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    config = sample_config(args)
    policy, correctors = build_cache(args.policy, args.corrector)
    loaded = load_model(args.model, vae=args.vae, device=args.device)
    tag = cache_tag(policy, correctors)
    out = Path(args.out or f"runs/{loaded.name}-{config.tag()}-{tag}")
    with CacheEngine(loaded.module, policy, correctors) as engine:
        result = generate(loaded, config, engine=engine, progress=not (args.no_progress or args.json), device=args.device)
    paths = {"grid": str(out / "grid.png"), "npz": str(out / "samples.npz"), "report": str(out / "report.json")}
    save_png(grid(result.images[:64]), paths["grid"], scale=4 if result.images.shape[1] <= 64 else 1)
    save_npz(paths["npz"], result.images, result.labels)
    report = {
        "model": loaded.name, "fingerprint": loaded.fingerprint, "sampler": config.sampler, "steps": config.steps,
        "cfg_scale": config.cfg_scale, "seed": config.seed, "num_samples": config.num_samples,
        "batch_size": config.batch_size, "policy": policy.describe(), "correctors": [c.describe() for c in correctors],
        "seconds": result.seconds, "compute_fraction": result.report["compute_fraction"],
        "macs_ratio": result.report["macs_ratio"], "cache_peak_bytes": result.report.get("cache_peak_bytes", 0),
        "outputs": paths,
    }
    write_json_atomic(paths["report"], report)
    if args.json:
        print_json(report)
    else:
        print(f"{config.num_samples} samples from {loaded.name} with {tag} in {result.seconds:.2f} s; "
              f"computed {report['compute_fraction']:.1%} of attention/MLP calls, "
              f"MACs ratio {report['macs_ratio']:.3f}; wrote {out}/")
    return 0
