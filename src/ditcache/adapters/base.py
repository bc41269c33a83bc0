"""Adapters: data that says where a model family's sites are and what each costs.

An adapter never changes a model. It names the block list and the attention / MLP sub-modules
inside each block, reads the sizes the MACs formulas need, and says how to detect the family.
New families register with ``@register_adapter``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..types import Branch, Site


@dataclass(frozen=True)
class Dims:
    """The sizes that fix a DiT-style transformer's cost (per sample, per forward)."""

    depth: int
    hidden: int  # C
    mlp_hidden: int  # H (4C for every published DiT)
    num_tokens: int  # N
    patch_in: int  # p*p*in_channels: values per token entering the patch embedding
    patch_out: int  # p*p*out_channels: values per token leaving the final layer
    embeds_per_block: bool = False  # diffusers recomputes the t/y embedding in every block

    def attn_macs(self, tokens: int | None = None) -> int:
        """qkv and output projections (4NC^2) plus QK^T and AV (2N^2C)."""
        n = self.num_tokens if tokens is None else tokens
        return 4 * n * self.hidden**2 + 2 * n * self.num_tokens * self.hidden

    def mlp_macs(self, tokens: int | None = None) -> int:
        """fc1 and fc2: 2NCH."""
        n = self.num_tokens if tokens is None else tokens
        return 2 * n * self.hidden * self.mlp_hidden

    def site_macs(self, branch: Branch, tokens: int | None = None) -> int:
        return self.attn_macs(tokens) if branch is Branch.ATTN else self.mlp_macs(tokens)

    @property
    def embed_macs(self) -> int:
        """Timestep MLP (256->C->C); the label lookup costs no MACs."""
        return 256 * self.hidden + self.hidden**2

    @property
    def block_fixed_macs(self) -> int:
        """adaLN modulation of one block (C -> 6C), plus the embedding where it is per block."""
        return 6 * self.hidden**2 + (self.embed_macs if self.embeds_per_block else 0)

    @property
    def outer_macs(self) -> int:
        """Patch embedding, timestep embedding and final layer: run once per forward."""
        embed = 0 if self.embeds_per_block else self.embed_macs
        final = 2 * self.hidden**2 + self.num_tokens * self.hidden * self.patch_out
        if self.embeds_per_block:
            final += self.embed_macs  # the final layer embeds t and y once more
        return self.num_tokens * self.patch_in * self.hidden + embed + final

    @property
    def forward_macs(self) -> int:
        """MACs of one uncached forward of one sample."""
        per_block = self.block_fixed_macs + self.attn_macs() + self.mlp_macs()
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

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return getattr(model, self.blocks_attr)

    def site_modules(self, model: nn.Module) -> dict[Site, nn.Module]:
        """Every per-block site and its module, in block order, attention before MLP."""
        sites = {}
        for i, block in enumerate(self.blocks(model)):
            sites[Site(i, Branch.ATTN)] = getattr(block, self.attn_attr)
            sites[Site(i, Branch.MLP)] = getattr(block, self.mlp_attr)
        return sites


ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> Adapter:
    ADAPTERS[adapter.family] = adapter
    return adapter


def adapter_for(model: nn.Module) -> Adapter:
    """The registered adapter whose ``matches`` accepts the model."""
    for adapter in ADAPTERS.values():
        if adapter.matches(model):
            return adapter
    raise ValueError(
        f"no ditcache adapter knows {type(model).__name__}; known families: {sorted(ADAPTERS)}"
    )
