"""``ditcache.enable``: any cache method inside a diffusers pipeline the user already runs.

    pipe = PixArtAlphaPipeline.from_pretrained(...)
    with ditcache.enable(pipe, "rule:preset=rm-50", correctors=["goc"]) as handle:
        images = pipe(prompt, num_inference_steps=20).images      # their call, their scheduler
    print(handle.report())

The pipeline's own ``__call__`` and scheduler drive the steps (see ``steps.py`` for how the index is
learned). ``enable`` installs a ``CacheEngine`` on ``pipe.transformer`` and wraps three things, all
undone exactly by ``disable()``:

- the transformer's ``forward`` (an instance attribute): at the first call of a run it starts the
  engine's run with the token counts of the actual input, and it tells the engine each step;
- the pipeline's ``__call__``: a pipeline's class is swapped for a subclass of the same name whose
  ``__call__`` reads the guidance scale of the call (for reports and calibration keys), attaches to
  whatever scheduler ``pipe.scheduler`` is at that moment, and always ends the run, even when the
  call raises, so nothing leaks into the next call;
- the scheduler's ``set_timesteps`` and ``step`` (instance attributes, only during a call).

A bare transformer works the same way given the scheduler that the user's own loop calls.
"""

from __future__ import annotations

import inspect
from typing import Optional, Sequence, Union

from torch import nn

from ..correctors.base import CORRECTORS, Corrector
from ..engine import CacheEngine
from ..engine.patching import ForwardPatches
from ..finite import check_step
from ..models.loading import fingerprint
from ..policies.base import POLICIES, Policy
from ..registry import parse_spec
from ..types import RunInfo, StepInfo
from .steps import SchedulerSteps, scheduler_key

_SUBCLASSES: dict[type, type] = {}  # pipeline class -> its call-wrapping subclass


