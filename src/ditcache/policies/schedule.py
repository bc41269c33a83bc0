"""Static schedules: which (step, block, branch) sites reuse their cached feature.

A ``Schedule`` is a boolean array ``cached[step, block, branch]`` (branch 0 = attention, 1 = MLP),
steps counting up from 0. It is what FORA, the rule presets and a thresholded L2C router all
reduce to, so every corrector composes with every static policy.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import write_atomic
from ..types import BRANCHES, Site


@dataclass(frozen=True)
class Schedule:
    """``cached[step, block, branch]``: True where the site reuses the cached feature."""

    cached: np.ndarray  # (num_steps, depth, 2) bool
    name: str = "custom"

    def __post_init__(self):
        arr = np.asarray(self.cached, dtype=bool)
        if arr.ndim != 3 or arr.shape[2] != 2:
            raise ValueError(f"a schedule is (steps, blocks, 2); got shape {arr.shape}")
        if arr.shape[0] and arr[0].any():
            raise ValueError("step 0 cannot reuse: nothing has been computed yet")
        object.__setattr__(self, "cached", arr)

    @property
    def num_steps(self) -> int:
        return self.cached.shape[0]

    @property
    def depth(self) -> int:
        return self.cached.shape[1]

    def is_cached(self, step: int, site: Site) -> bool:
        return bool(self.cached[step, site.block, BRANCHES.index(site.branch)])

    def check_fits(self, num_steps: int, depth: int) -> None:
        """A schedule made for another step count or depth is an error, never truncated."""
        if (self.num_steps, self.depth) != (num_steps, depth):
            raise ValueError(
                f"schedule {self.name!r} is for {self.num_steps} steps x {self.depth} blocks, "
                f"but the run has {num_steps} steps x {depth} blocks"
            )

    @property
    def cached_fraction(self) -> float:
        """Fraction of all attention+MLP sub-layer calls that reuse."""
        return float(self.cached.mean())

    def cached_sites(self, step: int) -> list[Site]:
        out = []
        for block in range(self.depth):
            for b, branch in enumerate(BRANCHES):
                if self.cached[step, block, b]:
                    out.append(Site(block, branch))
        return out

    # -- file format: {"name", "num_steps", "depth", "steps": [{"step", "cached_attn", "cached_mlp"}]}
    def to_json(self) -> dict:
        steps = []
        for i in range(self.num_steps):
            attn = np.flatnonzero(self.cached[i, :, 0]).tolist()
            mlp = np.flatnonzero(self.cached[i, :, 1]).tolist()
            steps.append({"step": i, "cached_attn": attn, "cached_mlp": mlp})
        return {"name": self.name, "num_steps": self.num_steps, "depth": self.depth, "schedule": steps}

    @staticmethod
    def from_json(data: dict, name: str | None = None) -> "Schedule":
        """Read the format of ``to_json`` (also the shared L2C schedule file's entries)."""
        try:
            num_steps = int(data.get("num_steps", data.get("steps")))
            depth = int(data["depth"])
            rows = data["schedule"]
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a schedule: needs num_steps (or steps), depth and schedule ({err})") from None
        cached = np.zeros((num_steps, depth, 2), dtype=bool)
        for row in rows:
            step = int(row["step"])
            if not 0 <= step < num_steps:
                raise ValueError(f"schedule row for step {step} is outside 0..{num_steps - 1}")
            for b, key in enumerate(("cached_attn", "cached_mlp")):
                for block in row.get(key, []):
                    if not 0 <= int(block) < depth:
                        raise ValueError(f"step {step}: block {block} is outside 0..{depth - 1}")
                    cached[step, int(block), b] = True
        return Schedule(cached, name or data.get("name", "custom"))

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_json())

    @staticmethod
    def load(path: str | os.PathLike) -> "Schedule":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"schedule file {path} does not exist")
        return Schedule.from_json(json.loads(path.read_text()), name=path.stem)

    def to_text(self) -> str:
        """A step x block map: '#' both cached, 'a' attention only, 'm' MLP only, '.' computed."""
        glyph = {(True, True): "#", (True, False): "a", (False, True): "m", (False, False): "."}
        lines = [f"{self.name}: {self.num_steps} steps x {self.depth} blocks, "
                 f"{self.cached_fraction:.1%} of sub-layer calls reused",
                 "step  " + "".join(str(b % 10) for b in range(self.depth))]
        for i in range(self.num_steps):
            row = "".join(glyph[(bool(a), bool(m))] for a, m in self.cached[i])
            lines.append(f"{i:4d}  {row}")
        return "\n".join(lines)


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """Write strict JSON through a temporary file and a rename, so a crash never leaves half a file."""

    from ..strict_json import dumps

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(dumps(data, indent=1))  # strict: NaN / infinity become null

    write_atomic(path, write)


def step_schedule(num_steps: int, depth: int, cached_steps, name: str) -> Schedule:
    """Every block's attention and MLP reused at the given steps, computed at the others."""
    cached = np.zeros((num_steps, depth, 2), dtype=bool)
    for step in cached_steps:
        if not 0 <= step < num_steps:
            raise ValueError(f"{name}: cached step {step} is outside 0..{num_steps - 1}")
        cached[step] = True
    return Schedule(cached, name)
