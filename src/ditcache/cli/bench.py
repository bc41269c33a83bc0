"""`ditcache bench`: measured speed-up of cache policies against their MACs bound."""

from __future__ import annotations

import argparse
import os

import torch

from ..bench.pipeline_speed import PIPELINE_SPECS, time_pipeline
from ..bench.speed import BARE, DEFAULT_SPECS, random_dit, speed_table, time_policies
from ..metrics.bootstrap import REPLICATES
from ..models.loading import load_model
from ..sampling.generate import SampleConfig
from .common import add_num_heads_arg, add_pipeline_args, print_json, wants_pipeline


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="latency of cache policies: measured speed-up next to the MACs bound",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Times sampling with each --cache configuration in one process (one warm-up, median of "
                    "--repeats) on (a) a DiT-XL/2-shaped model with random weights at batch 2 (one conditional "
                    "+ one unconditional sample, cfg 1.5) and (b) --model (default: the embedded model). The first "
                    "row, bare, has no engine installed: 'none' against it is the engine's own cost.\n"
                    "With --model a diffusers pipeline folder (or hub id) and --prompt/--prompts (or --scheduler "
                    "for a class-conditional pipeline), instead: the --cache configurations inside that pipeline's "
                    "own call and scheduler, --batch-size images (default 1) of --steps steps at --cfg-scale, "
                    "latents out (default caches: " + ", ".join(PIPELINE_SPECS) + ").")
    p.add_argument("--cache", action="append", default=None, metavar="CACHE",
                   help=f"configuration to time (repeatable; default: {', '.join(DEFAULT_SPECS)})")
    p.add_argument("--model", default="mnist", help="the small model, or a diffusers pipeline (default: mnist)")
    add_num_heads_arg(p)
    p.add_argument("--xl", default="DiT-XL/2", help="size preset of the random-weight model; 'skip' to skip it")
    p.add_argument("--xl-steps", type=int, default=8, help="DDIM steps for the large model (default: 8)")
    p.add_argument("--steps", type=int, default=20,
                   help="DDIM steps for the small model, or the pipeline scheduler's steps (default: 20)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="samples per batch for the small model (default: 64), or images per pipeline call (default: 1)")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="--model PIPELINE: guidance scale of the timed call (default: 4.5)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pipeline", choices=["pixart-alpha", "pixart-tiny"], default=None,
                   help="instead: time the caches inside a diffusers PixArtAlphaPipeline's own loop (DPM-Solver++, "
                        "guidance 4.5) around a PixArt-alpha-shaped transformer with random weights (28 blocks, "
                        "hidden 1152, 16 heads, 1024 image tokens, 120 text tokens); default caches: "
                        + ", ".join(PIPELINE_SPECS) + ". With --peers, pixart-tiny: the peers table inside a tiny "
                        "random-weight PixArt pipeline (4 blocks, hidden 64, 64 image tokens, --steps DPM-Solver++ "
                        "steps, --num-samples captions), fidelity to uncached only (bench/peers_pipeline.py)")
    p.add_argument("--pipeline-steps", type=int, default=4, help="pipeline steps (default: 4)")
    p.add_argument("--pipeline-depth", type=int, default=28, help="transformer blocks (default: 28)")
    p.add_argument("--peers", action="store_true",
                   help="instead: ditcache against diffusers' cache hooks and cache-dit on --model converted to a "
                        "diffusers DiTTransformer2DModel, from identical noise (see bench/peers.py); --cache adds "
                        "rows (ditcache specs, diffusers:NAME:k=v, cache-dit:dbcache:k=v)")
    p.add_argument("--num-samples", type=int, default=200, help="--peers: samples per system (default: 200)")
    p.add_argument("--timing-samples", type=int, default=8, help="--peers: samples per timed run (default: 8)")
    p.add_argument("--no-fid", action="store_true", help="--peers: skip FID")
    p.add_argument("--reference-limit", type=int, default=None,
                   help="--peers: FID against only the first N reference images (default: all; MNIST: 10,000)")
    p.add_argument("--features-dir", default=None,
                   help="--peers: keep every row's Inception features in this folder (for --rescore)")
    p.add_argument("--rescore", default=None, metavar="JSON",
                   help="--peers: instead of sampling, read the --json output of an earlier run made with "
                        "--features-dir and compute FID, sFID, precision, recall and the intervals again against "
                        "the reference --reference-limit now gives")
    p.add_argument("--bootstrap", type=int, default=REPLICATES,
                   help=f"--peers: bootstrap replicates for the FID intervals, 0 for none (default: {REPLICATES})")
    p.add_argument("--device", default=None, help="cpu (default) or cuda; --preset gpu defaults to cuda")
    p.add_argument("--preset", choices=["gpu"], default=None,
                   help="gpu: the --xl model (random weights, --xl-steps DDIM steps) at model batches 2/16/64 in "
                        "float32 and bfloat16 autocast, each cache eager, torch.compile'd and CUDA-graph-captured "
                        "(reduce-overhead), interleaved; prints a markdown table for docs/results.md")
    p.add_argument("--batches", default="2,16,64", help="--preset gpu: model batches, both CFG halves (default 2,16,64)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="--preset gpu: dtypes (default float32,bfloat16)")
    p.add_argument("--compile-backend", default="inductor",
                   help="--preset gpu: torch.compile backend (inductor; eager or aot_eager to check the path quickly)")
    p.add_argument("--out", default=None, help="--preset gpu: also write the markdown table to this file")
    p.add_argument("--json", action="store_true")
    add_pipeline_args(p)
    p.set_defaults(func=run)


def bare_first(specs) -> tuple:
    """Every speed table starts with the bare model (nothing installed): speed-ups are against it."""
    return (BARE,) + tuple(s for s in specs if s != BARE)


def run_pipeline_peers(args) -> int:
    from ..bench.peers import peers_table
    from ..bench.peers_pipeline import PIPELINE_PEER_SPECS, PixArtJob, compare_pipeline_peers

    if args.pipeline != "pixart-tiny":
        raise SystemExit("bench --peers --pipeline: only pixart-tiny (a random-weight pipeline built locally)")
    job = PixArtJob(steps=args.steps, num_samples=args.num_samples)
    rows = compare_pipeline_peers(tuple(args.cache or PIPELINE_PEER_SPECS), job, progress=not args.json)
    if args.json:
        print_json({"threads": torch.get_num_threads(), "pipeline": args.pipeline, "job": job.__dict__, "rows": rows})
    else:
        print(peers_table(rows))
    return 0


def rescore(args) -> int:
    import json

    from ..bench.peers import peers_table
    from ..bench.peers_fid import rescore_peers

    if not args.features_dir:
        raise SystemExit("bench --peers --rescore needs --features-dir, the folder the earlier run kept features in")
    with open(args.rescore) as f:
        earlier = json.load(f)
    rows = rescore_peers(earlier["rows"], args.features_dir, reference_limit=args.reference_limit,
                         bootstrap=args.bootstrap)
    if args.json:
        print_json({**earlier, "reference_limit": args.reference_limit, "bootstrap": args.bootstrap,
                    "rescored_from": args.rescore, "rows": rows})
    else:
        print(peers_table(rows))
    return 0


def run_peers(args) -> int:
    from ..bench.peers import DEFAULT_PEER_SPECS, PeersOptions, compare_peers, peers_table

    if args.pipeline:
        return run_pipeline_peers(args)
    if args.rescore:
        return rescore(args)

    loaded = load_model(args.model, device="cpu")
    config = SampleConfig(num_samples=args.num_samples, batch_size=args.batch_size, steps=args.steps, cfg_scale=1.5)
    options = PeersOptions(fid=not args.no_fid, timing_samples=args.timing_samples, repeats=args.repeats,
                           progress=not args.json, reference_limit=args.reference_limit, bootstrap=args.bootstrap,
                           features_dir=args.features_dir)
    rows = compare_peers(loaded, config, tuple(args.cache or DEFAULT_PEER_SPECS), options)
    if args.json:
        print_json({"threads": torch.get_num_threads(), "model": loaded.name, "steps": args.steps,
                    "num_samples": args.num_samples, "reference_limit": args.reference_limit,
                    "bootstrap": args.bootstrap, "rows": rows})
    else:
        print(peers_table(rows))
    return 0


def run_pipeline(args) -> int:
    specs = bare_first(args.cache or PIPELINE_SPECS)
    if not args.json:
        print(f"{args.pipeline}-shaped pipeline, depth {args.pipeline_depth}, {args.pipeline_steps} DPM-Solver++ steps, "
              "batch 2 with guidance")
    rows = time_pipeline(specs, steps=args.pipeline_steps, depth=args.pipeline_depth, repeats=args.repeats,
                         progress=not args.json)
    if args.json:
        print_json({"threads": torch.get_num_threads(), "device": "cpu", "pipeline": args.pipeline,
                    "steps": args.pipeline_steps, "depth": args.pipeline_depth, "rows": [r.as_dict() for r in rows]})
    else:
        print(speed_table(rows))
    return 0


def run_gpu(args) -> int:
    from ..bench.gpu import GPU_SPECS, gpu_table, run_gpu_preset

    specs = bare_first(args.cache or GPU_SPECS)
    rows = run_gpu_preset(args.xl, args.xl_steps, tuple(int(b) for b in args.batches.split(",")),
                          tuple(args.dtypes.split(",")), specs, repeats=args.repeats, device=args.device,
                          backend=args.compile_backend, progress=not args.json, log=None if args.json else print)
    table = gpu_table(rows, args.repeats)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    if args.json:
        print_json({"device": args.device, "model": args.xl, "steps": args.xl_steps,
                    "rows": [{"batch": g.batch, "dtype": g.dtype, "mode": g.mode, "max_diff": g.max_diff,
                              **g.row.as_dict()} for g in rows]})
    else:
        print(table)
    return 0


def run_model_pipeline(args) -> int:
    """--model PIPELINE: every --cache inside the user's pipeline, on its own call and scheduler."""
    from ..bench.pipeline_speed import time_job
    from ..pipelines.sampling import PipelineJob, is_text_to_image
    from .sample_pipeline import open_pipeline, pipeline_prompts

    if args.pipeline or args.peers or args.preset:
        raise ValueError("--model PIPELINE with --prompt/--prompts/--scheduler times that pipeline; it does not "
                         "combine with --pipeline, --peers or --preset")
    batch = args.batch_size or 1
    job = PipelineJob(num_samples=batch, batch_size=batch, steps=args.steps,
                      guidance_scale=4.5 if args.cfg_scale is None else args.cfg_scale,
                      prompts=pipeline_prompts(args), height=args.height, width=args.width)
    pipe, scheduler = open_pipeline(args, progress=False)
    job.validate(is_text_to_image(pipe))
    specs = bare_first(args.cache or PIPELINE_SPECS)
    if not args.json:
        print(f"{args.model}: {type(pipe).__name__}, {scheduler} {job.steps} steps, batch {batch}, "
              f"guidance {job.guidance_scale:g}")
    rows = time_job(pipe, job, specs, args.repeats, args.device, progress=not args.json)
    if args.json:
        print_json({"threads": torch.get_num_threads(), "device": args.device, "model": args.model,
                    "pipeline": type(pipe).__name__, "scheduler": scheduler, "steps": job.steps, "batch": batch,
                    "guidance_scale": job.guidance_scale, "rows": [r.as_dict() for r in rows]})
    else:
        print(speed_table(rows))
    return 0


def run(args) -> int:
    from ..bench.gpu import check_device

    args.device = args.device or ("cuda" if args.preset == "gpu" else "cpu")
    check_device(args.device)  # one line, before any model is built
    if wants_pipeline(args):
        return run_model_pipeline(args)
    if args.cfg_scale is not None:
        raise ValueError("--cfg-scale applies to --model PIPELINE; the DiT rows use 1.5")
    if args.batch_size is None:
        args.batch_size = 64
    if args.preset == "gpu":
        return run_gpu(args)
    if args.peers:
        return run_peers(args)
    if args.pipeline:
        return run_pipeline(args)
    specs = bare_first(args.cache or DEFAULT_SPECS)
    out = {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "device": args.device}
    jobs = []
    if args.xl != "skip":
        jobs.append(("large", random_dit(args.xl), SampleConfig(num_samples=1, batch_size=1, steps=args.xl_steps, cfg_scale=1.5)))
    jobs.append(("small", load_model(args.model, device=args.device, num_heads=args.num_heads),
                 SampleConfig(num_samples=args.batch_size, batch_size=args.batch_size, steps=args.steps, cfg_scale=1.5)))
    for label, loaded, config in jobs:
        loaded.module.to(args.device)
        if not args.json:
            print(f"{label}: {loaded.name}, {config.sampler}-{config.steps}, batch {2 * config.batch_size} with CFG")
        rows = time_policies(loaded, config, specs, args.repeats, args.device, progress=not args.json)
        out[label] = {"model": loaded.name, "steps": config.steps, "batch": 2 * config.batch_size,
                      "rows": [r.as_dict() for r in rows]}
        if not args.json:
            print(speed_table(rows) + "\n")
    if args.json:
        print_json(out)
    return 0
