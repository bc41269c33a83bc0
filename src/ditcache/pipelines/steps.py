"""How the engine learns where a diffusers pipeline is in its sampling loop: from the scheduler.

Every diffusers pipeline, whatever its scheduler, does the same two things with it: it calls
``scheduler.set_timesteps(...)`` once before the loop, and ``scheduler.step(...)`` once after each
transformer evaluation. So:

- ``set_timesteps`` starts a run; the run has ``len(scheduler.timesteps)`` steps, which is the number
  of transformer evaluations for every scheduler (DDIM, DPM-Solver++ multistep and flow-matching
  Euler have one timestep per evaluation; a second-order scheduler such as Heun lists each
  evaluation's timestep, so it is right there too);
- the step index is the number of ``step`` calls since then, and the step's timestep is
  ``scheduler.timesteps[index]``.

I chose this over the two other sources the pipeline offers. The transformer's timestep argument
is scaled differently by each pipeline (DiT passes the integer DDPM timestep, SD3 sigma * 1000,
FLUX sigma), and repeats under second-order schedulers, so it cannot give an index by itself. The
step-end callback is not offered by every pipeline (``DiTPipeline`` has none). Counting
``step`` calls needs neither, and a transformer evaluated twice within one step (separate guidance
passes) is detected rather than mistaken for two steps.

The patches are instance attributes on one scheduler object, removed by ``detach``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable, Optional


def scheduler_key(scheduler) -> str:
    """'DDIMScheduler-1a2b3c4d': the scheduler's class and a digest of its settings, for artifact keys."""
    config = {k: v for k, v in dict(getattr(scheduler, "config", {})).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{type(scheduler).__name__}-{digest}"


def _number(t) -> float:
    value = float(t)
    return int(value) if value.is_integer() else value


class SchedulerSteps:
    """Tracks one scheduler's run: ``num_steps``, the current ``index`` and its ``timestep``.

    ``on_start()`` is called when ``set_timesteps`` begins a new run (so the owner can drop what was
    left of an unfinished one); ``on_end()`` after the last step of a run.
    """

    def __init__(self, on_start: Callable[[], None], on_end: Callable[[], None]):
        self.on_start = on_start
        self.on_end = on_end
        self.scheduler = None
        self.timesteps: tuple = ()
        self.index: Optional[int] = None  # None outside a run

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def active(self) -> bool:
        """True between ``set_timesteps`` and the last ``step`` of the run."""
        return self.index is not None and self.index < self.num_steps

    @property
    def timestep(self):
        return self.timesteps[self.index]

    def attach(self, scheduler) -> None:
        if self.scheduler is scheduler:
            return
        self.detach()
        for name in ("set_timesteps", "step"):
            if not callable(getattr(scheduler, name, None)):
                raise TypeError(f"{type(scheduler).__name__} has no {name}(): not a diffusers scheduler")
            if name in scheduler.__dict__:
                raise RuntimeError(f"{type(scheduler).__name__}.{name} is already patched on this instance "
                                   "(another ditcache handle?); disable it first")
        original_set, original_step = scheduler.set_timesteps, scheduler.step

        def set_timesteps(*args, **kwargs):
            out = original_set(*args, **kwargs)
            self.on_start()
            self.timesteps = tuple(_number(t) for t in scheduler.timesteps)
            self.index = 0
            return out

        def step(*args, **kwargs):
            out = original_step(*args, **kwargs)
            if self.active:
                self.index += 1
                if self.index == self.num_steps:
                    self.on_end()
            return out

        scheduler.set_timesteps, scheduler.step = set_timesteps, step
        self.scheduler = scheduler

    def detach(self) -> None:
        if self.scheduler is not None:
            for name in ("set_timesteps", "step"):
                self.scheduler.__dict__.pop(name, None)
        self.scheduler = None
        self.index = None
        self.timesteps = ()
