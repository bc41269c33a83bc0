"""Strict JSON out: NaN and infinity become null (Python's json writes ``NaN`` / ``Infinity``, which no
other JSON reader accepts), tuples become lists and anything else unknown becomes its string."""

from __future__ import annotations

import json
import math


def clean(obj):
    """A copy of ``obj`` that ``json.dumps(..., allow_nan=False)`` accepts."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalars
        return clean(obj.item())
    if hasattr(obj, "tolist"):
        return clean(obj.tolist())
    return str(obj)


def dumps(obj, **kwargs) -> str:
    """``json.dumps`` of ``clean(obj)``, refusing anything non-strict."""
    return json.dumps(clean(obj), allow_nan=False, **kwargs)