def _calling_subclass(cls: type) -> type:
    """A subclass of ``cls`` with the same name whose ``__call__`` goes through the installed handle."""
    if getattr(cls, "_ditcache_base", None) is not None:
        raise RuntimeError("this pipeline already has a ditcache handle enabled; disable it first")
    if cls not in _SUBCLASSES:
        def __call__(self, *args, **kwargs):
            handle = self.__dict__.get("_ditcache_handle")
            if handle is None:
                return cls.__call__(self, *args, **kwargs)
            return handle._pipeline_call(cls.__call__, self, args, kwargs)

        _SUBCLASSES[cls] = type(cls.__name__, (cls,), {
            "__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__, "_ditcache_base": cls})
    return _SUBCLASSES[cls]


def pixel_scale(pipeline) -> int:
    """Pixels per latent cell: the pipeline's VAE downsampling (1 for a bare transformer)."""
    vae = getattr(pipeline, "vae", None)
    if vae is None:
        return 1
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _as_policy(policy: Union[str, Policy, None]) -> Policy:
    if policy is None:
        return Policy()
    return parse_spec(POLICIES, policy) if isinstance(policy, str) else policy


def _as_correctors(correctors: Sequence[Union[str, Corrector]]) -> list[Corrector]:
    if isinstance(correctors, (str, Corrector)):
        correctors = [correctors]
    return [parse_spec(CORRECTORS, c) if isinstance(c, str) else c for c in correctors]


class CacheHandle:
    """A cache installed on a pipeline (or a bare transformer and its scheduler)."""

    def __init__(self, target, policy: Union[str, Policy, None] = "none",
                 correctors: Sequence[Union[str, Corrector]] = (), scheduler=None,
                 guidance_scale: Optional[float] = None):
        self.pipeline = None if isinstance(target, nn.Module) else target
        transformer = target if self.pipeline is None else getattr(target, "transformer", None)
        if not isinstance(transformer, nn.Module):
            raise TypeError(f"{type(target).__name__} is neither a diffusers pipeline with a .transformer "
                            "nor a transformer module")
        if self.pipeline is not None and scheduler is not None:
            raise ValueError("scheduler= is for a bare transformer; a pipeline's own scheduler (pipe.scheduler "
                             "at call time) drives the steps")
        if self.pipeline is None and scheduler is None:
            raise ValueError("a bare transformer needs scheduler=: the scheduler your sampling loop calls "
                             "(its set_timesteps and step tell the engine the steps)")
        self.transformer = transformer
        self.scheduler = scheduler
        self.engine = CacheEngine(transformer, _as_policy(policy), _as_correctors(correctors))
        self.steps = SchedulerSteps(on_start=self._abandon_run, on_end=self._end_run)
        self.guidance_scale = guidance_scale  # for a bare transformer: the loop's scale (keys artifacts)
        self.reports: list[dict] = []  # one per completed run
        self._patches = ForwardPatches()
        self._running = False
        self._seen_step: Optional[int] = None
        self._call: dict = {}
        self._fingerprint: Optional[str] = None
        self.enabled = False

    # -- installing and removing --------------------------------------------------------------
    def enable(self) -> "CacheHandle":
        if self.enabled:
            return self
        base = type(self.pipeline) if self.pipeline is not None else None
        subclass = _calling_subclass(base) if base is not None else None
        self.engine.install()
        try:
            self._patches.patch(self.transformer, self._transformer_forward(self.transformer.forward))
            if self.scheduler is not None:
                self.steps.attach(self.scheduler)
        except Exception:
            self._patches.restore()
            self.engine.remove()
            raise
        if self.pipeline is not None:
            self.pipeline.__dict__["_ditcache_handle"] = self
            self.pipeline.__class__ = subclass
        self.enabled = True
        return self

    def disable(self) -> None:
        """Restore the pipeline, its transformer and scheduler exactly as they were."""
        if not self.enabled:
            return
        self._abandon_run()
        self.steps.detach()
        self._patches.restore()
        self.engine.remove()
        if self.pipeline is not None:
            self.pipeline.__class__ = type(self.pipeline)._ditcache_base
            self.pipeline.__dict__.pop("_ditcache_handle", None)
        self.enabled = False

    def __enter__(self) -> "CacheHandle":
        return self.enable()

    def __exit__(self, *exc) -> None:
        self.disable()

    # -- reporting ----------------------------------------------------------------------------
    def report(self) -> dict:
        """The last completed run: compute fraction, MACs ratio, cache memory, corrector seconds,
        and the steps, scheduler and guidance scale the pipeline used."""
        if not self.reports:
            raise RuntimeError("no sampling run has completed with this handle yet")
        return self.reports[-1]

    # -- what the wrappers do -----------------------------------------------------------------
    def _pipeline_call(self, call, pipe, args, kwargs):
        bound = inspect.signature(call).bind(pipe, *args, **kwargs)
        bound.apply_defaults()
        scale = bound.arguments.get("guidance_scale")
        self._call = {"guidance_scale": None if scale is None else float(scale)}
        self.steps.attach(pipe.scheduler)
        try:
            return call(pipe, *args, **kwargs)
        finally:
            self._abandon_run()
            self.steps.detach()
            self._call = {}

    def _transformer_forward(self, original):
        def forward(*args, **kwargs):
            steps = self.steps
            if not steps.active:
                return original(*args, **kwargs)
            if not self._running:
                self._begin_run(args, kwargs)
            if self._seen_step == steps.index:
                raise RuntimeError(
                    f"the transformer was called twice in step {steps.index} (for example separate "
                    "conditional and unconditional passes); ditcache needs one transformer call per "
                    "scheduler step, with guidance as one concatenated batch")
            self._seen_step = steps.index
            self.engine.begin_step(StepInfo(index=steps.index, num_steps=steps.num_steps, timestep=steps.timestep))
            out = original(*args, **kwargs)
            sample = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
            check_step(sample, steps.index, steps.timestep, self.engine)  # NaN/inf stops the call, naming the culprit
            return out

        return forward

    def _cfg_scale(self) -> float:
        scale = self._call.get("guidance_scale", self.guidance_scale)
        return 1.0 if scale is None or scale <= 1.0 else float(scale)  # pipelines guide only above 1

    def _begin_run(self, args, kwargs) -> None:
        latent = args[0] if args else kwargs["hidden_states"]  # (B, C, H, W)
        patch = int(getattr(self.transformer.config, "patch_size", 1) or 1)
        text = kwargs.get("encoder_hidden_states")  # (B, T, D) for text-conditioned models
        self.engine.set_tokens((latent.shape[-2] // patch) * (latent.shape[-1] // patch),
                               None if text is None else text.shape[1])
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.transformer)
        self.engine.describe_model(self._fingerprint, latent.shape[-2] * pixel_scale(self.pipeline))
        self.engine.begin_run(RunInfo(num_steps=self.steps.num_steps, depth=0, num_tokens=0,
                                      timesteps=self.steps.timesteps, sampler=scheduler_key(self.steps.scheduler),
                                      cfg_scale=self._cfg_scale()))
        self._running = True
        self._seen_step = None

    def _end_run(self) -> None:
        if not self._running:
            return
        self.engine.end_run()
        run = self.engine.run
        self.reports.append({**self.engine.report(), "steps": run.num_steps, "scheduler": run.sampler,
                             "cfg_scale": run.cfg_scale, "resolution": run.resolution})
        self._running = False

    def _abandon_run(self) -> None:
        """Drop an unfinished run's state (an exception, or a new ``set_timesteps`` mid-run)."""
        if self._running:
            self.engine.end_run()
            self._running = False


def enable(target, policy: Union[str, Policy, None] = "none", correctors: Sequence[Union[str, Corrector]] = (),
           *, scheduler=None, guidance_scale: Optional[float] = None) -> CacheHandle:
    """Install a cache on a diffusers pipeline (or a bare transformer with ``scheduler=``) and return
    its handle: a context manager, with ``disable()`` and ``report()``.

    ``policy`` and ``correctors`` are objects or the command line's specs ("fora:interval=2", "goc").
    """
    return CacheHandle(target, policy, correctors, scheduler, guidance_scale).enable()
