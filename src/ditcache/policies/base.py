"""The policy protocol and the registry that maps a method name to its config and factory.

A policy decides the Action for every (step, site). Static policies (none, FORA, rule, L2C) know
their whole schedule before sampling starts and expose it through ``schedule()``; dynamic ones
(ToCa, DuCa) decide as they go and may ``observe`` what the engine computed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..registry import Registry
from ..types import COMPUTE, Action, RunInfo, Site, StepInfo


class Policy:
    """Base class: compute everything. Subclasses override ``action``."""

    name = "none"
    uses_trunk = False  # True when trunk_action can return REUSE (DuCa)
    observes_kwargs = False  # True: ``observe`` also gets the sub-module's keyword arguments (kwargs=)

    def bind(self, modules: dict[Site, nn.Module]) -> None:
        """Called by the engine before ``reset``: the sub-module of every per-block site.

        Only policies that score tokens from a sub-module's weights need it (ToCa, DuCa).
        """

    def reset(self, run: RunInfo) -> None:
        """Called by the engine at the start of every sampling call; drop per-run state."""
        self.run = run

    def action(self, step: StepInfo, site: Site) -> Action:
        return COMPUTE

    def trunk_action(self, step: StepInfo) -> Action:
        return COMPUTE

    def runs_in_reused_trunk(self, step: StepInfo, block: int) -> bool:
        """At a step whose trunk is reused, True for a block that still runs: its sites are asked for
        their actions and stored as usual, and its output is discarded (DuCa's layer 0 that
        re-initialises the interval at an aggressive step)."""
        return False

    def may_reuse(self, site: Site) -> bool:
        """False when this policy never reuses the site, so the engine need not store it."""
        return False

    def observe(self, step: StepInfo, site: Site, action: Action, inputs: tuple, output: torch.Tensor) -> Optional[int]:
        """Sees the sub-module's input and the feature used at a site (token-wise methods).

        Returns the MACs the policy itself spent here (e.g. token scoring), which the engine adds
        to the run's MACs; None or 0 when it spent none. A policy with ``observes_kwargs`` also gets
        the sub-module's keyword arguments as ``kwargs=`` (a cross-attention's caption and mask).
        """

    def schedule(self):
        """The static Schedule for the current run, or None for dynamic policies."""
        return None

    def describe(self) -> dict:
        """Name and options, for reports and run names."""
        cfg = getattr(self, "config", None)
        options = dataclasses.asdict(cfg) if cfg is not None else {}
        return {"name": self.name, **options}


def _load_policies() -> None:
    from . import load_all

    load_all()  # every built-in policy registers itself on import


POLICIES = Registry("cache policy", _load_policies)
register_policy = POLICIES.register


def make_policy(name: str, **options) -> Policy:
    """Build a registered policy from keyword options; unknown names and options are errors."""
    return POLICIES.make(name, **options)


@dataclass(frozen=True)
class NoConfig:
    """A policy without options."""


@register_policy("none", NoConfig, "compute every site at every step (the uncached baseline)")
def _none(config: NoConfig) -> Policy:
    return Policy()


def positive_int(value: Optional[int], what: str) -> int:
    if value is None or int(value) != value or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)
