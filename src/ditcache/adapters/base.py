"""Adapters: data that says where a model family's sites are and what each costs.

An adapter never changes a model. It names the block list and the attention / MLP sub-modules
inside each block, reads the sizes the MACs formulas need, and says how to detect the family.
New families register with ``@register_adapter``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from ..types import BRANCHES, WITH_CROSS, Branch, Site


@dataclass(frozen=True)
class Dims:
    """The sizes that fix a DiT-style transformer's cost (per sample, per forward)."""

    depth: int
    hidden: int  # C
    mlp_hidden: int  # H (4C for every published DiT)
    num_tokens: int  # N image tokens
    patch_in: int  # p*p*in_channels: values per token entering the patch embedding
    patch_out: int  # p*p*out_channels: values per token leaving the final layer
    embeds_per_block: bool = False  # diffusers recomputes the t/y embedding in every block
    text_tokens: int = 0  # T: text tokens the cross-attention reads (PixArt: 120 for alpha, 300 for Sigma)
    caption_channels: int = 0  # width of the text encoder's output that the caption projection maps to C
    shared_modulation: bool = False  # PixArt's adaLN-single: one C -> 6C for all blocks, not one per block

    def attn_macs(self, tokens: int | None = None) -> int:
        """qkv and output projections (4NC^2) plus QK^T and AV (2N^2C)."""
        n = self.num_tokens if tokens is None else tokens
        return 4 * n * self.hidden**2 + 2 * n * self.num_tokens * self.hidden

    def mlp_macs(self, tokens: int | None = None) -> int:
        """fc1 and fc2: 2NCH."""
        n = self.num_tokens if tokens is None else tokens
        return 2 * n * self.hidden * self.mlp_hidden

    def cross_macs(self, tokens: int | None = None) -> int:
        """q and output projections of the image tokens (2NC^2), k and v of the text (2TC^2: paid
        whatever the number of image tokens), QK^T and AV (2NTC)."""
        n = self.num_tokens if tokens is None else tokens
        t = self.text_tokens
        return 2 * n * self.hidden**2 + 2 * t * self.hidden**2 + 2 * n * t * self.hidden

    def site_macs(self, branch: Branch, tokens: int | None = None) -> int:
        if branch is Branch.ATTN:
            return self.attn_macs(tokens)
        return self.cross_macs(tokens) if branch is Branch.CROSS else self.mlp_macs(tokens)

    @property
    def embed_macs(self) -> int:
        """Timestep MLP (256->C->C); the label lookup costs no MACs."""
        return 256 * self.hidden + self.hidden**2

    @property
    def block_fixed_macs(self) -> int:
        """adaLN modulation of one block (C -> 6C), plus the embedding where it is per block."""
        if self.shared_modulation:
            return 0  # a table added to the shared modulation: no MACs
        return 6 * self.hidden**2 + (self.embed_macs if self.embeds_per_block else 0)

    @property
    def outer_macs(self) -> int:
        """Patch embedding, timestep (and caption) embedding and final layer: run once per forward."""
        embed = 0 if self.embeds_per_block else self.embed_macs
        if self.shared_modulation:
            embed += 6 * self.hidden**2
        if self.text_tokens and self.caption_channels:
            embed += self.text_tokens * (self.caption_channels * self.hidden + self.hidden**2)
        final = 2 * self.hidden**2 + self.num_tokens * self.hidden * self.patch_out
        if self.shared_modulation:
            final = self.num_tokens * self.hidden * self.patch_out  # shift/scale come from a table
        if self.embeds_per_block:
            final += self.embed_macs  # the final layer embeds t and y once more
        return self.num_tokens * self.patch_in * self.hidden + embed + final

    @property
    def forward_macs(self) -> int:
        """MACs of one uncached forward of one sample."""
        per_block = self.block_fixed_macs + self.attn_macs() + self.mlp_macs()
        if self.text_tokens:
            per_block += self.cross_macs()
        return self.outer_macs + self.depth * per_block


@dataclass(frozen=True)
class Adapter:
    """Where the sites of one model family live."""

    family: str
    blocks_attr: str  # the ModuleList of blocks on the model
    attn_attr: str  # attention sub-module inside a block
    mlp_attr: str  # MLP sub-module inside a block
    dims: Callable[[nn.Module], Dims]
    matches: Callable[[nn.Module], bool]
    cross_attr: Optional[str] = None  # cross-attention sub-module inside a block, where there is one
    # (branch, attribute) of each block module whose output only feeds that branch's sub-module: its
    # input norm (with the modulation, where the norm does it). The engine runs it on one token when
    # the site is reused, since the block then throws its output away (``CacheEngine.skip_inputs``)
    input_attrs: tuple[tuple[Branch, str], ...] = ()

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return getattr(model, self.blocks_attr)

    def branches(self, model: nn.Module) -> tuple[Branch, ...]:
        """The per-block branches of this model, in schedule-column order."""
        blocks = self.blocks(model)
        has_cross = self.cross_attr is not None and len(blocks) and getattr(blocks[0], self.cross_attr, None) is not None
        return WITH_CROSS if has_cross else BRANCHES

    def site_modules(self, model: nn.Module) -> dict[Site, nn.Module]:
        """Every per-block site and its module, in block order, then in the order the block calls
        them: attention, cross-attention (where there is one), MLP."""
        attrs = {Branch.ATTN: self.attn_attr, Branch.CROSS: self.cross_attr, Branch.MLP: self.mlp_attr}
        order = [b for b in (Branch.ATTN, Branch.CROSS, Branch.MLP) if b in self.branches(model)]
        sites = {}
        for i, block in enumerate(self.blocks(model)):
            for branch in order:
                sites[Site(i, branch)] = getattr(block, attrs[branch])
        return sites

    def input_modules(self, model: nn.Module) -> dict[Site, nn.Module]:
        """The input module of every site that has one (``input_attrs``), keyed by site."""
        branches = self.branches(model)
        return {Site(i, branch): getattr(block, attr) for i, block in enumerate(self.blocks(model))
                for branch, attr in self.input_attrs if branch in branches and getattr(block, attr, None) is not None}


ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> Adapter:
    ADAPTERS[adapter.family] = adapter
    return adapter


def adapter_for(model: nn.Module) -> Adapter:
    """The registered adapter whose ``matches`` accepts the model."""
    for adapter in ADAPTERS.values():
        if adapter.matches(model):
            return adapter
    lists = {name: sorted({type(b).__name__ for b in child})
             for name, child in model.named_children() if isinstance(child, nn.ModuleList) and len(child)}
    found = "; ".join(f"{name}: {', '.join(kinds)}" for name, kinds in lists.items()) or "no block list"
    raise ValueError(
        f"no ditcache adapter knows {type(model).__name__} (block lists found: {found}); known families: "
        f"{sorted(ADAPTERS)}. To add one, register an Adapter naming the block list and each block's "
        "attention / MLP (/ cross-attention) sub-modules: ditcache.adapters.register_adapter(Adapter(...))"
    )
