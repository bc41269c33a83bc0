"""The cache engine: interception, feature store, counters."""

from .engine import CacheEngine, apply_cache

__all__ = ["CacheEngine", "apply_cache"]
