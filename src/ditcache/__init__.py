"""ditcache: feature caching for Diffusion Transformers, measured honestly.

The public surface: load a model, pick a policy (and correctors), install the engine, sample.
"""

from .engine import CacheEngine, apply_cache
from .models.loading import LoadedModel, load_model
from .policies import Policy, Schedule, make_policy
from .correctors import Corrector
from .sampling.generate import SampleConfig, generate
from .types import COMPUTE, REUSE, Action, Site, StepInfo

__version__ = "0.1.0"

__all__ = ["CacheEngine", "apply_cache", "LoadedModel", "load_model", "Policy", "Schedule", "make_policy",
           "Corrector", "SampleConfig", "generate", "Action", "Site", "StepInfo", "COMPUTE", "REUSE"]
