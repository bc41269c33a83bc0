"""Learning-to-Cache router training inside a diffusers pipeline: its scheduler, its guidance, its prompts.

The L2C objective (methods.md §3.3, ``calibration/train_router.py``) needs states x at step s − 1,
the full model there (recorded as the cache), one step of the sampler to x at step s, and the full
and the blended model at s. On a pipeline there is no dataset, so the states are the model's own
uncached trajectories (the image-free ``trajectories`` mode), and I let the pipeline make them:
every iteration is one call of the pipeline's own ``__call__`` on ``batch_size`` fresh samples
(prompts cycled from the list in order, or class labels; sample i's noise seeded by (seed, i) as
in ``ditcache sample``), with the transformer's ``forward`` wrapped so that, at a trained cache
step s,

- at step s − 1 the pipeline's own evaluation records every site's output as the cache;
- the pipeline's scheduler steps from s − 1 to s, exactly as in the user's runs (multistep
  history included, which a pool of stored states could not replay);
- at step s the full output is the target, and one more forward with every site blended
  β·fresh + (1 − β)·cached (β = router s) is the prediction; the loss is backpropagated to the
  router right there, and the pipeline goes on with the full output, so the trajectory stays the
  uncached one.

The call stops after the last trained step. The scheduler is a copy of ``pipe.scheduler`` made
per call, so the user's scheduler object is never stepped. Guidance is as the pipeline runs it at
the router's guidance scale (the key's): the states are the guided trajectories the router will
meet, and the loss covers both halves of the concatenated guidance batch and every output channel.
A router trained this way is keyed like the EOC pipeline prior (``pipelines.calibration``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os

import torch

from ..calibration.artifact import ArtifactKey
from ..calibration.train_router import RouterConfig, RouterTrainer, rank_and_world
from ..engine.patching import ForwardPatches
from .calibration import pipeline_key
from .sampling import PipelineJob, is_text_to_image, sample_batch
from .steps import SchedulerSteps, scheduler_key


class _Done(Exception):
    """Raised from inside the pipeline's call after its last trained step: the rest is not needed."""


def _output(out) -> torch.Tensor:
    """The tensor of a transformer's output (a tuple or a diffusers output object)."""
    return out[0] if isinstance(out, tuple) else getattr(out, "sample", out)


