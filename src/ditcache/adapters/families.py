"""The model families ditcache knows: our DiT, diffusers' DiTTransformer2DModel and PixArtTransformer2DModel."""

from __future__ import annotations

from torch import nn

from ..types import Branch
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


def _diffusers_dims(model: nn.Module, **family) -> Dims:
    """Sizes of a diffusers transformer of BasicTransformerBlocks at its configured sample size."""
    cfg = model.config
    p = cfg.patch_size
    grid = cfg.sample_size // p
    ff = model.transformer_blocks[0].ff
    return Dims(
        depth=len(model.transformer_blocks),
        hidden=model.inner_dim,
        mlp_hidden=ff.net[2].in_features,
        num_tokens=grid * grid,  # a pipeline's run re-reads it from its input (ditcache.enable)
        patch_in=p * p * cfg.in_channels,
        patch_out=p * p * model.out_channels,
        **family,
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
        input_attrs=((Branch.ATTN, "norm1"), (Branch.MLP, "norm2")),
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
        dims=lambda m: _diffusers_dims(m, embeds_per_block=True),
        # norm1 is AdaLayerNormZero (embedding, modulation and norm in one module: run on one token it
        # still returns the full gates); norm3 feeds the MLP (norm2 belongs to a cross-attention DiT lacks)
        input_attrs=((Branch.ATTN, "norm1"), (Branch.MLP, "norm3")),
        matches=lambda m: hasattr(m, "transformer_blocks") and hasattr(m, "proj_out_2"),
    )
)


def _pixart_dims(model: nn.Module) -> Dims:
    # 120 text tokens: PixArt-alpha's T5 length; a pipeline's run re-reads it from encoder_hidden_states
    return _diffusers_dims(model, text_tokens=120, caption_channels=model.config.caption_channels or 0,
                           shared_modulation=True)


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
        # ada_norm_single: norm1 feeds attn1 and norm2 the MLP; attn2 reads the hidden states un-normed
        input_attrs=((Branch.ATTN, "norm1"), (Branch.MLP, "norm2")),
        matches=lambda m: hasattr(m, "transformer_blocks") and hasattr(m, "adaln_single")
        and hasattr(m, "caption_projection"),
    )
)
