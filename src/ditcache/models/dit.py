"""Our own DiT (Peebles & Xie 2023, https://arxiv.org/abs/2212.09748), written from the maths.

Parameter names and shapes match the official facebookresearch/DiT checkpoints
(``DiT-XL-2-256x256.pt``), so an official state_dict loads with ``load_state_dict(strict=True)``.

The block is adaLN-Zero::

    (sh1, sc1, g1, sh2, sc2, g2) = Linear(SiLU(c))
    x = x + g1 * attn(LN(x) * (1 + sc1) + sh1)
    x = x + g2 * mlp(LN(x) * (1 + sc2) + sh2)

The caching engine intercepts ``block.attn`` and ``block.mlp`` (their pre-gate outputs), so the block
calls them as modules and nothing else touches their outputs before the gate.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

FREQ_EMBED_SIZE = 256  # width of the sinusoidal timestep features; fixed by the official checkpoints


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: ``x * (1 + scale) + shift`` with per-sample shift/scale broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # (N, T, D)


def timestep_features(t: torch.Tensor, dim: int = FREQ_EMBED_SIZE, freq_shift: float = 0.0,
                      max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features ``cat[cos(t f), sin(t f)]`` with ``f_i = exp(-ln(max_period) i / (half - freq_shift))``.

    ``freq_shift=0`` is the official DiT; diffusers' DiTTransformer2DModel uses ``freq_shift=1``.
    """
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=t.device)  # (half,)
    freqs = torch.exp(-math.log(max_period) * i / (half - freq_shift))  # (half,)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # (N, dim)
    return emb


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """1-D sin-cos embedding ``cat[sin(p w), cos(p w)]``, ``w_i = 10000^(-i / (dim/2))``; float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))  # (dim/2,)
    out = pos.reshape(-1)[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, dim)


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positional embedding of a ``grid x grid`` token map, shape (grid*grid, dim).

    Tokens are in row-major order (row, column). The first half of the channels encodes the column,
    the second half the row, as in the official DiT checkpoints.
    """
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be divisible by 4 for the 2-D sin-cos embedding")
    coords = torch.arange(grid, dtype=torch.float64)  # (G,)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each
    emb_col = _sincos_1d(dim // 2, cols)  # (G*G, dim/2)
    emb_row = _sincos_1d(dim // 2, rows)  # (G*G, dim/2)
    return torch.cat([emb_col, emb_row], dim=1).float()  # (G*G, dim)


class TimestepEmbedder(nn.Module):
    """Timestep -> sinusoidal features (256) -> Linear -> SiLU -> Linear -> (N, hidden)."""

    def __init__(self, hidden_size: int, freq_shift: float = 0.0):
        super().__init__()
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(
            nn.Linear(FREQ_EMBED_SIZE, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = timestep_features(t, FREQ_EMBED_SIZE, self.freq_shift)  # (N, 256)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class label -> embedding row. Row ``num_classes`` is the null class when dropout is enabled."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def drop(self, labels: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Replace dropped labels by the null class: at random (training) or where ``force_drop_ids == 1``."""
        if force_drop_ids is None:
            dropped = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob  # (N,)
        else:
            dropped = torch.as_tensor(force_drop_ids, device=labels.device) == 1  # (N,)
        return torch.where(dropped, torch.full_like(labels, self.num_classes), labels)  # (N,)

    def forward(self, labels: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if force_drop_ids is not None or (self.training and self.dropout_prob > 0):
            if self.dropout_prob <= 0:
                raise ValueError("label dropout needs class_dropout_prob > 0 (there is no null class)")
            labels = self.drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N, D)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection: (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, Dh) each
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self._qkv(x)  # (B, H, N, Dh)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))  # (B, N, C)

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The explicit attention map averaged over heads, (B, N, N); rows sum to 1."""
        q, k, _ = self._qkv(x)  # (B, H, N, Dh)
        logits = q @ k.transpose(-2, -1) * self.head_dim ** -0.5  # (B, H, N, N)
        return logits.float().softmax(dim=-1).mean(dim=1).to(x.dtype)  # (B, N, N)


class Mlp(nn.Module):
    """Linear -> GELU (tanh approximation) -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, N, C)


class DiTBlock(nn.Module):
    """One adaLN-Zero transformer block; ``attn`` and ``mlp`` are the two cache sites."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mod = self.adaLN_modulation(c)  # (N, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)  # (N, D) each
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map of each token to its patch of output channels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (N, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C_out)


class PatchEmbed(nn.Module):
    """Patchify with a strided convolution: (N, C, H, W) -> (N, T, D), T = (H/p)*(W/p)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


class DiT(nn.Module):
    """Class-conditional Diffusion Transformer, state_dict-compatible with the official checkpoints.

    ``forward(x, t, y)`` maps latents/images (N, C, H, W), timesteps (N,) and labels (N,) to
    (N, out_channels, H, W); with ``learn_sigma`` the first ``in_channels`` outputs are eps and the
    rest the variance interpolation. ``freq_shift`` selects the timestep frequencies: 0 is the
    official DiT, 1 reproduces diffusers' DiTTransformer2DModel exactly.
    """

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True, freq_shift: float = 0.0):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self._config = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                            hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                            class_dropout_prob=class_dropout_prob, num_classes=num_classes,
                            learn_sigma=learn_sigma, freq_shift=freq_shift)
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.grid = input_size // patch_size
        self.num_patches = self.grid * self.grid

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # A fixed table, but a Parameter (not a buffer) so it is in the state_dict as in the official files.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, self.mlp_hidden) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def config(self) -> dict:
        """The constructor keyword arguments; ``DiT(**model.config)`` builds the same architecture."""
        return dict(self._config)

    @property
    def null_class(self) -> int:
        """The label index of the unconditional (null) class."""
        return self.num_classes

    def initialize_weights(self) -> None:
        """DiT initialisation: xavier linears, normal(0.02) embedders, zeroed adaLN and output layers."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.hidden_size, self.grid).unsqueeze(0))
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W); each token's features are ordered (row in patch, col, channel)."""
        n, p, g, c = x.shape[0], self.patch_size, self.grid, self.out_channels
        x = x.reshape(n, g, g, p, p, c)  # (N, Gh, Gw, p, p, C)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (N, C, Gh, p, Gw, p)
        return x.reshape(n, c, g * p, g * p)  # (N, C, H, W)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
              force_drop_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens with positions (N, T, D) and the conditioning c = t_emb + y_emb (N, D)."""
        if x.shape[-2:] != (self.input_size, self.input_size) or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (N, {self.in_channels}, {self.input_size}, {self.input_size}), "
                             f"got {tuple(x.shape)}")
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        tokens = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, force_drop_ids)  # (N, D)
        return tokens, c

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Predict (N, out_channels, H, W) from x (N, C, H, W), timesteps t (N,) and labels y (N,)."""
        h, c = self.embed(x, t, y, force_drop_ids)  # (N, T, D), (N, D)
        for block in self.blocks:
            h = block(h, c)  # (N, T, D)
        h = self.final_layer(h, c)  # (N, T, p*p*C_out)
        return self.unpatchify(h)  # (N, C_out, H, W)


_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}

# Official model sizes (depth, hidden, heads) x patch sizes, for 256x256 images (32x32 latents).
DIT_CONFIGS: dict[str, dict] = {
    f"DiT-{size}/{patch}": dict(depth=d, hidden_size=h, num_heads=nh, patch_size=patch,
                                input_size=32, in_channels=4)
    for size, (d, h, nh) in _SIZES.items()
    for patch in (2, 4, 8)
}


def build_dit(name: str, **overrides) -> DiT:
    """Build a preset from ``DIT_CONFIGS`` (e.g. ``"DiT-XL/2"``), overriding any constructor argument."""
    if name not in DIT_CONFIGS:
        raise KeyError(f"unknown DiT preset {name!r}; choose one of {sorted(DIT_CONFIGS)}")
    return DiT(**{**DIT_CONFIGS[name], **overrides})
