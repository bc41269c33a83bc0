"""``ditcache bench --peers --pipeline pixart-tiny``: the peers table inside a PixArt pipeline's own loop.

The same comparison as ``peers.py``, on a ``PixArtAlphaPipeline`` (DPM-Solver++, guidance, text
cross-attention) built locally with random weights (``pipelines/toy.py``): every system samples the
same captions from the same per-sample noise through the pipeline's own ``__call__``, each on its
own copy of the transformer:

- ditcache specs through ``ditcache.enable`` (the way a user runs them on a pipeline);
- ``diffusers:NAME:k=v``: diffusers' hooks applied to the transformer (``peers_diffusers.py``; the
  pipeline sets the cache context itself);
- cache-dit is not in this table (its PixArt adapter wants a pipeline from the hub).

The compute fraction is counted by the same forward hooks as the DiT table (self-attention,
cross-attention and MLP output projections of every block). Quality is fidelity to the uncached
run only: the weights are random, so there is no data to compute an FID against. Fidelity is
measured on the final latents (PSNR with the uncached latents' range as the peak; SSIM on them
likewise), not on decoded images: the tiny random VAE would only blur the comparison.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..metrics.fidelity import fidelity
from ..pipelines.toy import pixart_pipeline
from .peers import NONE, CallCounter, NotApplicable, PeerRun, check_spec, run_or_record

# DPM-Solver++ 20 steps with every 2nd / 3rd / 4th step computed from step 0 (50% / 35% / 25% of the calls),
# as diffusers' TaylorSeer with warmup 1 computes them (its interval 4 computes one step more: 30%);
# FirstBlockCache, PAB and FasterCache with their settings from the DiT table
EVERY2 = "rule:steps=" + "/".join(str(s) for s in range(20) if s % 2)
EVERY3 = "rule:steps=" + "/".join(str(s) for s in range(20) if s % 3)
EVERY4 = "rule:steps=" + "/".join(str(s) for s in range(20) if s % 4)
# the steps TaylorSeer computes at warmup 1 (step 0, then every N-th from step 2): the same schedule for ours
TAYLOR3 = "rule:steps=" + "/".join(str(s) for s in range(20) if s != 0 and (s - 2) % 3)
TAYLOR4 = "rule:steps=" + "/".join(str(s) for s in range(20) if s != 0 and (s - 2) % 4)
PIPELINE_PEER_SPECS = (
    EVERY2, EVERY2 + "+goc", EVERY2 + "+forecast", EVERY2 + "+forecast:order=3",
    EVERY3, EVERY3 + "+goc", EVERY3 + "+forecast", EVERY3 + "+forecast:order=1",
    TAYLOR3, TAYLOR3 + "+forecast", TAYLOR3 + "+forecast:order=1",
    EVERY4, EVERY4 + "+goc", EVERY4 + "+forecast", EVERY4 + "+forecast:order=1",
    TAYLOR4, TAYLOR4 + "+forecast", TAYLOR4 + "+forecast:order=1",
    "diffusers:taylorseer:interval=2,order=2,warmup=1", "diffusers:taylorseer:interval=3,order=2,warmup=1",
    "diffusers:taylorseer:interval=3,order=1,warmup=1", "diffusers:taylorseer:interval=4,order=2,warmup=1",
    "diffusers:taylorseer:interval=4,order=1,warmup=1",
    "diffusers:fbc:threshold=0.2", "diffusers:pab:skip=2", "diffusers:fastercache", "diffusers:magcache",
)
PROMPTS = ("a photo of a cat", "a red car on the beach", "a blue house", "a dog on the tree")


@dataclass(frozen=True)
class PixArtJob:
    """The tiny PixArt pipeline and the call every system makes."""

    depth: int = 4
    hidden: int = 64
    sample_size: int = 16  # latent side: (16 / 2)^2 = 64 image tokens
    steps: int = 20
    guidance_scale: float = 4.5
    num_samples: int = 16
    seed: int = 0


def _generators(job: PixArtJob) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(job.seed * 100003 + i) for i in range(job.num_samples)]


def _call(pipe, job: PixArtJob) -> np.ndarray:
    """The pipeline's own call on the job: final latents (N, C, H, W)."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(job.num_samples)]
    out = pipe(prompt=prompts, num_inference_steps=job.steps, guidance_scale=job.guidance_scale,
               generator=_generators(job), height=job.sample_size * pipe.vae_scale_factor,
               width=job.sample_size * pipe.vae_scale_factor,
               output_type="latent", use_resolution_binning=False, clean_caption=False)
    return out.images.float().numpy()


