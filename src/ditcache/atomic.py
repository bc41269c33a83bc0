"""Atomic file writes: a temporary file beside the target, then one rename.

A crash mid-write leaves the old file (or none), never half a file, which is what lets every long
job here (training, calibration, sampling, reference statistics) resume safely.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary path in the target's folder, then rename it to ``path``.

    The temporary name ends with the target's suffix, so writers that append one (``np.savez``) don't.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; results are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
