"""Loading a diffusers pipeline, choosing its scheduler, and sampling with it reproducibly.

Used by ``ditcache sample --model PIPELINE --prompt ...``. As in ``ditcache sample`` for class-
conditional models, sample i's initial noise comes from its own generator seeded by (seed, i), so an
image does not depend on the batch size or on a resumed run; the pipeline's own ``__call__`` does
everything else (prompt encoding, guidance, its scheduler, decoding).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..sampling.generate import sample_seed

# --scheduler names -> diffusers scheduler classes, built from the pipeline's own scheduler config
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "flow-euler": "FlowMatchEulerDiscreteScheduler",
}


def is_pipeline_folder(spec: str) -> bool:
    return (Path(spec) / "model_index.json").is_file()


def load_pipeline(spec: str, device: str = "cpu", dtype=torch.float32, local_files_only: bool = False):
    """A diffusers pipeline from a local folder (with model_index.json) or a hub id."""
    from diffusers import DiffusionPipeline

    path = Path(spec)
    if path.exists() and not is_pipeline_folder(spec):
        raise FileNotFoundError(f"{spec} is not a diffusers pipeline folder (no model_index.json)")
    try:
        pipe = DiffusionPipeline.from_pretrained(spec, torch_dtype=dtype, local_files_only=local_files_only)
    except OSError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FileNotFoundError(
            f"cannot load the pipeline {spec!r} ({first}); where the hub is reachable, "
            f"`huggingface-cli download {spec} --local-dir DIR` and pass --model DIR") from None
    return pipe.to(device)


def set_scheduler(pipe, name: Optional[str]) -> str:
    """Replace the pipeline's scheduler by the named one (built from its config); returns the class name."""
    if name is None:
        return type(pipe.scheduler).__name__
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {sorted(SCHEDULERS)}")
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[name])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    return cls.__name__


def call_parameters(pipe) -> dict:
    """The parameters of the pipeline class's own ``__call__`` (also while a handle wraps it)."""
    cls = getattr(type(pipe), "_ditcache_base", type(pipe))
    return dict(inspect.signature(cls.__call__).parameters)


def is_text_to_image(pipe) -> bool:
    return "prompt" in call_parameters(pipe)


@dataclass(frozen=True)
class PipelineJob:
    """What to sample with a pipeline. Text pipelines take ``prompts`` (repeated in order to fill
    ``num_samples``); class-conditional ones (DiTPipeline) ``labels`` (None: uniform random)."""

    num_samples: int = 4
    batch_size: int = 4
    steps: int = 20
    guidance_scale: float = 4.5
    seed: int = 0
    prompts: Optional[tuple[str, ...]] = None
    labels: Optional[tuple[int, ...]] = None
    height: Optional[int] = None
    width: Optional[int] = None

    def validate(self, text: bool) -> None:
        if self.num_samples < 1 or self.batch_size < 1 or self.steps < 1:
            raise ValueError("num_samples, batch_size and steps must be at least 1")
        if not self.guidance_scale >= 0:
            raise ValueError(f"guidance scale must be >= 0, got {self.guidance_scale}")
        if text and not self.prompts:
            raise ValueError("this is a text-to-image pipeline: give --prompt TEXT or --prompts FILE")
        if not text and self.prompts:
            raise ValueError("this pipeline is class-conditional: give --labels, not prompts")

    def condition(self, index: int, num_classes: int = 1000):
        """Sample ``index``'s prompt, or its class label."""
        if self.prompts:
            return self.prompts[index % len(self.prompts)]
        if self.labels:
            return self.labels[index % len(self.labels)]
        g = torch.Generator().manual_seed(sample_seed(self.seed, index))
        return int(torch.randint(0, num_classes, (1,), generator=g))


def read_prompts(path: str) -> tuple[str, ...]:
    """One prompt per non-empty line."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    prompts = tuple(line.strip() for line in file.read_text().splitlines() if line.strip())
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompt")
    return prompts


def sample_batch(pipe, job: PipelineJob, indices: list[int], device: str = "cpu", decode: bool = True):
    """Run the pipeline on samples ``indices``: uint8 images (B, H, W, 3), or with ``decode`` False the
    latents (calibration needs only the transformer's features)."""
    generators = [torch.Generator(device=device).manual_seed(sample_seed(job.seed, i)) for i in indices]
    params = call_parameters(pipe)
    kwargs = {"num_inference_steps": job.steps, "guidance_scale": job.guidance_scale, "generator": generators,
              "output_type": "np" if decode else "latent"}
    conditions = [job.condition(i) for i in indices]
    if is_text_to_image(pipe):
        kwargs["prompt"] = conditions
        for key, value in (("height", job.height), ("width", job.width)):
            if value is not None:
                kwargs[key] = value
        if "use_resolution_binning" in params and job.height is not None:
            kwargs["use_resolution_binning"] = False  # the user asked for this exact size
    else:
        kwargs["class_labels"] = conditions
    images = pipe(**kwargs).images  # (B, H, W, 3) floats in [0, 1], or latents
    if not decode:
        return images
    return np.clip(np.round(np.asarray(images) * 255), 0, 255).astype(np.uint8)


@dataclass
class PipelineRunResult:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,): class labels, or sample indices for text (prompts are in the settings)
    seconds: float
    report: dict


class PipelineSampler:
    """What ``bench.compare.compare_runs`` needs, for a diffusers pipeline's own call: every
    configuration samples the same job (same prompts or labels, same per-sample noise)."""

    is_mnist = False

    def __init__(self, pipe, job: PipelineJob, model: str, device: str = "cpu"):
        self.pipe, self.job, self.device = pipe, job, device
        self.text = is_text_to_image(pipe)
        job.validate(self.text)
        self.num_samples = job.num_samples
        self.settings = {"model": model, "scheduler": type(pipe.scheduler).__name__, **job.__dict__}

    def _batches(self) -> list[list[int]]:
        n, size = self.job.num_samples, self.job.batch_size
        return [list(range(i, min(i + size, n))) for i in range(0, n, size)]

    def run(self, spec: str) -> PipelineRunResult:
        import time

        from ..bench.compare import parse_cache
        from ..sampling.sharded import sum_reports
        from .handle import enable

        policy, correctors = parse_cache(spec)
        images, reports, start = [], [], time.perf_counter()
        with enable(self.pipe, policy, correctors) as handle:
            for batch in self._batches():
                images.append(sample_batch(self.pipe, self.job, batch, self.device))
                reports.append(handle.report())
        labels = [self.job.condition(i) for i in range(self.num_samples)] if not self.text else range(self.num_samples)
        return PipelineRunResult(np.concatenate(images), np.asarray(list(labels)), time.perf_counter() - start,
                                 sum_reports(reports))

    def time(self, specs: list[str], repeats: int):
        from ..bench.pipeline_speed import time_calls

        first = self._batches()[0]
        return time_calls(self.pipe, lambda: sample_batch(self.pipe, self.job, first, self.device), specs, repeats,
                          progress=False)
