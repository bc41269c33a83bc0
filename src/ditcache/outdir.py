"""One rule for every command that writes a folder (sample, compare, calibrate eoc, train, train-router).

1. Inputs are validated before ``claim`` is entered, and if the command fails before it has written
   any result, the claim is rolled back: the folder is as it was, and the corrected command is not
   blocked by settings it never used.
2. The folder is claimed with a lock file *beside* it, ``.<name>.lock`` (so it survives commands that
   replace the folder atomically), holding the pid, host and start time of the owner. A second run
   on the same folder is refused while the owner lives; a lock left by a process that is gone (same
   host, pid dead or reused) is taken over, with a note on stderr.
3. ``run.json`` records the settings; a run with other settings is refused unless ``overwrite``,
   which empties the folder first. A finished result with the same settings is reused, never
   recomputed or replaced.
4. Temporary files of a crashed atomic write (``.<name>.*.tmp*``) are removed on claim; commands
   check their own partial results (``sampling.sharded`` re-checks every shard).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from .atomic import write_atomic
from .strict_json import dumps

SETTINGS_FILE = "run.json"


class FolderInUse(ValueError):
    """Another live process holds the folder's lock."""


def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _stale(holder: dict) -> bool:
    """True when the lock's owner is certainly gone: same host, and its pid is dead or now another process."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return True
    return holder.get("start") is not None and _start_time(pid) not in (None, holder["start"])


def acquire(out: Path) -> Path:
    """Create the folder's lock (O_EXCL); take over a stale one; FolderInUse if a live process holds it."""
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}  # half-written by an owner killed at that instant: stale
            if holder and not _stale(holder):
                raise FolderInUse(f"{out} is in use by pid {holder.get('pid')} on {holder.get('host')} "
                                  f"(since {holder.get('since')}); wait for it, or delete {path} if that "
                                  "process is gone") from None
            stale = path.with_name(f"{path.name}.stale{os.getpid()}")
            try:
                os.replace(path, stale)  # only one of several takers renames it; the others retry
                os.remove(stale)
                print(f"note: took over {path} left by pid {holder.get('pid')}, which is gone", file=sys.stderr)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(_owner()))
        return path
    raise FolderInUse(f"could not lock {out}: its lock {path} keeps changing hands")


def release(out: Path) -> None:
    path = lock_path(out)
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def read_settings(out: Path) -> Optional[dict]:
    path = out / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None  # a torn write cannot happen (atomic), but a hand-edited file can: treat as absent


def _empty(out: Path) -> None:
    for child in out.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def _remove_temporaries(out: Path) -> None:
    """Leftovers of ``write_atomic`` / ``save_artifact`` killed mid-write: dot-names with '.tmp' or '.old'."""
    for folder in (out, out / "shards"):
        if folder.is_dir():
            for child in folder.glob(".*"):
                if ".tmp" in child.name or ".old" in child.name:
                    shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)


def settings_diff(saved: dict, now: dict) -> list[str]:
    return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))


@contextmanager
def claim(out: str | os.PathLike, settings: Optional[dict] = None, overwrite: bool = False,
          what: str = "a run") -> Iterator[Path]:
    """Hold ``out`` for the duration of a command (see the module docstring for the rule).

    ``settings`` None: the command keeps its own settings check (checkpoints, artifacts) and only
    the lock, ``overwrite`` and the rollback apply.
    """
    out = Path(out)
    existed = out.exists()
    if existed and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    acquire(out)
    wrote = False
    try:
        out.mkdir(parents=True, exist_ok=True)
        saved = read_settings(out)
        if overwrite and any(out.iterdir()):
            print(f"note: --overwrite: emptying {out}", file=sys.stderr)
            _empty(out)
            saved = None
        elif settings is not None and saved is not None and saved != dumps_roundtrip(settings):
            diff = ", ".join(settings_diff(saved, dumps_roundtrip(settings)))
            raise ValueError(f"{out} holds {what} with other settings ({diff}); pass --overwrite to replace it, "
                             "or use another --out folder")
        _remove_temporaries(out)
        if settings is not None and saved is None:
            write_atomic(out / SETTINGS_FILE, lambda tmp: Path(tmp).write_text(dumps(settings) + "\n"))
            wrote = True
        yield out
    except BaseException:
        if wrote and {p.name for p in out.iterdir()} <= {SETTINGS_FILE}:
            (out / SETTINGS_FILE).unlink()  # nothing was made with these settings: don't keep them
            if not existed:
                out.rmdir()
        elif not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    finally:
        release(out)


def dumps_roundtrip(settings: dict) -> dict:
    """``settings`` as they read back from run.json (tuples become lists, non-finite floats null)."""
    return json.loads(dumps(settings))


def describe_kept(out: Path) -> str:
    """'kept 3 finished batch shard(s) in OUT' and the like: what a resume will start from."""
    parts = []
    shards = out / "shards"
    if shards.is_dir():
        parts.append(f"{len(list(shards.glob('batch*.npz')))} finished batch shard(s)")
    if (out / "partial" / "manifest.json").is_file():
        done = json.loads((out / "partial" / "manifest.json").read_text()).get("meta", {}).get("done")
        parts.append(f"a partial prior of {done} samples")
    if (out / "checkpoint.pt").is_file():
        parts.append("the last checkpoint")
    rows = [p.parent.name for p in [*out.glob("*/row.json"), *out.glob("tuning/*/row.json")]]
    if rows:
        parts.append(f"{len(rows)} finished configuration(s)")
    for name in ("samples.npz", "manifest.json"):
        if (out / name).is_file():
            parts.append(name)
    return f"kept {', '.join(parts)} in {out}" if parts else f"{out} holds nothing finished yet"
