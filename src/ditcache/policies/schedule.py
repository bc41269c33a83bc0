"""Static schedules: which (step, block, branch) sites reuse their cached feature.

A ``Schedule`` is a boolean array ``cached[step, block, branch]`` (branch 0 = attention, 1 = MLP,
and 2 = cross-attention on text-conditioned models such as PixArt), steps counting up from 0. It is what FORA, the rule presets and a thresholded L2C router all
reduce to, so every corrector composes with every static policy.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import write_atomic
from ..types import WITH_CROSS, Branch, Site


@dataclass(frozen=True)
class Schedule:
    """``cached[step, block, branch]``: True where the site reuses the cached feature."""

    cached: np.ndarray  # (num_steps, depth, 2 or 3) bool; columns in WITH_CROSS order
    name: str = "custom"

    def __post_init__(self):
        arr = np.asarray(self.cached, dtype=bool)
        if arr.ndim != 3 or arr.shape[2] not in (2, 3):
            raise ValueError(f"a schedule is (steps, blocks, 2) or, with cross-attention, (steps, blocks, 3); "
                             f"got shape {arr.shape}")
        if arr.shape[0] and arr[0].any():
            raise ValueError("step 0 cannot reuse: nothing has been computed yet")
        object.__setattr__(self, "cached", arr)

    @property
    def num_steps(self) -> int:
        return self.cached.shape[0]

    @property
    def depth(self) -> int:
        return self.cached.shape[1]

    @property
    def branches(self) -> tuple[Branch, ...]:
        """The branches this schedule has a column for."""
        return WITH_CROSS[:self.cached.shape[2]]

    def is_cached(self, step: int, site: Site) -> bool:
        return bool(self.cached[step, site.block, WITH_CROSS.index(site.branch)])

    def check_fits(self, num_steps: int, depth: int, branches: tuple[Branch, ...] | None = None) -> None:
        """A schedule made for another step count, depth or block layout is an error, never truncated."""
        if (self.num_steps, self.depth) != (num_steps, depth):
            raise ValueError(
                f"schedule {self.name!r} is for {self.num_steps} steps x {self.depth} blocks, "
                f"but the run has {num_steps} steps x {depth} blocks"
            )
        if branches is not None and tuple(branches) != self.branches:
            have = "/".join(b.value for b in self.branches)
            want = "/".join(b.value for b in branches)
            raise ValueError(f"schedule {self.name!r} has columns {have}, but this model's blocks have {want}; "
                             "give a schedule made for this model family")

    @property
    def cached_fraction(self) -> float:
        """Fraction of all attention+MLP sub-layer calls that reuse."""
        return float(self.cached.mean())

    def cached_sites(self, step: int) -> list[Site]:
        out = []
        for block in range(self.depth):
            for b, branch in enumerate(self.branches):
                if self.cached[step, block, b]:
                    out.append(Site(block, branch))
        return out

    # -- file format: {"name", "num_steps", "depth", "schedule": [{"step", "cached_attn", "cached_mlp"
    #    (, "cached_cross")}]}: the cross column is written, and read, only where the schedule has one
    def to_json(self) -> dict:
        steps = []
        for i in range(self.num_steps):
            row = {"step": i}
            for b, branch in enumerate(self.branches):
                row[f"cached_{branch.value}"] = np.flatnonzero(self.cached[i, :, b]).tolist()
            steps.append(row)
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
        columns = 3 if any("cached_cross" in row for row in rows) else 2
        cached = np.zeros((num_steps, depth, columns), dtype=bool)
        for row in rows:
            step = int(row["step"])
            if not 0 <= step < num_steps:
                raise ValueError(f"schedule row for step {step} is outside 0..{num_steps - 1}")
            for b, key in enumerate(("cached_attn", "cached_mlp", "cached_cross")[:columns]):
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
        """A step x block map: '#' all cached, 'a' attention only, 'm' MLP only, '+' another mix
        (with cross-attention), '.' computed."""
        glyph = {(True, True): "#", (True, False): "a", (False, True): "m", (False, False): "."}
        lines = [f"{self.name}: {self.num_steps} steps x {self.depth} blocks, "
                 f"{self.cached_fraction:.1%} of sub-layer calls reused",
                 "step  " + "".join(str(b % 10) for b in range(self.depth))]
        for i in range(self.num_steps):
            row = "".join(_glyph(cells, glyph) for cells in self.cached[i])
            lines.append(f"{i:4d}  {row}")
        return "\n".join(lines)


def _glyph(cells: np.ndarray, two_columns: dict) -> str:
    if len(cells) == 2:
        return two_columns[(bool(cells[0]), bool(cells[1]))]
    return "#" if cells.all() else "." if not cells.any() else "+"


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """Write strict JSON through a temporary file and a rename, so a crash never leaves half a file."""

    from ..strict_json import dumps

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(dumps(data, indent=1))  # strict: NaN / infinity become null

    write_atomic(path, write)


def step_schedule(num_steps: int, depth: int, cached_steps, name: str, branches: int = 2) -> Schedule:
    """Every sub-layer of every block (``branches`` columns) reused at the given steps, computed at the others."""
    cached = np.zeros((num_steps, depth, branches), dtype=bool)
    for step in cached_steps:
        if not 0 <= step < num_steps:
            raise ValueError(f"{name}: cached step {step} is outside 0..{num_steps - 1}")
        cached[step] = True
    return Schedule(cached, name)
