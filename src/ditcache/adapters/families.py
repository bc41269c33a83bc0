"""The model families ditcache knows: our DiT, diffusers' DiTTransformer2DModel and PixArtTransformer2DModel."""

from __future__ import annotations

from torch import nn

from .base import Adapter, Dims, register_adapter


def _dit_dims(model: nn.Module) -> Dims:
    p = model.patch_size
    return Dims(
        depth=len(model.blocks),
        hidden=model.hidden_size,
        mlp_hidden=model.blocks[0].mlp.fc1.out_features,
        num_tokens=model.num_patches,
        patch_in=p * p * model.in_channels,
        patch_out=p * p * model.out_channels,
    )


def _diffusers_dims(model: nn.Module) -> Dims:
    cfg = model.config
    p = cfg.patch_size
    grid = cfg.sample_size // p
    ff = model.transformer_blocks[0].ff
    return Dims(
        depth=len(model.transformer_blocks),
        hidden=model.inner_dim,
        mlp_hidden=ff.net[2].in_features,
        num_tokens=grid * grid,
        patch_in=p * p * cfg.in_channels,
        patch_out=p * p * model.out_channels,
        embeds_per_block=True,
    )


# Our own DiT (models/dit.py), key-compatible with the official checkpoints:
# x = x + gate * attn(modulate(norm1(x)))   with blocks[i].attn / blocks[i].mlp
DIT = register_adapter(
    Adapter(
        family="dit",
        blocks_attr="blocks",
        attn_attr="attn",
        mlp_attr="mlp",
        dims=_dit_dims,
        matches=lambda m: hasattr(m, "blocks") and hasattr(m, "x_embedder"),
    )
)

# diffusers' DiTTransformer2DModel: BasicTransformerBlock with ada_norm_zero, whose attn1 and ff
# return the pre-gate outputs that the block then multiplies by gate_msa / gate_mlp.
DIFFUSERS_DIT = register_adapter(
    Adapter(
        family="diffusers-dit",
        blocks_attr="transformer_blocks",
        attn_attr="attn1",
        mlp_attr="ff",
        dims=_diffusers_dims,
        matches=lambda m: hasattr(m, "transformer_blocks") and hasattr(m, "proj_out_2"),
    )
)


def _pixart_dims(model: nn.Module) -> Dims:
    cfg = model.config
    p = cfg.patch_size
    grid = cfg.sample_size // p
    ff = model.transformer_blocks[0].ff
    return Dims(
        depth=len(model.transformer_blocks),
        hidden=model.inner_dim,
        mlp_hidden=ff.net[2].in_features,
        num_tokens=grid * grid,  # at the configured size; the engine re-reads it from each run's input
        patch_in=p * p * cfg.in_channels,
        patch_out=p * p * model.out_channels,
        text_tokens=120,  # PixArt-alpha's T5 length; re-read from each run's encoder_hidden_states
        caption_channels=cfg.caption_channels or 0,
        shared_modulation=True,
    )


# diffusers' PixArtTransformer2DModel (PixArt-alpha and -Sigma): BasicTransformerBlock with
# ada_norm_single. attn1 and ff return pre-gate outputs (the block multiplies them by gate_msa /
# gate_mlp); attn2, the cross-attention to the caption, is added without a gate.
PIXART = register_adapter(
    Adapter(
        family="diffusers-pixart",
        blocks_attr="transformer_blocks",
        attn_attr="attn1",
        mlp_attr="ff",
        cross_attr="attn2",
        dims=_pixart_dims,
        matches=lambda m: hasattr(m, "transformer_blocks") and hasattr(m, "adaln_single")
        and hasattr(m, "caption_projection"),
    )
)
