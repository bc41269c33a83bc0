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

Correctors (EOC, GOC, forecast: every one with ``Corrector.ahead``) run on the host, outside the
traced forward: at ``begin_step`` the engine first hands them what the previous step used
(``observe``, in install order), then makes the corrected feature of every reused site in one call
per corrector (``correct_step``; GOC and EOC fuse it into ``torch._foreach_*`` kernels on CUDA). A site whose feature a corrector changed is "x" in the plan
and its wrapper returns the corrected tensor; "r" (reused as stored) and "c" stay as before. The
bound on compiled variants is then one per distinct plan (with GOC on rm-50: computed, reused plain,
reused corrected, so 3), plus the first step's, whose store is still empty.

Features and outputs equal the eager engine's bit for bit with ``backend="eager"`` and
``"aot_eager"``, correctors included (tests/engine/test_compiled.py, test_compiled_correctors.py);
inductor reorders float sums like any fused kernel does.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
from torch import nn

from ..policies.static import StaticPolicy
from ..types import Kind, RunInfo, Site, StepInfo
from .engine import CacheEngine

NEEDS_STATIC = "compiled caching needs a static policy (none, fora, rule, l2c); {name!r} decides as it goes: run it eagerly"
NO_CORRECTORS = ("compiled caching runs only correctors that can correct a step at its start; run {names} "
                 "with the eager engine")


class StaticCompileEngine(CacheEngine):
    """A ``CacheEngine`` whose wrappers are traceable by dynamo for static schedules."""

    _plan: Optional[str] = None  # the current step's row ("c"/"r"/"x" per site in install order); None outside a run
    # no input wrappers: a reused site's input has no use in the traced graph, so the compiler drops it
    patches_inputs = False

    def install(self) -> "StaticCompileEngine":
        self._order: list[Site] = []  # the sites in the order their wrappers were made
        # one dict object each for the engine's life (dynamo guards on them), cleared, never replaced
        self._corrected: dict[Site, torch.Tensor] = {}  # this step's "x" sites: never a stored tensor
        self._seen: dict[Site, torch.Tensor] = {}  # computed features of sites the store does not keep
        return super().install()

    def begin_run(self, info: RunInfo) -> None:
        if not isinstance(self.policy, StaticPolicy) and self.policy.name != "none":
            raise ValueError(NEEDS_STATIC.format(name=self.policy.name))
        refused = [c.name for c in self.correctors if not c.ahead]
        if refused:
            raise ValueError(NO_CORRECTORS.format(names=", ".join(refused)))
        self.step_ahead = True  # the only way this engine runs correctors, on every device
        super().begin_run(info)
        self._corrected.clear()
        self._seen.clear()
        self._plans: set[str] = set()  # the distinct schedule rows of this run
        self._plan = None
        self._pending: Optional[tuple[StepInfo, str]] = None  # the step still to count
        self._batch: Optional[int] = None  # recorded by the wrappers: a host-side attribute store

    def begin_step(self, step: StepInfo) -> None:
        self._flush()
        super().begin_step(step)  # with correctors: the step's corrected features, into _ahead
        reused = set(self._reused_now)
        # a dict of its own for the changed features, so no graph input is also a stored tensor
        self._corrected.clear()
        self._corrected.update((site, f) for site, f in self._ahead.items() if f is not self.store.get(site))
        self._ahead.clear()
        # the row as a string, "c" computed, "r" reused as stored, "x" reused corrected, in install
        # order: dynamo guards on a string's value exactly, so each distinct row is one compiled variant
        self._plan = "".join("x" if site in self._corrected else "r" if site in reused else "c" for site in self._order)
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

    def memory_bytes(self) -> int:
        held = {id(t): t for t in [*self._corrected.values(), *self._seen.values()]}
        extra = sum(t.numel() * t.element_size() for t in held.values())
        return super().memory_bytes() + extra

    def _flush(self) -> None:
        """Count the finished step from its plan, as the eager wrappers would have counted it, and
        hand the correctors what it used."""
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
        if self.correctors:
            self._observe(step, plan)
        self._pending, self._batch = None, None

    def _observe(self, step: StepInfo, plan: str) -> None:
        """``observe`` for every site of the finished step, in install order, as the eager wrappers call it."""
        start = time.perf_counter()
        for site, kind in zip(self._order, plan):
            if kind == "x":
                used = self._corrected[site]
            elif kind == "r" or self._keep[site]:
                used = self.store[site]
            else:
                used = self._seen[site]
            for corrector in self.correctors:
                corrector.observe(step, site, Kind.COMPUTE if kind == "c" else Kind.REUSE, used)
        self._corrected.clear()
        self._seen.clear()
        self.corrector_seconds += time.perf_counter() - start

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
            if plan[index] == "x":
                return self._corrected[site]  # (B, N, C_out), made at begin_step
            out = original(*args, **kwargs)  # (B, N, C_out)
            if self._keep[site]:
                self.store[site] = out
            elif self.correctors:
                self._seen[site] = out  # for the correctors' observe at the next begin_step
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