class PipelineRouterTrainer(RouterTrainer):
    """A router run on ``pipe.transformer`` with ``pipe``'s scheduler; same folder, loop and artifact
    as ``RouterTrainer``. ``job`` gives the prompts (or labels), the noise seed and the resolution;
    the step count, guidance scale and batch size are the config's (``steps``, ``cfg_scale``,
    ``batch_size``). One process; ``data`` must be "trajectories"."""

    def __init__(self, pipe, job: PipelineJob, config: RouterConfig, out: str | os.PathLike, device: str = "cpu"):
        self.rank, self.world = rank_and_world()
        if self.world > 1:
            raise ValueError("router training on a pipeline runs in one process (no torchrun)")
        config.validate(self.world)
        if config.data != "trajectories":
            raise ValueError("on a pipeline the states are its own trajectories: data must be 'trajectories' "
                             "(a pipeline has no image dataset)")
        self.pipe, self.device_name = pipe, device
        self.text = is_text_to_image(pipe)
        self.job = dataclasses.replace(job, steps=config.steps, guidance_scale=config.cfg_scale,
                                       batch_size=config.batch_size, num_samples=config.batch_size)
        self.job.validate(self.text)
        self.loaded = None
        self._setup(pipe.transformer, config, out)
        self._key = pipeline_key(pipe, self.job)
        self.identity = self._identity()
        if self.ckpt_path.exists():
            self._resume()

    def _identity(self) -> str:
        """The transformer's fingerprint and a digest of everything else the trajectories depend on."""
        job = self.job
        data = {"key": dataclasses.asdict(self._key), "prompts": job.prompts, "labels": job.labels,
                "seed": job.seed, "height": job.height, "width": job.width}
        digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return f"{self._key.model_fingerprint}-{digest}"

    # -- one iteration ------------------------------------------------------------------------------
    def local_step(self) -> dict:
        """One pipeline call on fresh samples; the router's gradients of the drawn cache steps."""
        c = self.config
        if c.step_draw == "one":
            steps = [self.cache_steps[int(torch.randint(0, len(self.cache_steps), (1,), generator=self.gen))]]
        else:
            steps = self.cache_steps
        first = self.iteration * self.batch
        losses = self._run(list(range(first, first + self.batch)), set(steps))
        totals = {k: sum(float(v[k]) for v in losses.values()) / len(steps) for k in ("loss", "mse", "penalty")}
        return {"step": steps[0] if len(steps) == 1 else -1, **totals}

    def _run(self, indices: list[int], train: set[int]) -> dict[int, dict]:
        """Call the pipeline on samples ``indices``, training the router at the cache steps ``train``;
        returns {step: dict(loss, mse, penalty)} (detached)."""
        pipe, transformer = self.pipe, self.pipe.transformer
        user_scheduler = pipe.scheduler
        scheduler = copy.deepcopy(user_scheduler)  # stepped here; the user's object stays as it was
        if scheduler_key(scheduler) != self._key.sampler:
            raise ValueError(f"the pipeline's scheduler is now {scheduler_key(scheduler)}, but this router is for "
                             f"{self._key.sampler}")
        steps = SchedulerSteps(on_start=lambda: None, on_end=lambda: None)
        losses: dict[int, dict] = {}
        patches = ForwardPatches()
        patches.patch(transformer, self._forward(transformer.forward, steps, train, losses))
        pipe.scheduler = scheduler
        try:
            steps.attach(scheduler)
            with self.blend:
                sample_batch(pipe, self.job, indices, self.device_name, decode=False)
        except _Done:
            pass
        finally:
            steps.detach()
            patches.restore()
            pipe.scheduler = user_scheduler
        if set(losses) != train:
            raise RuntimeError(f"the pipeline evaluated cache steps {sorted(losses)}, expected {sorted(train)}: "
                               f"does it call set_timesteps({self.config.steps}) and the transformer once per step?")
        return losses

    def _forward(self, original, steps: SchedulerSteps, train: set[int], losses: dict):
        """The transformer's forward during a training call (see the module docstring)."""
        c, seen = self.config, set()
        last = max(train)

        def forward(*args, **kwargs):
            if not steps.active:
                return original(*args, **kwargs)
            s = steps.index
            if steps.num_steps != c.steps:
                raise ValueError(f"the pipeline runs {steps.num_steps} steps, the router is for {c.steps}")
            if s in seen:
                raise RuntimeError(f"the transformer was called twice in step {s}; router training needs one "
                                   "call per scheduler step, with guidance as one concatenated batch")
            seen.add(s)
            if s + 1 in train:
                with self.blend.recording():  # the cache that step s + 1 blends with
                    return original(*args, **kwargs)
            if s not in train:
                return original(*args, **kwargs)
            out = original(*args, **kwargs)  # the pipeline's own evaluation: its trajectory stays uncached
            target = _output(out).detach()  # (2B, C_out, H, W) with guidance
            with torch.enable_grad():
                beta = self.router.beta(s)  # (columns * depth,)
                with self.blend.blending(beta):
                    pred = _output(original(*args, **kwargs))  # (2B, C_out, H, W)
                mse = ((target - pred) ** 2).mean()
                term = beta.sum() if c.penalty == "l1" else (beta ** 2).sum()
                loss = mse + c.lam * term
                loss.backward()  # each step's logits get only their own step's gradient
            losses[s] = {"loss": loss.detach(), "mse": mse.detach(), "penalty": term.detach()}
            if s == last:
                raise _Done
            return out

        return forward

    # -- what the artifact records -----------------------------------------------------------------
    def label(self) -> str:
        return f"{type(self.pipe.scheduler).__name__}{self.config.steps}"

    def key(self) -> ArtifactKey:
        """The key ``ditcache.enable`` gives a run of this pipeline with these settings."""
        return self._key

    def meta(self) -> dict:
        meta = super().meta()
        meta.pop("trajectories_per_process", None)
        job = self.job
        meta.update({"pipeline": type(self.pipe).__name__, "scheduler": type(self.pipe.scheduler).__name__,
                     "trajectories": self.iteration * self.batch, "guidance": "as the pipeline runs it",
                     "noise_seed": job.seed, "height": job.height, "width": job.width})
        if self.text:
            meta["prompts"] = list(job.prompts)
        elif job.labels:
            meta["labels"] = list(job.labels)
        return meta