def _install(spec: str, pipe, job: PixArtJob):
    """A context for one call with the system of ``spec`` on ``pipe`` (its transformer already a copy)."""
    import contextlib

    if spec == NONE:
        return contextlib.nullcontext()
    if spec.startswith("diffusers:"):
        from ..types import StepInfo
        from .peers_diffusers import diffusers_system

        system = diffusers_system(pipe.transformer, spec.split(":", 1)[1])
        calls = [0]

        def begin_step(module, args, kwargs):
            # PixArtAlphaPipeline sets no cache context and keeps no current timestep: the transformer's
            # timestep argument (one per row, all equal) and its call count give them, once per step
            t = kwargs.get("timestep")
            system.begin_step(StepInfo(calls[0], job.steps, float(t.flatten()[0]) if t is not None else -1))
            calls[0] += 1

        @contextlib.contextmanager
        def installed():
            hook = pipe.transformer.register_forward_pre_hook(begin_step, with_kwargs=True)
            system.begin_run(None)
            try:
                yield None
            finally:
                hook.remove()
                system.end_run()

        return installed()
    if spec.startswith("cache-dit:"):
        raise NotApplicable("cache-dit is not run inside the PixArt pipeline by this bench")
    from ..pipelines import enable
    from .compare import parse_cache

    policy, correctors = parse_cache(spec)
    return enable(pipe, policy, correctors)


def run_pipeline_system(spec: str, pipe, base: torch.nn.Module, job: PixArtJob) -> tuple[PeerRun, float]:
    """Sample ``job`` with ``spec`` on a fresh copy of ``base`` inside ``pipe``: the run and its seconds."""
    pipe.transformer = copy.deepcopy(base)
    counter = CallCounter(pipe.transformer)
    try:
        context = _install(spec, pipe, job)
        with context as handle:
            start = time.perf_counter()
            latents = _call(pipe, job)
            seconds = time.perf_counter() - start
            report = handle.report() if hasattr(handle, "report") else {}
    finally:
        counter.remove()
        pipe.transformer = base
    return PeerRun(latents, np.arange(job.num_samples), seconds, counter.fraction, report), seconds


def _latent_fidelity(latents: np.ndarray, reference: np.ndarray) -> dict:
    """Fidelity of latents (N, C, H, W) to the uncached ones, the uncached range as the peak."""
    to_images = lambda x: np.transpose(x, (0, 2, 3, 1))  # noqa: E731  (N, H, W, C)
    span = float(reference.max() - reference.min())
    return fidelity(to_images(latents) - reference.min(), to_images(reference) - reference.min(), data_range=span)


def compare_pipeline_peers(specs: Sequence[str], job: PixArtJob = PixArtJob(), progress: bool = True) -> list[dict]:
    """One row per spec (uncached first): counted fraction, fidelity of the final latents, seconds."""
    for spec in specs:
        check_spec(spec)
    specs = [NONE] + [s for s in specs if s != NONE]
    pipe = pixart_pipeline(depth=job.depth, hidden=job.hidden, heads=4, sample_size=job.sample_size)
    base = pipe.transformer
    rows, reference = [], None
    for spec in specs:
        row = {"spec": spec}
        if progress:
            print(f"{spec}: sampling {job.num_samples}", flush=True)
        made = run_or_record(spec, row, rows, lambda: run_pipeline_system(spec, pipe, base, job))
        if made is None:
            continue
        run, seconds = made
        reference = run if reference is None else reference
        row.update({"status": "ok", "compute_fraction": run.fraction, "seconds_quality_run": seconds,
                    "engine_compute_fraction": run.report.get("compute_fraction")})
        row.update({f"{k}_vs_uncached": v for k, v in _latent_fidelity(run.images, reference.images).items()})
        rows.append(row)
    return rows
