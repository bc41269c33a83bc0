"""Caching inside diffusers pipelines: ``ditcache.enable(pipe, policy, correctors)``."""

from .handle import CacheHandle, enable
from .steps import SchedulerSteps, scheduler_key

__all__ = ["CacheHandle", "enable", "SchedulerSteps", "scheduler_key"]
