"""Cache policies: one file per method, each registered by name."""

from .base import POLICIES, Policy, make_policy, register_policy
from .schedule import Schedule

__all__ = ["POLICIES", "Policy", "Schedule", "make_policy", "register_policy", "load_all"]


def load_all() -> None:
    """Import every built-in policy module so that it registers itself."""
    from . import fora, rule, tuned  # noqa: F401
    for optional in ("l2c", "toca", "duca"):
        try:
            __import__(f"{__name__}.{optional}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{optional}":
                raise

