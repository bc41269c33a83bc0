"""Where each model family's sites are, and what they cost."""

from .base import ADAPTERS, Adapter, Dims, adapter_for, register_adapter
from .families import DIFFUSERS_DIT, DIT, PIXART

__all__ = ["ADAPTERS", "Adapter", "Dims", "adapter_for", "register_adapter", "DIT", "DIFFUSERS_DIT", "PIXART"]
