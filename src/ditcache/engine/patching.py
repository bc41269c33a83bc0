"""Instance-level ``forward`` overrides that can be undone exactly, and one owner per model.

Setting ``module.forward`` on an instance shadows the class method that ``nn.Module.__call__``
looks up, so a wrapper runs instead without any change to model code. ``restore`` deletes the
instance attributes again (or puts back ones that were there before), leaving the bare model.
"""

from __future__ import annotations

from torch import nn

# the attributes by which an interception marks the model it is installed on
OWNER_ATTRS = ("_ditcache_engine", "_ditcache_blend")


class ForwardPatches:
    def __init__(self):
        self._patched: list[tuple[nn.Module, object]] = []

    def __bool__(self) -> bool:
        return bool(self._patched)

    def patch(self, module: nn.Module, forward) -> None:
        self._patched.append((module, module.__dict__.get("forward")))
        module.forward = forward

    def restore(self) -> None:
        for module, previous in reversed(self._patched):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self._patched.clear()


def claim(model: nn.Module, attr: str, owner) -> None:
    """Mark ``model`` as intercepted by ``owner``; refuse if any interception is already installed."""
    for other in OWNER_ATTRS:
        if getattr(model, other, None) is not None:
            raise RuntimeError(f"the model already has an interception installed ({other}); remove it first")
    setattr(model, attr, owner)


def release(model: nn.Module, attr: str, owner) -> None:
    if getattr(model, attr, None) is owner:
        delattr(model, attr)
