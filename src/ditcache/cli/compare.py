"""`ditcache compare`: several cache configurations from the same noise, quality and speed side by side."""

from __future__ import annotations

import argparse

from ..bench.compare import HIDDEN, CompareOptions, ModelSampler, compare_runs, plot, table
from ..metrics.bootstrap import REPLICATES
from ..models.loading import load_model
from .common import (add_cache_args, add_model_args, add_overwrite_arg, add_pipeline_args, add_sampling_args,
                     print_json, sample_config, wants_pipeline)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compare", help="run cache configurations from identical noise and compare quality and speed",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sample the uncached baseline and every --cache configuration from identical noise and "
                    "labels (or prompts, with a diffusers pipeline: see 'ditcache sample --help') in one process. Reports compute fraction, MACs ratio, measured speed-up, fidelity "
                    "to the uncached images (PSNR, SSIM, max abs error), class accuracy (MNIST models) and, "
                    "with --fid, FID/sFID/precision/recall on the ADM evaluator's protocol (see 'ditcache eval "
                    "--help'). With --fid every FID has a 95% bootstrap interval over the samples, and fid_diff "
                    "(FID minus the uncached row's) a paired bootstrap interval over the shared noise, marked "
                    "n.s. when it contains 0. A CACHE is 'policy[:k=v,...][+corrector[:k=v,...]]', "
                    "e.g. 'rule:preset=rm-50+eoc:prior=runs/prior,gamma=0.01'. Results resume from --out "
                    "(samples are reused when the sampling settings match, metrics when theirs match too).")
    add_model_args(p)
    add_sampling_args(p, num_samples=100)
    add_pipeline_args(p)
    add_cache_args(p)  # for its --help listing of policies and correctors
    p.add_argument("--cache", action="append", default=[], metavar="CACHE", help="a configuration; repeatable")
    p.add_argument("--fid", action="store_true", help="also compute Inception FID, sFID, precision, recall (slow on CPU)")
    p.add_argument("--reference", default="mnist",
                   help="FID reference: mnist (all 10,000 test images), an ADM .npz or a PNG folder")
    p.add_argument("--reference-limit", type=int, default=None, help="use only the first N reference images")
    p.add_argument("--bootstrap", type=int, default=REPLICATES, metavar="R",
                   help=f"bootstrap replicates for the FID intervals; 0 turns them off (default: {REPLICATES})")
    p.add_argument("--out", default="runs/compare", help="folder for samples and results (resumes)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timing: every configuration is timed on one batch, taking turns, this many times in "
                        "this process; speed-up = median with min-max (default: 3; 0: no speed-up)")
    add_overwrite_arg(p)
    p.add_argument("--plot", default=None, help="write a quality-versus-speed-up plot (PNG)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.policy != "none" or args.corrector:
        raise ValueError("compare takes its configurations from --cache, not --policy/--corrector")
    if args.reference_limit is not None and args.reference_limit < 1:
        raise ValueError(f"--reference-limit must be at least 1, got {args.reference_limit}")
    if not args.cache:
        raise ValueError("give at least one --cache configuration to compare with the uncached baseline")
    if args.bootstrap < 0 or args.bootstrap == 1:
        raise ValueError(f"--bootstrap must be 0 (off) or at least 2, got {args.bootstrap}")
    options = CompareOptions(fid=args.fid, reference=args.reference, reference_limit=args.reference_limit,
                             device=args.device, progress=not args.json, repeats=args.repeats,
                             overwrite=args.overwrite, bootstrap=args.bootstrap)
    rows = compare_runs(_sampler(args), args.cache, args.out, options)
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        print_json([{k: v for k, v in r.items() if k not in HIDDEN} for r in rows])
    else:
        print(table(rows))
    return 0


def _sampler(args):
    """Our sampler on a loaded model, or a diffusers pipeline's own call (prompts / --scheduler)."""
    if wants_pipeline(args):
        from ..pipelines.sampling import PipelineSampler
        from .sample_pipeline import open_pipeline, pipeline_job

        job = pipeline_job(args)
        pipe, _ = open_pipeline(args, progress=False)
        return PipelineSampler(pipe, job, args.model, args.device)
    loaded = load_model(args.model, vae=args.vae, device=args.device, num_heads=args.num_heads)
    return ModelSampler(loaded, sample_config(args), args.device)
