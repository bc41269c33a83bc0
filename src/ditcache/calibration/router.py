"""The Learning-to-Cache router and the soft (blended) forward it is trained through.

Ma, Fang, Mi & Wang, "Learning-to-Cache", https://arxiv.org/abs/2406.01733 (methods.md §3.2-3.3).

The router is input-invariant and step-variant: one free logit per sampling step and sub-layer
(index 2l: attention of block l, 2l+1: its MLP), β = sigmoid(logit). On text-conditioned models
whose blocks also have cross-attention (PixArt) a router has three columns per block: index 3l + c
with c in schedule-column order (0 attention, 1 MLP, 2 cross-attention; ``types.WITH_CROSS``). During training, at a cache
step every sub-layer's output is the blend

    used = β · fresh + (1 − β) · cached        (cached: its pre-gate output at the step before)

so the loss is differentiable in β. ``SubLayerBlend`` does that by intercepting the attention and
MLP instances of a model, the way the cache engine does, without touching model code; it can also
record the outputs of a forward as the cache.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from ..adapters import Adapter, adapter_for
from ..engine.patching import ForwardPatches, claim, release
from ..policies.l2c import DEFAULT_THRESHOLD, router_schedule
from ..policies.schedule import Schedule
from ..types import WITH_CROSS, Site

LOGIT_BOUND = 5.0  # the authors clamp the logits to [-5, 5] after every optimiser step


def sublayer_index(site: Site, columns: int = 2) -> int:
    """The router index of a site: 2l for attention, 2l+1 for the MLP of block l; with three columns
    3l, 3l+1, 3l+2 for attention, MLP and cross-attention."""
    column = WITH_CROSS.index(site.branch)
    if column >= columns:
        raise ValueError(f"a {columns}-column router has no logit for {site}")
    return columns * site.block + column


def check_columns(columns: int) -> None:
    if columns not in (2, 3):
        raise ValueError(f"a router has 2 columns per block (attn, mlp) or 3 (attn, mlp, cross), got {columns}")


INITS = ("normal", "constant")  # the authors' N(0, 1) draw, or every logit at 0 (β = 0.5: no ranking to keep)


class Router(nn.Module):
    """One logit vector (columns·depth,) per sampling step, drawn from a standard normal (``init="normal"``,
    as the authors) or all 0 (``"constant"``: the router starts with no ranking, so whatever ranking
    it ends with was learned).

    I keep one Parameter per step so that an optimiser skips steps that got no gradient (AdamW
    ignores parameters whose grad is None): only the cache steps are ever trained.
    """

    def __init__(self, num_steps: int, depth: int, generator: Optional[torch.Generator] = None, columns: int = 2,
                 init: str = "normal"):
        super().__init__()
        if num_steps < 1 or depth < 1:
            raise ValueError(f"a router needs steps >= 1 and depth >= 1, got {num_steps} and {depth}")
        check_columns(columns)
        if init not in INITS:
            raise ValueError(f"unknown router init {init!r}; choose from {list(INITS)}")
        self.num_steps, self.depth, self.columns = num_steps, depth, columns

        def start() -> torch.Tensor:  # (columns·depth,)
            width = columns * depth
            return torch.randn(width, generator=generator) if init == "normal" else torch.zeros(width)

        self.logits = nn.ParameterList([nn.Parameter(start()) for _ in range(num_steps)])

    @staticmethod
    def from_logits(logits: torch.Tensor, columns: int = 2) -> "Router":
        """A router holding the given logits (steps, columns·depth)."""
        check_columns(columns)
        if logits.dim() != 2 or logits.shape[1] % columns:
            raise ValueError(f"router logits must be (steps, {columns} * depth), got {tuple(logits.shape)}")
        router = Router(logits.shape[0], logits.shape[1] // columns, columns=columns)
        router.load_logits(logits)
        return router

    def load_logits(self, logits: torch.Tensor) -> None:
        with torch.no_grad():
            for p, row in zip(self.logits, logits):
                p.copy_(row)

    def beta(self, step: int) -> torch.Tensor:
        """β of one step, (columns·depth,), differentiable in that step's logits."""
        return torch.sigmoid(self.logits[step])

    def stacked(self) -> torch.Tensor:
        """All logits as one detached tensor (steps, columns·depth)."""
        return torch.stack([p.detach() for p in self.logits])

    def clamp_(self, bound: float = LOGIT_BOUND) -> None:
        """Clamp every logit to [-bound, bound] (the authors: 5)."""
        with torch.no_grad():
            for p in self.logits:
                p.clamp_(-bound, bound)

    def schedule(self, threshold: float = DEFAULT_THRESHOLD, name: str = "l2c") -> Schedule:
        """The static schedule this router gives at threshold θ."""
        return router_schedule(self.stacked(), threshold, name, self.columns)


