"""Latency inside a diffusers pipeline's own loop: measured speed-up of cache methods against their
MACs bound, on a PixArt-alpha-shaped transformer with random weights (speed does not depend on the
weights' values; ``time_pipeline``) or on any pipeline the user loads (``time_job``). The first row,
bare, is the pipeline with nothing enabled; "none" against it is the cost of ``ditcache.enable`` itself."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..pipelines import enable
from ..pipelines.sampling import PipelineJob, sample_batch
from ..pipelines.toy import caption_inputs, pixart_alpha_shaped
from .compare import parse_cache
from .speed import BARE, SpeedRow, round_robin

PIPELINE_SPECS = (BARE, "none", "fora:interval=2", "rule:preset=rm-50", "toca", "duca")


@dataclass
class PipelineRun:
    seconds: float
    report: dict = field(default_factory=dict)


def time_pipeline(specs=PIPELINE_SPECS, steps: int = 4, depth: int = 28, latent: int = 64, text_tokens: int = 120,
                  batch: int = 1, guidance_scale: float = 4.5, repeats: int = 1, progress: bool = True) -> list[SpeedRow]:
    """One PixArt-alpha-shaped pipeline, every spec timed on the same call (DPM-Solver++, guidance)."""
    pipe = pixart_alpha_shaped(depth=depth, latent=latent, text_tokens=text_tokens)
    size = latent * 8
    kwargs = {"prompt": None, "negative_prompt": None, "num_inference_steps": steps, "guidance_scale": guidance_scale,
              "height": size, "width": size, "output_type": "latent", "use_resolution_binning": False,
              **caption_inputs(batch, text_tokens)}

    return time_calls(pipe, lambda: pipe(**kwargs), specs, repeats, progress)


def time_job(pipe, job: PipelineJob, specs=PIPELINE_SPECS, repeats: int = 1, device: str = "cpu",
             progress: bool = True) -> list[SpeedRow]:
    """Every spec timed on one call of ``pipe`` on the first ``job.batch_size`` samples of ``job``
    (prompts or labels, seeded noise), returning latents: the VAE's decode is none of the cache's work."""
    indices = list(range(job.batch_size))
    return time_calls(pipe, lambda: sample_batch(pipe, job, indices, device, decode=False), specs, repeats, progress)


def time_calls(pipe, call, specs, repeats: int = 1, progress: bool = True) -> list[SpeedRow]:
    """Interleaved timing of ``call()`` (one use of ``pipe``) under every spec; "bare" enables nothing."""
    def run(spec: str) -> PipelineRun:
        if spec == BARE:
            start = time.perf_counter()
            call()
            return PipelineRun(time.perf_counter() - start)
        policy, correctors = parse_cache(spec)
        with enable(pipe, policy, correctors) as handle:
            start = time.perf_counter()
            call()
            seconds = time.perf_counter() - start
        return PipelineRun(seconds, handle.report())

    return round_robin(run, specs, repeats, progress)
