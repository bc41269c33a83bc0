"""Where the project's shared data lives: a ``shared`` folder beside the repository (CI, local work).

The folder is never part of the package. Lookup order: ``$DITCACHE_SHARED`` (when set, it is the
only place looked at); ``../shared`` from the current directory; a ``shared`` folder beside any
folder above this file (the repository root).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

SHARED_ENV = "DITCACHE_SHARED"


def shared_path(relative: str | os.PathLike, present: Callable[[Path], bool] = Path.exists) -> Path:
    """Return ``<shared>/relative`` for the first candidate shared folder where ``present`` holds.

    If none holds, the first candidate is returned, so that the caller's error names a real place.
    """
    relative = Path(relative)
    env = os.environ.get(SHARED_ENV)
    if env:
        return Path(env).expanduser() / relative
    candidates = [Path.cwd().parent / "shared" / relative]
    candidates += [parent.parent / "shared" / relative for parent in Path(__file__).resolve().parents]
    for path in candidates:
        if present(path):
            return path
    return candidates[0]
