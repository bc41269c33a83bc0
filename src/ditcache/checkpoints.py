"""Resumable training checkpoints: written atomically, refused when made with another config."""

from __future__ import annotations

import dataclasses
import os

import torch

from .atomic import write_atomic


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """torch.save through a temporary file and a rename: a crash never leaves half a checkpoint."""
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def load_resumable(path: str | os.PathLike, config, may_change: tuple[str, ...]) -> dict:
    """The checkpoint's state, after checking that it was made with ``config``.

    Fields in ``may_change`` (e.g. the iteration target) may differ: a longer or shorter run of the
    same training is the same training. Any other difference is an error that names the fields.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated or not a checkpoint: torch raises several kinds
        raise ValueError(f"{path} is damaged ({type(err).__name__}: {' '.join(str(err).split())[:120]}); pass "
                         "--overwrite to start again, or use another --out folder") from None
    saved, now = dict(state["config"]), dataclasses.asdict(config)
    for key in may_change:
        saved.pop(key, None), now.pop(key, None)
    if saved != now:
        diff = {k: (saved.get(k), now.get(k)) for k in now if saved.get(k) != now.get(k)}
        raise ValueError(f"{path} was made with another config {diff} (saved, asked); pass --overwrite to start again, or use another --out folder")
    return state
