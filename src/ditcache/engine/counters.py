"""What ran: sub-layer calls and MACs per step, counted by the engine as it intercepts."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..adapters import Dims
from ..types import Branch


@dataclass
class StepCount:
    """One step's tally, in sample-forwards (a CFG batch of 2B counts 2B samples)."""

    sites_total: float = 0.0  # attention+MLP sub-layer calls the uncached model would make
    sites_run: float = 0.0  # of those, computed (a PARTIAL call counts k/N)
    macs_total: int = 0
    macs_run: int = 0  # includes extra_macs
    extra_macs: int = 0  # spent by the policy beyond the model's own layers (token scoring)


@dataclass
class Counters:
    dims: Dims
    steps: dict[int, StepCount] = field(default_factory=dict)

    def _at(self, step: int) -> StepCount:
        return self.steps.setdefault(step, StepCount())

    def forward(self, step: int, batch: int) -> None:
        """The parts of a forward that always run: embeddings and the final layer."""
        c = self._at(step)
        c.macs_total += batch * self.dims.outer_macs
        c.macs_run += batch * self.dims.outer_macs

    def block(self, step: int, batch: int, skipped: bool) -> None:
        """One block's adaLN modulation; under a trunk reuse the block does not run at all."""
        c = self._at(step)
        c.macs_total += batch * self.dims.block_fixed_macs
        if not skipped:
            c.macs_run += batch * self.dims.block_fixed_macs

    def site(self, step: int, branch: Branch, batch: int, tokens_run: int) -> None:
        """One attention or MLP site; ``tokens_run`` is N (computed), k (partial) or 0 (reused)."""
        c = self._at(step)
        n = self.dims.num_tokens
        c.sites_total += batch
        c.sites_run += batch * tokens_run / n
        c.macs_total += batch * self.dims.site_macs(branch)
        if tokens_run:
            c.macs_run += batch * self.dims.site_macs(branch, tokens_run)

    def extra(self, step: int, macs: int) -> None:
        """Work the policy did for its decisions; it is real compute, so it counts as run."""
        c = self._at(step)
        c.extra_macs += int(macs)
        c.macs_run += int(macs)

    def report(self) -> dict:
        """Totals and per-step figures; ratios are of this run's calls, not estimates."""
        steps = [self.steps[i] for i in sorted(self.steps)]
        sites_total = sum(s.sites_total for s in steps)
        macs_total = sum(s.macs_total for s in steps)
        return {
            "sites_run": sum(s.sites_run for s in steps),
            "sites_total": sites_total,
            "compute_fraction": sum(s.sites_run for s in steps) / sites_total if sites_total else 1.0,
            "macs_ratio": sum(s.macs_run for s in steps) / macs_total if macs_total else 1.0,
            "macs_run": sum(s.macs_run for s in steps),
            "macs_total": macs_total,
            "extra_macs": sum(s.extra_macs for s in steps),
            "per_step_compute_fraction": [s.sites_run / s.sites_total if s.sites_total else 1.0 for s in steps],
        }
