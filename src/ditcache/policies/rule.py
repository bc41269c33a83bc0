"""Rule-based schedules: an explicit (step x block x branch) map, from a preset or a file.

The presets are the "Rule-based Method" (RM) of the EOC and GOC papers (methods.md §2), defined
there for DDIM-20 and written here for any step count:
- rm-50: every odd step fully reused ({1, 3, ..., 19} at 20 steps);
- rm-25: the odd steps of the first half ({1, 3, 5, 7, 9} at 20 steps);
- rm-75: a full step every fourth step, the other three reused. EOC v3 reports a 75% setting
  whose schedule is not published; with interval 2 it cannot exceed 50%, so this is our choice.

``steps=1/3/5`` reuses every sub-layer at exactly the listed steps (a hand-made schedule of any
compute, e.g. to match a learned one); ``path=`` reads any step x block x branch map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..types import RunInfo
from .base import register_policy
from .schedule import Schedule, step_schedule
from .static import StaticPolicy


def rm_steps(preset: str, num_steps: int) -> list[int]:
    """The cached steps of a rule preset at ``num_steps`` steps."""
    if preset == "rm-50":
        return list(range(1, num_steps, 2))
    if preset == "rm-25":
        return list(range(1, num_steps // 2, 2))
    if preset == "rm-75":
        return [s for s in range(num_steps) if s % 4 != 0]
    raise ValueError(f"unknown rule preset {preset!r}; choose from {sorted(PRESETS)}")


PRESETS = ("rm-25", "rm-50", "rm-75")


@dataclass(frozen=True)
class RuleConfig:
    preset: Optional[str] = "rm-50"  # one of PRESETS
    path: Optional[str] = None  # a schedule JSON file (Schedule.to_json format); overrides preset
    steps: Optional[tuple[int, ...]] = None  # fully reused steps, e.g. "1/3/5"; overrides preset


class RulePolicy(StaticPolicy):
    name = "rule"

    def __init__(self, config: RuleConfig, schedule: Optional[Schedule] = None):
        self.config = config
        self._fixed = schedule
        if config.path is not None and config.steps is not None:
            raise ValueError("rule takes path=FILE or steps=A/B/C, not both")
        if config.steps is not None and len(set(config.steps)) != len(config.steps):
            dup = sorted({t for t in config.steps if config.steps.count(t) > 1})
            raise ValueError(f"rule steps list step(s) {dup} more than once; give each reused step once")
        if config.steps is not None and 0 in config.steps:
            raise ValueError("rule steps: step 0 has nothing to reuse (no feature is cached before it)")
        if schedule is None and config.path is not None:
            self._fixed = Schedule.load(config.path)
        elif schedule is None and config.steps is None and config.preset not in PRESETS:
            raise ValueError(f"unknown rule preset {config.preset!r}; choose from {list(PRESETS)} or give a path")

    def fixed_schedule(self) -> Optional[Schedule]:
        return self._fixed

    def describe(self) -> dict:
        """Only the options in use: a preset is ignored once steps= or path= is given."""
        d = super().describe()
        if self.config.steps is not None or self.config.path is not None:
            d["preset"] = None
        return d

    def build(self, run: RunInfo) -> Schedule:
        if self._fixed is not None:
            return self._fixed
        if self.config.steps is not None:
            name = "steps-" + "-".join(str(t) for t in self.config.steps)
            return step_schedule(run.num_steps, run.depth, self.config.steps, name, len(run.branches))
        steps = rm_steps(self.config.preset, run.num_steps)
        return step_schedule(run.num_steps, run.depth, steps, self.config.preset, len(run.branches))


@register_policy("rule", RuleConfig, "an explicit step x block x branch schedule: preset rm-25/rm-50/rm-75, steps=A/B/C (all "
                 "sub-layers reused at those steps) or a JSON file (path=)")
def _rule(config: RuleConfig) -> RulePolicy:
    return RulePolicy(config)


def schedule_policy(schedule: Schedule) -> RulePolicy:
    """A rule policy over an in-memory schedule (L2C's thresholded router, a user's array)."""
    return RulePolicy(RuleConfig(preset=None, path=None), schedule=schedule)
