"""Token scores for token-wise caching: which tokens a partial step recomputes (higher = recomputed).

ToCa (Zou et al., ICLR 2025, https://arxiv.org/abs/2410.05317) and DuCa (Zou et al.,
https://arxiv.org/abs/2412.18911) recompute only the top-k tokens of each MLP on a partial step.
The score of token j in one layer is, as in the official DiT code (methods.md §6.1, §6.2)::

    base_j   = s1 (attention received) | V-norm score    (L2-normalised over tokens)
             | random: raw uniform in [0, 1), one draw shared by both guidance halves
    score_j  = base_j + λ3 · age_j / I_base                          (s3, cache frequency)
    score_j *= 1 + bonus  for the max-score token of each 2x2 cell   (s4, spatial uniformity)

``age_j`` counts the partial steps since token j was last computed and ``I_base`` is the base
full-step interval N (``--fresh-threshold``). s2 (cross-attention) does not exist in DiT.

The attention map and the value norms come from the last full step of the layer. The engine runs
attention through ``scaled_dot_product_attention``, which hides both, so we recompute what the score
needs from the attention's input with the module's own projections and report those MACs.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

SCORES = ("attention", "vnorm", "random")
VNORM_RECOMPUTE = ("small", "large")


def l2_normalise(score: torch.Tensor) -> torch.Tensor:
    """Scale each row to unit L2 norm over tokens: (B, N) -> (B, N)."""
    return F.normalize(score.float(), p=2.0, dim=1)


# -- projections of the attention input ----------------------------------------------------------
def _heads(module: nn.Module) -> int:
    heads = getattr(module, "num_heads", None) or getattr(module, "heads", None)
    if heads is None:
        raise TypeError(f"cannot tell the head count of {type(module).__name__}")
    return int(heads)


def project(module: nn.Module, x: torch.Tensor, which: str) -> torch.Tensor:
    """One of q / k / v of an attention module from its input x (B, N, C), as (B, H, N, Dh).

    Knows our DiT ``Attention`` (one fused ``qkv`` linear: q, k, v in that order) and diffusers'
    ``Attention`` (``to_q`` / ``to_k`` / ``to_v``). We slice the fused weight so that only the
    projection the score needs is paid for.
    """
    b, n, c = x.shape
    if hasattr(module, "qkv"):
        i = "qkv".index(which)
        weight = module.qkv.weight[i * c:(i + 1) * c]  # (C, C)
        bias = None if module.qkv.bias is None else module.qkv.bias[i * c:(i + 1) * c]
        out = F.linear(x, weight, bias)  # (B, N, C)
    elif hasattr(module, f"to_{which}"):
        out = getattr(module, f"to_{which}")(x)  # (B, N, C)
    else:
        raise TypeError(f"{type(module).__name__} has neither a fused qkv nor to_q/to_k/to_v projections")
    h = _heads(module)
    return out.reshape(b, n, h, -1).transpose(1, 2)  # (B, H, N, Dh)


def attention_received(probs: torch.Tensor) -> torch.Tensor:
    """s1: the attention each token receives, column sums of a head-averaged map (B, N, N) -> (B, N)."""
    return l2_normalise(probs.sum(dim=1))  # sum over queries i of A[i, j]


def attention_score(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """s1 of every token from the attention input x (B, N, C), and the MACs spent on it.

    Cost per sample: q and k projections 2NC^2, plus QK^T N^2C.
    """
    b, n, c = x.shape
    q = project(module, x, "q").float()  # (B, H, N, Dh)
    k = project(module, x, "k").float()  # (B, H, N, Dh)
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, N, N)
    probs = logits.softmax(dim=-1).mean(dim=1)  # (B, N, N), rows sum to 1
    return attention_received(probs), b * (2 * n * c * c + n * n * c)


def value_norms(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """‖v_{h,j}‖₂ per head and token (B, H, N), and the MACs of the v projection (NC^2 per sample)."""
    b, n, c = x.shape
    v = project(module, x, "v").float()  # (B, H, N, Dh)
    return v.norm(dim=-1), b * n * c * c


def vnorm_score(norms: torch.Tensor, recompute: str = "small") -> torch.Tensor:
    """DuCa's V-caching score from value norms (B, H, N): L2-normalise(Σ_h (1 − ‖v_{h,j}‖)) -> (B, N).

    With ``recompute="small"`` (the DuCa code's sign) small-norm tokens score high and are recomputed.
    I could not check this sign against the paper text (methods.md §6.2 flags it), so ``"large"``
    flips it.
    """
    if recompute not in VNORM_RECOMPUTE:
        raise ValueError(f"vnorm_recompute must be one of {VNORM_RECOMPUTE}, got {recompute!r}")
    score = l2_normalise((1.0 - norms).sum(dim=1))  # (B, N)
    return score if recompute == "small" else -score


def random_score(batch: int, num_tokens: int, generator: torch.Generator, shared_halves: bool = False) -> torch.Tensor:
    """A raw uniform base score (B, N) in [0, 1), not normalised, as the authors' ``score_evaluate``.

    ``shared_halves``: the batch is [cond; uncond] of classifier-free guidance, and one (B/2, N) draw
    serves both halves, so the two halves of a sample recompute the same tokens. Without guidance
    each row draws its own.
    """
    if not shared_halves:
        return torch.rand(batch, num_tokens, generator=generator)
    if batch % 2:
        raise ValueError(f"a guided batch has two equal halves; got {batch} rows")
    half = torch.rand(batch // 2, num_tokens, generator=generator)  # (B/2, N)
    return torch.cat([half, half])  # (B, N)


# -- the terms added to the base score -----------------------------------------------------------
def cache_frequency(age: torch.Tensor, interval: int) -> torch.Tensor:
    """s3: partial steps since each token was last computed, over the base interval: (B, N)."""
    return age.float() / interval


def spatial_bonus(score: torch.Tensor, bonus: float, cell: int = 2) -> torch.Tensor:
    """s4: in each cell x cell block of the token grid, the max-score token's score × (1 + bonus).

    The grid side is sqrt(N), tokens in row-major order; an odd side leaves smaller edge cells.
    Like the official code this multiplies the score, so a negative maximum (possible for the V-norm
    score) is pushed *down*; we keep that rather than guess a fix.
    """
    if bonus == 0:
        return score
    b, n = score.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"the spatial bonus needs a square token grid; {n} tokens is not one")
    grid = score.reshape(b, 1, side, side)  # (B, 1, G, G)
    _, where = F.max_pool2d(grid, cell, cell, ceil_mode=True, return_indices=True)  # (B, 1, G/c, G/c)
    factor = torch.ones_like(score)  # (B, N)
    factor.scatter_(1, where.reshape(b, -1), 1.0 + bonus)  # indices are flat positions in the grid
    return score * factor  # (B, N)


def top_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest-scoring tokens of each batch row: (B, N) -> LongTensor (B, k)."""
    k = max(0, min(int(k), score.shape[1]))
    return score.topk(k, dim=1).indices  # (B, k)


class TokenScorer:
    """Per-layer token state of one sampling run: base scores from the last full step, cache ages.

    ``kind`` is one of SCORES; ``interval`` the base full-step interval N (s3's denominator);
    ``shared_halves``: the batch is [cond; uncond] (guidance), so random scores are drawn once for both.
    """

    def __init__(self, kind: str, interval: int, freq_weight: float, bonus: float,
                 vnorm_recompute: str = "small", seed: int = 0, shared_halves: bool = False):
        if kind not in SCORES:
            raise ValueError(f"unknown token score {kind!r}; choose from {SCORES}")
        if vnorm_recompute not in VNORM_RECOMPUTE:
            raise ValueError(f"vnorm_recompute must be one of {VNORM_RECOMPUTE}, got {vnorm_recompute!r}")
        self.kind, self.interval, self.freq_weight, self.bonus = kind, interval, freq_weight, bonus
        self.vnorm_recompute, self.seed, self.shared_halves = vnorm_recompute, seed, shared_halves
        self.reset()

    def reset(self) -> None:
        self.base: dict[int, torch.Tensor] = {}  # layer -> (B, N) from the last full step
        self.age: dict[int, torch.Tensor] = {}  # layer -> (B, N) partial steps since computed
        # I draw random scores on the CPU so a seed gives the same tokens on every device.
        self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def needs_module(self) -> bool:
        return self.kind != "random"

    def score_full_step(self, layer: int, module: nn.Module, x: torch.Tensor) -> int:
        """Refresh a layer's base score from its attention input x (B, N, C); returns the MACs spent."""
        with torch.no_grad():
            if self.kind == "attention":
                self.base[layer], macs = attention_score(module, x)
            elif self.kind == "vnorm":
                norms, macs = value_norms(module, x)
                self.base[layer] = vnorm_score(norms, self.vnorm_recompute)
            else:
                macs = 0
        return macs

    def computed(self, layer: int, like: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> None:
        """Update cache ages after a layer's MLP ran: all tokens (``tokens=None``) or (B, k) of them.

        ``like`` is a (B, N, ...) tensor of that call, giving batch, token count and device.
        """
        if tokens is None:
            self.age[layer] = torch.zeros(like.shape[:2], dtype=torch.long, device=like.device)  # (B, N)
            return
        age = self.age.get(layer)
        if age is None:
            raise RuntimeError(f"layer {layer} ran a partial step before any full one")
        age += 1
        age.scatter_(1, tokens.to(age.device), 0)

    def score(self, layer: int) -> torch.Tensor:
        """The full score of every token of a layer now: base + λ3·s3, then the s4 bonus: (B, N)."""
        age = self.age.get(layer)
        if age is None:
            raise RuntimeError(f"layer {layer} has no cache ages; it was never computed in this run")
        if self.kind == "random":
            base = random_score(age.shape[0], age.shape[1], self.generator, self.shared_halves).to(age.device)
        else:
            base = self.base.get(layer)
            if base is None:
                raise RuntimeError(f"layer {layer} has no {self.kind} score from a full step")
        score = base.to(age.device) + self.freq_weight * cache_frequency(age, self.interval)  # (B, N)
        return spatial_bonus(score, self.bonus)

    def select(self, layer: int, k: int) -> torch.Tensor:
        """The k tokens of each batch row to recompute in a layer: LongTensor (B, k)."""
        return top_k(self.score(layer), k)
