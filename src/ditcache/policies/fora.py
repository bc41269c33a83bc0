"""FORA: reuse every block's attention and MLP between full steps a fixed interval apart.

Selvaraju et al. 2024, "FORA: Fast-Forward Caching in Diffusion Transformer Acceleration",
https://arxiv.org/abs/2407.01425. In the count-down respaced index r of the official code, a step
is full iff it is the first step or r mod N == 0 (methods.md §2).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..types import RunInfo
from .base import positive_int, register_policy
from .schedule import Schedule, step_schedule
from .static import StaticPolicy


@dataclass(frozen=True)
class ForaConfig:
    interval: int = 3  # N; the FORA README runs N = 3


def fora_schedule(num_steps: int, depth: int, interval: int, branches: int = 2) -> Schedule:
    positive_int(interval, "FORA interval")
    cached = []
    for step in range(num_steps):
        respaced = num_steps - 1 - step
        full = respaced == num_steps - 1 or respaced % interval == 0
        if not full:
            cached.append(step)
    return step_schedule(num_steps, depth, cached, f"fora-{interval}", branches)


class ForaPolicy(StaticPolicy):
    name = "fora"

    def __init__(self, config: ForaConfig):
        positive_int(config.interval, "FORA interval")
        self.config = config

    def build(self, run: RunInfo) -> Schedule:
        return fora_schedule(run.num_steps, run.depth, self.config.interval, len(run.branches))


@register_policy("fora", ForaConfig, "FORA: full step every N steps, all attention and MLP reused between")
def _fora(config: ForaConfig) -> ForaPolicy:
    return ForaPolicy(config)
