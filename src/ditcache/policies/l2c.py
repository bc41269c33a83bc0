"""Learning-to-Cache (L2C) at inference: a trained router, thresholded into a static schedule.

Ma, Fang, Mi & Wang, "Learning-to-Cache: Accelerating Diffusion Transformer via Layer Caching",
NeurIPS 2024, https://arxiv.org/abs/2406.01733 (methods.md §3.4).

The router holds one logit per sampling step and sub-layer (index 2l: attention of block l, 2l+1:
its MLP; on blocks with cross-attention, such as PixArt's, 3l + c with c = 0 attention, 1 MLP,
2 cross-attention, and the schedule has three columns). The cache interval is 2 and is tied to the step index: the odd steps 1, 3, ... are the
*cache steps*, where a sub-layer is computed iff β = sigmoid(logit) > θ and otherwise reuses its
output of the step just before; every even step (step 0 included) computes everything. For an
even step count this is the paper's "even respaced index" rule; for an odd one the last step is a
full step, where the official code's call-counter parity would drift.

Two sources: ``router=PATH`` (an "l2c-router" artifact from ``ditcache train-router``, checked
against the run's model, sampler, steps, CFG scale and resolution; for a diffusers pipeline the
sampler is its scheduler's class and settings digest) or ``preset=NAME`` (the
schedules the authors published for DiT-XL/2 256x256, read from the shared data file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..calibration.artifact import ArtifactKey, load_artifact
from ..data.shared import shared_path
from ..types import RunInfo
from .base import register_policy
from .schedule import Schedule
from .static import StaticPolicy

ARTIFACT_KIND = "l2c-router"
DEFAULT_THRESHOLD = 0.1  # θ of the DiT-XL/2 256 routers at 10, 20 and 50 steps (methods.md §3.4)
PRESET_THRESHOLD = 0.1  # the published schedules were decoded at this θ
SCHEDULES_FILE = Path("data") / "l2c_dit_xl2_schedules.json"
PRESETS = {"dit-xl2-ddim20": "ddim20", "dit-xl2-ddim50": "ddim50"}  # preset name -> entry in the file


def cache_steps(num_steps: int) -> list[int]:
    """The steps where L2C may reuse: the odd steps (interval 2, tied to the step index)."""
    return list(range(1, num_steps, 2))


def is_cache_step(step: int) -> bool:
    return step % 2 == 1


def router_schedule(logits: torch.Tensor, threshold: float = DEFAULT_THRESHOLD, name: str = "l2c",
                    columns: int = 2) -> Schedule:
    """Threshold router logits (steps, columns·depth) into a Schedule of ``columns`` columns.

    At a cache step a sub-layer is cached iff β = sigmoid(logit) <= θ (computed iff β > θ); every
    other step computes everything.
    """
    check_threshold(threshold)
    beta = router_betas(logits, columns)
    cached = np.zeros(beta.shape, dtype=bool)
    for step in cache_steps(beta.shape[0]):
        cached[step] = beta[step] <= threshold
    return Schedule(cached, name)


def router_betas(logits: torch.Tensor, columns: int = 2) -> np.ndarray:
    """β = sigmoid(logit) of router logits (steps, columns·depth), as (steps, depth, columns):
    [attn, mlp], or [attn, mlp, cross] with three columns."""
    logits = torch.as_tensor(logits).detach().float().cpu()
    if columns not in (2, 3) or logits.dim() != 2 or logits.shape[1] % columns:
        raise ValueError(f"router logits must be (steps, {columns} * depth), got {tuple(logits.shape)}")
    return torch.sigmoid(logits).numpy().reshape(logits.shape[0], logits.shape[1] // columns, columns)


def router_columns(artifact) -> int:
    """Columns per block of an l2c-router artifact: 2, or 3 where its meta lists cross-attention."""
    return len(artifact.meta.get("branches", ("attn", "mlp")))


def fraction_schedule(logits: torch.Tensor, fraction: float, name: str = "l2c", columns: int = 2) -> Schedule:
    """Cache the lowest-β sub-layers of the cache steps until ``fraction`` of all sub-layer calls is reused.

    The same ranking as thresholding (a sub-layer is cached before any with a larger β), with θ
    chosen so the schedule reuses round(fraction · steps · columns · depth) sub-layers: the way to put a
    router's schedule beside a hand-made one of the same compute. Ties keep (step, block, branch) order.
    """
    beta = router_betas(logits, columns)
    steps = beta.shape[0]
    odd = cache_steps(steps)
    limit = len(odd) / steps
    if not 0.0 <= fraction <= limit:
        raise ValueError(f"an L2C schedule reuses only at its {len(odd)} cache steps of {steps}, so the "
                         f"reused fraction must be in [0, {limit:.3f}], got {fraction}")
    candidates = beta[odd].reshape(-1)  # the cache steps' β in (step, block, branch) order
    chosen = np.argsort(candidates, kind="stable")[:int(round(fraction * beta.size))]
    flat = np.zeros(candidates.shape, dtype=bool)
    flat[chosen] = True
    cached = np.zeros(beta.shape, dtype=bool)
    cached[odd] = flat.reshape(beta[odd].shape)
    return Schedule(cached, name)


def check_threshold(threshold: float) -> None:
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"the L2C threshold θ must be in (0, 1), got {threshold}")


def schedules_file() -> Path:
    """The shared JSON file with the published DiT-XL/2 schedules (see data/shared.py)."""
    return shared_path(SCHEDULES_FILE, Path.is_file)


def preset_schedule(preset: str) -> Schedule:
    """A published DiT-XL/2 schedule by name, checked against the totals the file states."""
    if preset not in PRESETS:
        raise ValueError(f"unknown L2C preset {preset!r}; choose from {sorted(PRESETS)}")
    path = schedules_file()
    if not path.is_file():
        raise FileNotFoundError(f"the L2C schedules file is not at {path}; set $DITCACHE_SHARED to the folder "
                                f"that holds {SCHEDULES_FILE}")
    entry = json.loads(path.read_text())[PRESETS[preset]]
    schedule = Schedule.from_json(entry, name=preset)
    cached = int(schedule.cached.sum())
    # I trust the file only as far as it agrees with itself
    if cached != entry["cached_sublayers"] or schedule.cached.size != entry["total_sublayers"]:
        raise ValueError(f"{path} entry {PRESETS[preset]!r} lists {cached} cached of {schedule.cached.size} "
                         f"sub-layers but states {entry['cached_sublayers']} of {entry['total_sublayers']}")
    return schedule


@dataclass(frozen=True)
class L2cConfig:
    router: Optional[str] = None  # an l2c-router artifact folder (ditcache train-router)
    preset: Optional[str] = None  # dit-xl2-ddim20 or dit-xl2-ddim50
    threshold: float = DEFAULT_THRESHOLD  # θ; a sub-layer at a cache step is computed iff β > θ
    fraction: Optional[float] = None  # instead of θ: reuse this fraction of all sub-layer calls, lowest β first


class L2cPolicy(StaticPolicy):
    """Reuse what a thresholded router (or a published L2C schedule) says, at the odd steps."""

    name = "l2c"

    def __init__(self, config: L2cConfig):
        if (config.router is None) == (config.preset is None):
            raise ValueError("l2c needs exactly one of router=PATH (a trained router) or "
                             f"preset=NAME ({', '.join(sorted(PRESETS))})")
        check_threshold(config.threshold)
        if config.fraction is not None and config.router is None:
            raise ValueError("fraction=F ranks a trained router's β; it applies to router=PATH only")
        self.config = config
        self.artifact = None
        self._preset = None
        if config.preset is not None:
            if config.threshold != PRESET_THRESHOLD:
                raise ValueError(f"the L2C presets are fixed schedules decoded at θ = {PRESET_THRESHOLD}; "
                                 "threshold applies to router=PATH only")
            self._preset = preset_schedule(config.preset)
        else:
            self.artifact = load_artifact(config.router, kind=ARTIFACT_KIND)

    def fixed_schedule(self) -> Optional[Schedule]:
        return self._preset

    def build(self, run: RunInfo) -> Schedule:
        if self._preset is not None:
            return self._preset  # StaticPolicy.reset refuses it for another depth or step count
        self.artifact.check(ARTIFACT_KIND, ArtifactKey.from_run(run))
        columns = router_columns(self.artifact)  # the schedule's columns; reset() checks them against the model's
        if self.config.fraction is not None:
            return fraction_schedule(self.artifact.tensors["logits"], self.config.fraction,
                                     f"l2c-{Path(self.config.router).name}-f{self.config.fraction:g}", columns)
        return router_schedule(self.artifact.tensors["logits"], self.config.threshold,
                               f"l2c-{Path(self.config.router).name}-t{self.config.threshold:g}", columns)


@register_policy("l2c", L2cConfig, "Learning-to-Cache: a trained router (router=PATH) or a published "
                 "DiT-XL/2 schedule (preset=dit-xl2-ddim20/50), thresholded at θ, or at the θ that reuses "
                 "fraction=F of all sub-layer calls (to match a hand-made schedule's compute)")
def _l2c(config: L2cConfig) -> L2cPolicy:
    return L2cPolicy(config)
