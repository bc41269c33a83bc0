"""`ditcache sample` on a diffusers pipeline: the pipeline's own call and scheduler, the cache enabled on it.

Writes into --out: ``shards/`` (one npz per finished batch, so rerunning the command resumes),
then ``samples.npz`` (uint8 NHWC under ``arr_0``; ``labels`` for class-conditional pipelines,
``prompts`` for text-to-image ones, aligned with the images), ``prompts.json``, ``grid.png`` and
``report.json``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..atomic import write_atomic
from ..images import grid, save_npz, save_png
from ..pipelines import enable
from ..pipelines.sampling import PipelineJob, is_text_to_image, load_pipeline, read_prompts, sample_batch, set_scheduler
from ..policies.schedule import write_json_atomic
from ..sampling.generate import SampleConfig
from ..outdir import claim
from ..sampling.sharded import batch_indices, num_batches, shard_path, sum_reports
from .common import build_cache, cache_tag, print_json, sample_config


def pipeline_prompts(args) -> Optional[tuple[str, ...]]:
    """The prompts of --prompt (repeatable) and then --prompts FILE, or None."""
    prompts = tuple(args.prompt) + (read_prompts(args.prompts) if args.prompts else ())
    return prompts or None


def pipeline_job(args) -> PipelineJob:
    """The PipelineJob the command line asks for (prompts from --prompt and --prompts, or --labels)."""
    return PipelineJob(num_samples=args.num_samples, batch_size=args.batch_size, steps=args.steps,
                       guidance_scale=args.cfg_scale, seed=args.seed, prompts=pipeline_prompts(args),
                       labels=sample_config(args).labels, height=args.height, width=args.width)


def open_pipeline(args, progress: bool = True) -> tuple:
    """(pipeline, scheduler class name): --model on --device, with --scheduler's scheduler if given."""
    pipe = load_pipeline(args.model, device=args.device)
    scheduler = set_scheduler(pipe, args.scheduler)
    if not progress:
        pipe.set_progress_bar_config(disable=True)
    return pipe, scheduler


def pipeline_name(model: str) -> str:
    """A path component for run folders: the folder's name, or the hub id with '/' replaced."""
    return Path(model).name or model.replace("/", "_")


def _assemble(out: Path, layout: SampleConfig, job: PipelineJob, text: bool) -> np.ndarray:
    images = []
    for b in range(num_batches(layout)):
        with np.load(shard_path(out, b)) as data:
            images.append(data["arr_0"])
    images = np.concatenate(images)  # (N, H, W, 3)
    conditions = [job.condition(i) for i in range(job.num_samples)]
    arrays = {"arr_0": images, ("prompts" if text else "labels"): np.asarray(conditions)}
    write_atomic(out / "samples.npz", lambda tmp: np.savez(tmp, **arrays))
    if text:
        write_json_atomic(out / "prompts.json", [{"index": i, "prompt": p} for i, p in enumerate(conditions)])
    shutil.rmtree(out / "shards", ignore_errors=True)
    return images


def run_pipeline(args) -> int:
    policy, correctors = build_cache(args.policy, args.corrector)
    job = pipeline_job(args)
    pipe, scheduler = open_pipeline(args, progress=not (args.no_progress or args.json))
    text = is_text_to_image(pipe)
    job.validate(text)
    tag = cache_tag(policy, correctors)
    name = pipeline_name(args.model)
    out = Path(args.out or f"runs/{name}-{scheduler}{job.steps}-cfg{job.guidance_scale:g}-seed{job.seed}"
                            f"-n{job.num_samples}-{tag}")
    settings = {"model": args.model, "scheduler": scheduler, "job": job.__dict__, "policy": policy.describe(),
                "correctors": [c.describe() for c in correctors]}
    with claim(out, settings, args.overwrite, "a pipeline sampling run"):
        layout = SampleConfig(num_samples=job.num_samples, batch_size=job.batch_size)
        seconds, reports, resumed = 0.0, [], 0
        if not (out / "samples.npz").is_file():
            with enable(pipe, policy, correctors) as handle:
                for b in range(num_batches(layout)):
                    if shard_path(out, b).is_file():
                        resumed += 1
                        continue
                    indices = batch_indices(layout, b)
                    start = time.perf_counter()
                    images = sample_batch(pipe, job, indices, args.device)
                    seconds += time.perf_counter() - start
                    reports.append(handle.report())
                    save_npz(shard_path(out, b), images, np.asarray(indices))
            images = _assemble(out, layout, job, text)
        else:
            with np.load(out / "samples.npz") as data:
                images = data["arr_0"]
        _finish(args, out, job, scheduler, policy, correctors, tag, images, reports, seconds, resumed)
    return 0


def _finish(args, out, job, scheduler, policy, correctors, tag, images, reports, seconds, resumed) -> None:
    save_png(grid(images[:64]), out / "grid.png", scale=1 if images.shape[1] >= 64 else 4)
    counters = sum_reports(reports) or {}
    report = {"model": args.model, "scheduler": scheduler, "steps": job.steps, "guidance_scale": job.guidance_scale,
              "seed": job.seed, "num_samples": job.num_samples, "batch_size": job.batch_size,
              "policy": policy.describe(), "correctors": [c.describe() for c in correctors], "seconds": seconds,
              "batches_sampled": len(reports), "batches_resumed": resumed,
              "compute_fraction": counters.get("compute_fraction"), "macs_ratio": counters.get("macs_ratio"),
              "cache_peak_bytes": counters.get("cache_peak_bytes", 0), "outputs": {
                  "grid": str(out / "grid.png"), "npz": str(out / "samples.npz"), "report": str(out / "report.json")}}
    if reports or not (out / "report.json").is_file():
        write_json_atomic(out / "report.json", report)
    else:
        report = json.loads((out / "report.json").read_text())  # nothing new: keep the run's own figures
    if args.json:
        print_json(report)
    else:
        fraction = report["compute_fraction"]
        print(f"{job.num_samples} images from {args.model} ({scheduler}, {job.steps} steps) with {tag}: "
              f"{len(reports)} batches in {seconds:.2f} s ({resumed} resumed)"
              + (f"; computed {fraction:.1%} of sub-layer calls, MACs ratio {report['macs_ratio']:.3f}"
                 if fraction is not None else "") + f"; wrote {out}/")
