"""The corrector protocol: transform a reused feature before the model applies its gate.

Correctors (EOC's trend multiply, GOC's gradient extrapolation) compose with any policy. The
engine calls ``correct`` only on REUSE, and ``observe`` after every site call with the feature the
model actually used, so a corrector can keep its own history (GOC's gradient queue).

Step-ahead correction: with a static schedule the engine knows at the start of a step which sites
reuse. A corrector whose ``correct`` at step t reads only what ``observe`` saw at steps before t
(``ahead = True``: EOC, GOC, forecast) is asked once per step, at its start, for every reused site
(``correct_step``), and may fuse the element-wise work of all of them (``torch._foreach_*``). The
compiled engine runs correctors only this way, outside the traced forward.
"""

from __future__ import annotations

import torch

from ..registry import Registry
from ..types import Kind, RunInfo, Site, StepInfo


class Corrector:
    name = "identity"
    # True when ``correct`` at step t depends only on what ``observe`` saw at steps < t (never on
    # another site of the same step): the engine may then correct a whole step at its start
    ahead = False

    def bind(self, schedule) -> None:
        """Called by the engine before ``reset``: the policy's static ``Schedule`` for the run, or None
        for a dynamic policy. Only a corrector whose rule depends on other sites' actions needs it
        (GOC compensates only in blocks whose attention and MLP are both reused)."""

    def reset(self, run: RunInfo) -> None:
        """Called at the start of every sampling call; drop per-run state."""
        self.run = run

    def correct(self, step: StepInfo, site: Site, cached: torch.Tensor) -> torch.Tensor:
        return cached

    def correct_step(self, step: StepInfo, sites: list[Site], features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The corrected features of all ``sites`` reused at ``step``, in install order; ``features``
        are the stored ones (or the previous corrector's). Only called when ``ahead`` is True."""
        return [self.correct(step, site, feature) for site, feature in zip(sites, features)]

    def observe(self, step: StepInfo, site: Site, kind: Kind, used: torch.Tensor) -> None:
        """Sees the feature used at a site, whether computed, partially computed or reused."""

    def memory_bytes(self) -> int:
        return 0

    def describe(self) -> dict:
        import dataclasses

        cfg = getattr(self, "config", None)
        return {"name": self.name, **(dataclasses.asdict(cfg) if cfg is not None else {})}


def _load_correctors() -> None:
    for module in ("eoc", "goc", "forecast"):
        try:
            __import__(f"{__package__}.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"{__package__}.{module}":
                raise


CORRECTORS = Registry("corrector", _load_correctors)
register_corrector = CORRECTORS.register
