"""Correctors of reused features (EOC, GOC); they compose with every policy."""

from .base import CORRECTORS, Corrector, register_corrector

__all__ = ["CORRECTORS", "Corrector", "register_corrector"]
