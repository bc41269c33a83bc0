"""Convert weights between our DiT and diffusers' ``DiTTransformer2DModel``.

The two layouts hold the same numbers under different names:

=====================================  ================================================================
ours                                   diffusers
=====================================  ================================================================
x_embedder.proj                        pos_embed.proj
t_embedder.mlp.0 / .2                  transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_1 / _2
y_embedder.embedding_table             transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table
blocks.{i}.adaLN_modulation.1          transformer_blocks.{i}.norm1.linear  (same 6-chunk order)
blocks.{i}.attn.qkv (fused)            transformer_blocks.{i}.attn1.to_q / to_k / to_v
blocks.{i}.attn.proj                   transformer_blocks.{i}.attn1.to_out.0
blocks.{i}.mlp.fc1 / fc2               transformer_blocks.{i}.ff.net.0.proj / ff.net.2
final_layer.adaLN_modulation.1         proj_out_1  (both chunk as shift, scale)
final_layer.linear                     proj_out_2
pos_embed (Parameter)                  pos_embed.pos_embed (a non-persistent buffer, recomputed)
=====================================  ================================================================

diffusers keeps one copy of the timestep and class embedders per block (its final layer uses block
0's), so we write ours into every block and read block 0's back, checking the copies agree.

Two numerical differences are handled explicitly:

- Timestep frequencies: diffusers divides by ``half - 1`` (``downscale_freq_shift=1``), the official
  DiT by ``half``. Our ``DiT(freq_shift=...)`` represents either. ``dit_to_diffusers`` sets the
  shift on the diffusers instance it returns so it computes exactly our function, but diffusers'
  config cannot record it: a ``save_pretrained`` copy of a ``freq_shift=0`` model reloads with
  diffusers' shift 1. ``diffusers_to_dit`` reads the shift from the instance, so it is exact.
- The MLP LayerNorm eps: diffusers takes it from ``config.norm_eps``; ours is the official 1e-6.
  ``dit_to_diffusers`` writes ``norm_eps=1e-6``; a diffusers model with another eps converts with a
  warning (the effect is relative ``eps / var`` in the normalisation, negligible unless features
  are nearly constant).
"""

from __future__ import annotations

import warnings

import torch

from .dit import DiT

OUR_EPS = 1e-6


def _block_map(i: int) -> dict[str, str]:
    """Per-block one-to-one key pairs (ours -> diffusers), excluding qkv and the embedders."""
    d = f"transformer_blocks.{i}."
    o = f"blocks.{i}."
    pairs = {
        "adaLN_modulation.1": "norm1.linear",
        "attn.proj": "attn1.to_out.0",
        "mlp.fc1": "ff.net.0.proj",
        "mlp.fc2": "ff.net.2",
    }
    return {f"{o}{a}.{p}": f"{d}{b}.{p}" for a, b in pairs.items() for p in ("weight", "bias")}


_TOP_MAP = {
    f"{a}.{p}": f"{b}.{p}"
    for a, b in {
        "x_embedder.proj": "pos_embed.proj",
        "final_layer.adaLN_modulation.1": "proj_out_1",
        "final_layer.linear": "proj_out_2",
    }.items()
    for p in ("weight", "bias")
}

_EMB_MAP = {  # ours -> suffix under transformer_blocks.{i}.norm1.emb.
    "t_embedder.mlp.0.weight": "timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "timestep_embedder.linear_2.bias",
    "y_embedder.embedding_table.weight": "class_embedder.embedding_table.weight",
}