class SubLayerBlend:
    """Intercepts a model's attention / MLP (and cross-attention) sub-modules for router training.

    Off by default (the model runs bare). Inside ``recording()`` every sub-layer's output is stored
    as the cache; inside ``blending(beta)`` it is replaced by β·fresh + (1 − β)·cached, with beta of
    shape (columns·depth,): 2 columns per block, 3 where the blocks have cross-attention. Use as a
    context manager, or ``install()`` / ``remove()``.
    """

    def __init__(self, model: nn.Module, adapter: Optional[Adapter] = None):
        self.model = model
        self.adapter = adapter or adapter_for(model)
        self.sites = self.adapter.site_modules(model)
        self.depth = len(self.adapter.blocks(model))
        self.columns = len(self.adapter.branches(model))  # 2 (attn, mlp) or 3 (attn, mlp, cross)
        self.cache: dict[Site, torch.Tensor] = {}
        self._mode: Optional[str] = None
        self._beta: Optional[torch.Tensor] = None
        self._patches = ForwardPatches()

    def install(self) -> "SubLayerBlend":
        claim(self.model, "_ditcache_blend", self)
        for site, module in self.sites.items():
            self._patches.patch(module, self._forward(site, module.forward))
        return self

    def remove(self) -> None:
        """Restore every patched module; the model is then the bare model again."""
        self._patches.restore()
        self.cache.clear()
        release(self.model, "_ditcache_blend", self)

    def __enter__(self) -> "SubLayerBlend":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    @contextmanager
    def recording(self):
        """Forwards inside store every sub-layer's output (detached) as the cache."""
        self.cache.clear()
        self._mode = "record"
        try:
            yield self
        finally:
            self._mode = None

    @contextmanager
    def blending(self, beta: torch.Tensor):
        """Forwards inside use β·fresh + (1 − β)·cached at every sub-layer; beta is (columns·depth,)."""
        if tuple(beta.shape) != (self.columns * self.depth,):
            raise ValueError(f"beta must have shape ({self.columns * self.depth},) for {self.depth} blocks of "
                             f"{self.columns} sub-layers, got {tuple(beta.shape)}")
        if len(self.cache) != len(self.sites):
            raise ValueError("blending needs a cache: run a forward inside recording() first")
        self._mode, self._beta = "blend", beta
        try:
            yield self
        finally:
            self._mode, self._beta = None, None

    def _forward(self, site: Site, original):
        index = sublayer_index(site, self.columns)

        def forward(*args, **kwargs):
            fresh = original(*args, **kwargs)  # (B, N, C)
            if self._mode == "record":
                self.cache[site] = fresh.detach()
            elif self._mode == "blend":
                cached = self.cache[site]  # (B, N, C)
                if cached.shape != fresh.shape:
                    raise ValueError(f"cached {site} has shape {tuple(cached.shape)}, this call "
                                     f"{tuple(fresh.shape)}")
                b = self._beta[index].to(fresh.dtype)  # ()
                return b * fresh + (1 - b) * cached  # (B, N, C)
            return fresh

        return forward
