"""EOC's prior (and GOC's inflection statistics) from a diffusers pipeline, with prompts or labels.

The same extraction loop as for class-conditional models (``calibration.prior.accumulate``): K
uncached runs of the pipeline's own call, every site's output averaged per step, keeping the two
guidance halves apart; resumable, keyed by the transformer's fingerprint, the scheduler (class and
settings), the step count, the guidance scale and the resolution, so it is refused anywhere else.
Samples cycle through the prompts (or labels) in order, each with its own seeded noise.
"""

from __future__ import annotations

from typing import Optional

from ..calibration.artifact import ArtifactKey
from ..calibration.prior import ExtractResult, PriorJob, accumulate
from ..models.loading import fingerprint
from .handle import enable, pixel_scale
from .sampling import PipelineJob, is_text_to_image, sample_batch
from .steps import scheduler_key


def pipeline_key(pipe, job: PipelineJob) -> ArtifactKey:
    """The key a run of ``pipe`` with ``job``'s settings gets from ``ditcache.enable`` (same fields, same values)."""
    height = job.height or pipe.transformer.config.sample_size * pixel_scale(pipe)
    cfg = job.guidance_scale if job.guidance_scale > 1.0 else 1.0  # pipelines guide only above 1
    return ArtifactKey(fingerprint(pipe.transformer), scheduler_key(pipe.scheduler), job.steps, float(cfg), int(height))


def extract_pipeline_prior(pipe, job: PipelineJob, out, dtype: str = "float32", progress: bool = False,
                           checkpoint_every: int = 1, max_batches: Optional[int] = None,
                           device: str = "cpu") -> ExtractResult:
    """Average every site's output over ``job.num_samples`` uncached pipeline runs into a prior at ``out``."""
    text = is_text_to_image(pipe)
    job.validate(text)
    conditions = [job.condition(i) for i in range(job.num_samples)]
    settings = {"num_samples": job.num_samples, "batch_size": job.batch_size, "seed": job.seed,
                ("prompts" if text else "labels"): conditions}

    def run_batch(handle, batch):
        sample_batch(pipe, job, batch, device, decode=False)

    prior_job = PriorJob(pipeline_key(pipe, job), settings, lambda recorder: enable(pipe, "none", [recorder]), run_batch)
    return accumulate(prior_job, out, dtype, progress, checkpoint_every, max_batches)
