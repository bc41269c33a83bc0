"""FID intervals for ``bench --peers``: every row's 95% bootstrap interval, its paired difference from
the uncached row, and a rescore of a finished run's kept Inception features against another reference."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import numpy as np

from ..atomic import write_atomic
from ..metrics.bootstrap import REPLICATES
from .compare import slug

NONE = "none"  # the uncached row's spec (peers.NONE)


def features_path(folder, spec: str) -> Path:
    """Where a row's features are kept: its spec made a file name, with a hash (specs can be long)."""
    return Path(folder) / f"{slug(spec)[:80]}-{hashlib.sha1(spec.encode()).hexdigest()[:10]}.npz"


def save_features(folder, spec: str, feats: dict) -> None:
    """Keep a row's Inception features {"pool", "spatial"} for ``rescore_peers``."""
    path = features_path(folder, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.asarray(v, np.float32) for k, v in feats.items()}  # exact: the network computes in float32
    write_atomic(path, lambda tmp: np.savez(tmp, **arrays))


def rescore_peers(rows: list[dict], features_dir, reference: str = "mnist", reference_limit: Optional[int] = None,
                  bootstrap: int = REPLICATES) -> list[dict]:
    """The rows of an earlier run (its ``--json``) with FID, sFID, precision, recall and the intervals
    computed again from the Inception features it kept (``features_dir``) against another reference
    (e.g. the full set once its statistics exist); sampling and fidelity are not redone."""
    from ..metrics.evaluate import metrics_from_features
    from ..metrics.inception import InceptionExtractor
    from ..metrics.reference import get_reference

    ref = get_reference(reference, InceptionExtractor(), limit=reference_limit)
    out, replicates = [], {}
    for row in rows:
        row = {k: v for k, v in row.items() if not k.startswith(("fid_", "fid_diff"))}
        path = features_path(features_dir, row["spec"])
        if row.get("status") == "ok" and path.is_file():
            with np.load(path) as data:
                feats = {k: data[k].astype(np.float64) for k in data.files}
            m, reps = metrics_from_features(feats, ref, bootstrap)
            row.update({k: m[k] for k in ("fid", "sfid", "precision", "recall", "num_reference")})
            if reps is not None:
                replicates[row["spec"]] = reps
        out.append(row)
    add_intervals(out, replicates)
    return out


def add_intervals(rows: list[dict], replicates: dict) -> None:
    """Each row's 95% FID interval, and its FID minus the uncached row's with the paired interval: every
    system sampled the same noise and labels index by index, and every row's bootstrap replicates drew
    the same indices (bootstrap.py), as ``ditcache compare`` reports them."""
    from ..metrics.bootstrap import interval_columns

    base = (rows[0]["fid"], replicates[NONE]) if NONE in replicates else None
    for row in rows:
        reps = replicates.get(row["spec"])
        if reps is not None:
            row.update(interval_columns(row["fid"], reps, None if row["spec"] == NONE else base))
