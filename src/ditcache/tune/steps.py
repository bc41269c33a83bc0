"""Step sets: the search space of ``ditcache tune`` and the reuse-error proxy that orders it.

A *step set* is the set of steps at which every attention and MLP sub-layer reuses its cached
feature (``rule:steps=A/B/C``); FORA and the RM presets are step sets too. Its compute fraction is
exactly ``1 - len(steps) / num_steps``, so the compute target fixes how many steps are reused and
the search only has to decide *which*.

Which steps are cheap to reuse is measured on the uncached trajectory (``ChangeRecorder``): the
relative change of every site's output from one step to the next,

    d_t = mean over sites and samples of ||F_t - F_{t-1}|| / ||F_{t-1}||,

and reusing step t when the last computed step is s costs about ``d_{s+1} + ... + d_t`` (the
feature is that stale; the triangle inequality makes the sum an upper bound). ``proxy_cost`` adds
that up over the reused steps. It is a cheap ranking, not a quality figure: the search samples
the candidates it ranks best and keeps what the samples say.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ..policies.base import Policy
from ..types import Action, Site, StepInfo


class ChangeRecorder(Policy):
    """An uncached policy that records each step's relative feature change (``d_t`` above)."""

    name = "none"

    def __init__(self):
        self.sums: dict[int, float] = {}
        self.counts: dict[int, int] = {}
        self._last: dict[Site, torch.Tensor] = {}

    def reset(self, run) -> None:
        super().reset(run)
        self._last = {}

    def observe(self, step: StepInfo, site: Site, action: Action, inputs: tuple, output: torch.Tensor):
        prev = self._last.get(site)
        self._last[site] = output.detach().clone()
        if prev is not None and prev.shape == output.shape:
            change = (output.float() - prev.float()).norm() / prev.float().norm().clamp_min(1e-12)
            self.sums[step.index] = self.sums.get(step.index, 0.0) + float(change)
            self.counts[step.index] = self.counts.get(step.index, 0) + 1
        return None

    def changes(self, num_steps: int) -> list[float]:
        """d_t for t = 0..num_steps-1 (d_0 = 0: nothing precedes the first step)."""
        return [self.sums.get(t, 0.0) / self.counts[t] if self.counts.get(t) else 0.0 for t in range(num_steps)]


def proxy_cost(steps: Iterable[int], changes: Sequence[float]) -> float:
    """Summed staleness of the reused steps: for each, the change accumulated since the last computed step."""
    reused, cost, stale = set(steps), 0.0, 0.0
    for t in range(1, len(changes)):
        stale += changes[t]
        if t in reused:
            cost += stale
        else:
            stale = 0.0
    return cost


def greedy_steps(k: int, changes: Sequence[float]) -> tuple[int, ...]:
    """k reused steps added one at a time, each the one that raises ``proxy_cost`` least."""
    chosen: set[int] = set()
    for _ in range(min(k, len(changes) - 1)):
        best = min((t for t in range(1, len(changes)) if t not in chosen),
                   key=lambda t: (proxy_cost(chosen | {t}, changes), t))
        chosen.add(best)
    return tuple(sorted(chosen))


def trim(steps: Iterable[int], k: int, changes: Sequence[float]) -> tuple[int, ...]:
    """Keep k of ``steps``, computing again the ones whose reuse costs most (by the proxy)."""
    kept = set(steps)
    while len(kept) > k:
        drop = min(kept, key=lambda t: (proxy_cost(kept - {t}, changes), t))
        kept.discard(drop)
    return tuple(sorted(kept))


def swaps(steps: Sequence[int], changes: Sequence[float], limit: int) -> list[tuple[int, ...]]:
    """The ``limit`` neighbours (one reused step swapped for one computed step) of lowest proxy cost."""
    reused = set(steps)
    free = [u for u in range(1, len(changes)) if u not in reused]
    out = {tuple(sorted(reused - {t} | {u})) for t in reused for u in free}
    return sorted(out, key=lambda s: (proxy_cost(s, changes), s))[:limit]


def steps_spec(steps: Sequence[int], corrector: str = "") -> str:
    """'rule:steps=1/3/5' (+ a corrector suffix such as '+goc')."""
    return f"rule:steps={'/'.join(str(t) for t in sorted(steps))}{corrector}"
