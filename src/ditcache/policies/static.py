"""Static policies: a Schedule built when the run starts, then looked up at every site."""

from __future__ import annotations

from typing import Optional

from ..types import COMPUTE, REUSE, Action, RunInfo, Site, StepInfo
from .base import Policy
from .schedule import Schedule


class StaticPolicy(Policy):
    """Reuse exactly the sites a Schedule lists; compute all others."""

    def build(self, run: RunInfo) -> Schedule:
        raise NotImplementedError

    def fixed_schedule(self) -> Optional[Schedule]:
        """The schedule when it does not depend on the run (a published preset, a file), else None."""
        return None

    def reset(self, run: RunInfo) -> None:
        super().reset(run)
        schedule = self.build(run)
        schedule.check_fits(run.num_steps, run.depth, run.branches)
        self._schedule = schedule
        self._reused_sites = {site for i in range(run.num_steps) for site in schedule.cached_sites(i)}

    def schedule(self) -> Schedule:
        return self._schedule

    def action(self, step: StepInfo, site: Site) -> Action:
        return REUSE if self._schedule.is_cached(step.index, site) else COMPUTE

    def may_reuse(self, site: Site) -> bool:
        return site in self._reused_sites
