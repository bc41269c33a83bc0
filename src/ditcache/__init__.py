"""ditcache: feature caching for Diffusion Transformers, measured honestly.

The public surface: load a model, pick a policy (and correctors), install the engine, sample; or
``enable(pipe, policy, correctors)`` on a diffusers pipeline the user already runs.
"""

from .engine import CacheEngine, apply_cache
from .models.loading import LoadedModel, load_model
from .pipelines import CacheHandle, enable
from .policies import Policy, Schedule, make_policy
from .correctors import Corrector
from .sampling.generate import SampleConfig, generate
from .types import COMPUTE, REUSE, Action, Site, StepInfo

__version__ = "0.1.0"

__all__ = ["CacheEngine", "apply_cache", "enable", "CacheHandle", "LoadedModel", "load_model", "Policy", "Schedule", "make_policy",
           "Corrector", "SampleConfig", "generate", "Action", "Site", "StepInfo", "COMPUTE", "REUSE"]