def dit_state_to_diffusers(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Rename and split an (official-layout) DiT state dict into DiTTransformer2DModel's layout."""
    out = {b: sd[a] for a, b in _TOP_MAP.items()}
    for i in range(depth):
        out.update({b: sd[a] for a, b in _block_map(i).items()})
        for a, b in _EMB_MAP.items():
            out[f"transformer_blocks.{i}.norm1.emb.{b}"] = sd[a]
        for p in ("weight", "bias"):
            q, k, v = sd[f"blocks.{i}.attn.qkv.{p}"].chunk(3, dim=0)  # (D, ...) each
            for name, part in zip(("to_q", "to_k", "to_v"), (q, k, v)):
                out[f"transformer_blocks.{i}.attn1.{name}.{p}"] = part
    return out


def diffusers_state_to_dit(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Inverse of ``dit_state_to_diffusers`` (without ``pos_embed``, which diffusers does not store)."""
    out = {a: sd[b] for a, b in _TOP_MAP.items()}
    for i in range(depth):
        out.update({a: sd[b] for a, b in _block_map(i).items()})
        for a, b in _EMB_MAP.items():
            here, first = sd[f"transformer_blocks.{i}.norm1.emb.{b}"], sd[f"transformer_blocks.0.norm1.emb.{b}"]
            if not torch.equal(here, first):
                raise ValueError(f"block {i}'s {b} differs from block 0's; our DiT shares one embedder")
        for p in ("weight", "bias"):
            parts = [sd[f"transformer_blocks.{i}.attn1.{n}.{p}"] for n in ("to_q", "to_k", "to_v")]
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat(parts, dim=0)  # (3D, ...)
    out.update({a: sd[f"transformer_blocks.0.norm1.emb.{b}"] for a, b in _EMB_MAP.items()})
    return out


def _like(module: torch.nn.Module, param: torch.Tensor) -> torch.nn.Module:
    """Move ``module`` to ``param``'s device and dtype (dtype only when needed: diffusers logs on casts)."""
    module = module.to(param.device)
    if param.dtype != torch.float32:
        module = module.to(param.dtype)
    return module.eval()


def dit_to_diffusers(dit: DiT):
    """A ``DiTTransformer2DModel`` computing the same function as ``dit`` (see the module notes)."""
    from diffusers import DiTTransformer2DModel

    cfg = dit.config
    if cfg["mlp_ratio"] != 4.0:
        raise ValueError(f"diffusers' DiT has mlp_ratio 4; this model has {cfg['mlp_ratio']}")
    sd = dit.state_dict()
    table = sd["y_embedder.embedding_table.weight"]  # (K or K+1, D)
    if cfg["class_dropout_prob"] <= 0:
        # diffusers always has the null-class row; ours has none, so that row is never used: zero it.
        sd["y_embedder.embedding_table.weight"] = torch.cat([table, table.new_zeros(1, table.shape[1])])
    model = DiTTransformer2DModel(
        num_attention_heads=dit.num_heads,
        attention_head_dim=dit.hidden_size // dit.num_heads,
        in_channels=dit.in_channels,
        out_channels=dit.out_channels,
        num_layers=dit.depth,
        sample_size=dit.input_size,
        patch_size=dit.patch_size,
        num_embeds_ada_norm=dit.num_classes,
        norm_eps=OUR_EPS,
    )
    model.load_state_dict(dit_state_to_diffusers(sd, dit.depth), strict=True)
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = cfg["freq_shift"]
    return _like(model, next(dit.parameters()))


def diffusers_to_dit(model) -> DiT:
    """Our ``DiT`` computing the same function as a ``DiTTransformer2DModel`` (see the module notes)."""
    cfg = model.config
    if cfg.norm_type != "ada_norm_zero" or cfg.activation_fn != "gelu-approximate":
        raise ValueError(f"only adaLN-Zero DiTs with tanh-GELU convert; got {cfg.norm_type}, {cfg.activation_fn}")
    if cfg.norm_eps != OUR_EPS:
        warnings.warn(f"diffusers model uses LayerNorm eps {cfg.norm_eps} in the MLP branch; ours uses "
                      f"{OUR_EPS}, so outputs differ very slightly", stacklevel=2)
    in_ch = cfg.in_channels
    out_ch = model.out_channels
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"out_channels {out_ch} must be in_channels {in_ch} or twice it")
    emb = model.transformer_blocks[0].norm1.emb
    dit = DiT(
        input_size=cfg.sample_size,
        patch_size=cfg.patch_size,
        in_channels=in_ch,
        hidden_size=cfg.num_attention_heads * cfg.attention_head_dim,
        depth=cfg.num_layers,
        num_heads=cfg.num_attention_heads,
        class_dropout_prob=emb.class_embedder.dropout_prob,
        num_classes=cfg.num_embeds_ada_norm,
        learn_sigma=out_ch == 2 * in_ch,
        freq_shift=float(emb.time_proj.downscale_freq_shift),
    )
    sd = diffusers_state_to_dit(model.state_dict(), cfg.num_layers)
    sd["pos_embed"] = dit.pos_embed.detach().clone()  # fixed sin-cos table, identical in both layouts
    dit.load_state_dict(sd, strict=True)
    return _like(dit, next(model.parameters()))
