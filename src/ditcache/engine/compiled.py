"""Static schedules under ``torch.compile``: one graph per step kind, no break inside a step.

The eager ``CacheEngine`` asks the policy at every site call and counts as it goes; traced by
dynamo, that reads the step index (a guard that changes every step, so one recompilation per step)
and, for a schedule held as a numpy array, ``bool()`` of a traced value (a graph break per site).
``StaticCompileEngine`` moves every decision and every count to the host, between forwards:

- ``begin_step`` writes the step's *plan*: its schedule row as a string, "r" for each reused site
  and "c" for each computed one, in install order. The wrappers read only that string, so dynamo
  guards on its value and a step kind it has seen runs its compiled graph again. (A dict of Action
  objects was my first plan; dynamo's guards on it let a graph for one row run for another.) The bound: at most one
  compiled variant per distinct schedule row (FORA interval n: 2; rm-50: 2 or 3; an L2C router: its
  distinct rows), plus the "off" variant of a forward outside a run.
- the counters are filled from the plan when the step ends (the next ``begin_step`` or ``end_run``),
  with the batch the wrappers recorded: the same figures the eager engine counts, for a sampler
  that calls the model once per step (a CFG batch is one call), as every sampler here does.

Correctors are not supported here (their per-step Python state reads the step index); the eager
engine runs them. Features and outputs equal the eager engine's bit for bit with ``backend="eager"``
and ``"aot_eager"`` (tests/engine/test_compiled.py); inductor reorders float sums like any fused
kernel does.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..policies.static import StaticPolicy
from ..types import RunInfo, Site, StepInfo
from .engine import CacheEngine

NEEDS_STATIC = "compiled caching needs a static policy (none, fora, rule, l2c); {name!r} decides as it goes: run it eagerly"
NO_CORRECTORS = "compiled caching does not run correctors yet; run {names} with the eager engine"


class StaticCompileEngine(CacheEngine):
    """A ``CacheEngine`` whose wrappers are traceable by dynamo for static schedules."""

    _plan: Optional[str] = None  # the current step's row ("c"/"r" per site in install order); None outside a run

    def install(self) -> "StaticCompileEngine":
        self._order: list[Site] = []  # the sites in the order their wrappers were made
        return super().install()

    def begin_run(self, info: RunInfo) -> None:
        if not isinstance(self.policy, StaticPolicy) and self.policy.name != "none":
            raise ValueError(NEEDS_STATIC.format(name=self.policy.name))
        if self.correctors:
            raise ValueError(NO_CORRECTORS.format(names=", ".join(c.name for c in self.correctors)))
        super().begin_run(info)
        self._plans: set[str] = set()  # the distinct schedule rows of this run
        self._plan = None
        self._pending: Optional[tuple[StepInfo, str]] = None  # the step still to count
        self._batch: Optional[int] = None  # recorded by the wrappers: a host-side attribute store

    def begin_step(self, step: StepInfo) -> None:
        self._flush()
        super().begin_step(step)
        schedule = self.policy.schedule()
        reused = set(schedule.cached_sites(step.index)) if schedule is not None else set()
        # the row as a string, "r" for a reused site and "c" for a computed one, in install order:
        # dynamo guards on a string's value exactly, so each distinct row is one compiled variant
        self._plan = "".join("r" if site in reused else "c" for site in self._order)
        self._plans.add(self._plan)
        self._pending = (step, self._plan)

    def end_run(self) -> None:
        self._flush()
        self._plan = None
        super().end_run()

    @property
    def variants(self) -> int:
        """Distinct step kinds seen in this run: the bound on compiled variants (plus "off")."""
        return len(self._plans)

    def _flush(self) -> None:
        """Count the finished step from its plan, as the eager wrappers would have counted it."""
        if self._pending is None or self._batch is None:
            self._pending = None
            return
        step, plan = self._pending
        batch, tokens = self._batch, self.dims.num_tokens
        self.counters.forward(step.index, batch)
        for _ in range(self.dims.depth):
            self.counters.block(step.index, batch, skipped=False)
        for site, kind in zip(self._order, plan):
            self.counters.site(step.index, site.branch, batch, tokens if kind == "c" else 0)
        self._pending, self._batch = None, None

    # -- traced wrappers: they read the plan and the store, nothing else of the run ---------------
    def _block_forward(self, index: int, depth: int, original):
        def forward(*args, **kwargs):
            return original(*args, **kwargs)

        return forward

    def _site_forward(self, site: Site, original):
        index = len(self._order)
        self._order.append(site)

        def forward(*args, **kwargs):
            plan = self._plan
            if plan is None:
                return original(*args, **kwargs)
            x = args[0] if args else kwargs["hidden_states"]  # (B, N, C)
            self._batch = x.shape[0]
            if plan[index] == "r":
                return self.store[site]  # (B, N, C_out)
            out = original(*args, **kwargs)  # (B, N, C_out)
            if self._keep[site]:
                self.store[site] = out
            return out

        return forward


def compile_cached(model: nn.Module, mode: Optional[str] = None, backend: str = "inductor", device: str = "cpu"):
    """``torch.compile`` a model that carries a ``StaticCompileEngine``.

    ``mode="reduce-overhead"`` captures CUDA graphs, one per step kind (the plan's guards pick the
    graph); on a device other than CUDA it falls back to the default mode, since CUDA graphs do not
    exist there. ``backend`` other than inductor (eager, aot_eager) ignores ``mode``.
    """
    if mode == "reduce-overhead" and not str(device).startswith("cuda"):
        mode = None  # no CUDA graphs off the GPU: plain compilation, same results
    if backend != "inductor":
        mode = None
    return torch.compile(model, backend=backend, mode=mode, dynamic=False)
