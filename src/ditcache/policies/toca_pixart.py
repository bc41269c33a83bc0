"""ToCa and DuCa with the PixArt-alpha settings of the authors' code (models with cross-attention).

The official PixArt code (ToCa ``PixArt-alpha-ToCa``, DuCa ``DuCa-PixArt-alpha``) differs from the DiT
code in four ways, all followed here (``settings=pixart``, chosen by default on a model whose blocks
have cross-attention):

1. Steps count *up* (s = 0 .. T-1, the DPM-Solver loop's ``current['step']``). A layer is full iff
   s = 0 or s mod I == 0, where I = round(N / (0.8 + 0.4 s_f / T)) is recomputed (float32,
   round-half-to-even) each time a module is computed in full at step s_f (``force_scheduler.py``;
   DuCa uses step weight 0, so I = N). The type is decided in every block, so, as in the DiT code,
   when layer 0's full computation changes I and s is not a multiple of the new I, layers 1.. are
   partial ('P'). At T = 20, N = 3 (ToCa) that is ``fpppPpfppfppfppfppfp``.
2. On a partial step self-attention is reused; cross-attention *and* the MLP recompute their top-k
   tokens; with DuCa, (s mod I) odd is a partial step and even an aggressive (whole-trunk reuse) one.
3. k = int(clamp(r) * N_img) with r = R (1.9 - 1.8 s/T)(1.6 - 1.2 l/(L-1)) m, m = 0.6 for cross-
   attention and 1.6 for the MLP (the "ToCa" fresh-ratio scheduler).
4. The token score is the entropy of each image token's cross-attention over the caption (s2), the
   two guidance halves mixed half and half (each half's probabilities on its own caption tokens),
   ``normalise(1 + H)``; plus 0.25 * age / N (s3, an age per layer and module, reset when the token
   is computed); then, in each 4x4 tile of the token grid, the best token's score times 1.4 (s4).
   Both halves recompute the same tokens. The map comes from the layer's last full cross-attention
   and its rows are refreshed whenever tokens are recomputed: the cross-attention's selection reads
   the map before its own refresh, the MLP's after it.

Defaults of the authors' PixArt commands: N = 3, R = 0.30 (ToCa) / 0.75 (DuCa), 20 DPM-Solver++ steps.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..types import Branch
from .token_scores import l2_normalise, project

FULL, PARTIAL, AGGRESSIVE = "f", "p", "a"
MODULE_FACTOR = {Branch.CROSS: 0.6, Branch.MLP: 1.6}  # 1 - (1 - 0.6) * 1 and 1 + 0.6 * 1
PIXART_RATIO = {"toca": 0.30, "duca": 0.75}


def interval_after(step: int, num_steps: int, base: int, ratio: float, dual: bool) -> int:
    """I set by a full computation at count-up step ``step`` (``force_scheduler.py``)."""
    weight = 0.0 if ratio == 0 or dual else 0.2
    factor = np.float32(1 - weight + 2 * weight * step / num_steps)
    return max(1, int(np.round(np.float32(base) / factor)))


def _type(step: int, interval: int, dual: bool) -> str:
    q = step % interval
    if q == 0:
        return FULL
    return AGGRESSIVE if dual and q % 2 == 0 else PARTIAL


def pixart_step_types(num_steps: int, interval: int, ratio: float, dual: bool = False) -> str:
    """One letter per step (step 0 first): 'f', 'p', 'a', or 'P' / 'A' (layer 0 full, the rest not)."""
    types, current = [], interval
    for step in range(num_steps):
        if step == 0:
            types.append(FULL)
            current = interval_after(0, num_steps, interval, ratio, dual)
            continue
        head = _type(step, current, dual)
        if head == FULL:
            current = interval_after(step, num_steps, interval, ratio, dual)
            rest = _type(step, current, dual)
            types.append(FULL if rest == FULL else rest.upper())
        else:
            types.append(head)
    return "".join(types)


def pixart_fresh_counts(types: str, depth: int, num_tokens: int, ratio: float) -> dict[Branch, np.ndarray]:
    """k per (step, layer) for cross-attention and the MLP, each (T, depth); 0 where not partial."""
    from .toca import layer_type

    num_steps = len(types)
    counts = {b: np.zeros((num_steps, depth), dtype=np.int64) for b in MODULE_FACTOR}
    for step, code in enumerate(types):
        for layer in range(depth):
            if layer_type(code, layer) != PARTIAL:
                continue
            position = layer / (depth - 1) if depth > 1 else 0.0  # the code's layer / 27
            share = ratio * (1.9 - 1.8 * step / num_steps) * (1.6 - 1.2 * position)
            for branch, factor in MODULE_FACTOR.items():
                counts[branch][step, layer] = int(min(max(share * factor, 0.0), 1.0) * num_tokens)
    return counts


def tile_bonus(score: torch.Tensor, bonus: float = 0.4, tile: int = 4) -> torch.Tensor:
    """s4: in each tile x tile cell of the square token grid, the best token's score times (1 + bonus)."""
    b, n = score.shape
    side = math.isqrt(n)
    if side * side != n or side % tile:
        return score  # no square grid of whole tiles: no spatial term (the code asserts instead)
    cells = score.reshape(b, side // tile, tile, side // tile, tile).permute(0, 1, 3, 2, 4).reshape(b, -1, tile * tile)
    best = cells.argmax(dim=-1, keepdim=True)  # (B, cells, 1)
    boost = torch.zeros_like(cells).scatter_(-1, best, bonus)
    cells = cells * (1 + boost)
    return cells.reshape(b, side // tile, side // tile, tile, tile).permute(0, 1, 3, 2, 4).reshape(b, n)


def mixed_entropy(probs: torch.Tensor, guided: bool) -> torch.Tensor:
    """Entropy of each token's cross-attention (B, N, T) -> (B', N): with guidance, the two halves'
    probabilities side by side at weight 0.5 (B' = B/2, the pair's shared score)."""
    if guided:
        first, second = probs.chunk(2, dim=0)
        probs = torch.cat([0.5 * first, 0.5 * second], dim=-1)  # (B/2, N, 2T)
    return -(probs * torch.log(probs + 1e-7)).sum(dim=-1)


class CrossAttentionScorer:
    """Per-layer cross-attention maps and per-(layer, module) token ages; picks the tokens to recompute."""

    def __init__(self, interval: int, freq_weight: float = 0.25, bonus: float = 0.4, guided: bool = True,
                 random: bool = False, seed: int = 0):
        self.interval, self.freq_weight, self.bonus, self.guided = interval, freq_weight, bonus, guided
        self.random = random
        self.generator = torch.Generator().manual_seed(seed)
        self.maps: dict[int, torch.Tensor] = {}  # layer -> (B, N, T) head-averaged probabilities
        self.ages: dict[tuple[int, Branch], torch.Tensor] = {}  # (layer, branch) -> (B, N)

    def probs(self, module: nn.Module, x: torch.Tensor, text: torch.Tensor, mask: Optional[torch.Tensor]):
        """Head-averaged cross-attention probabilities of tokens x (B, n, C) over text (B, T, D),
        and the MACs: q projection n C^2, k projection T C D, QK^T n T C."""
        q = project(module, x, "q").float()  # (B, H, n, Dh)
        k = project(module, text, "k").float()  # (B, H, T, Dh)
        logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, n, T)
        if mask is not None:  # PixArt hands attn2 an additive bias (B, 1, T), 0 or -10000
            logits = logits + mask.float().reshape(mask.shape[0], 1, 1, -1)
        b, n, c = x.shape
        macs = b * (n * c * c + text.shape[1] * text.shape[2] * c + n * text.shape[1] * c)
        return logits.softmax(dim=-1).mean(dim=1), macs  # (B, n, T)

    def full(self, layer: int, branch: Branch, probs: Optional[torch.Tensor], batch: int, tokens: int) -> None:
        """A full computation: every age of (layer, branch) back to 0; the new map where given."""
        self.ages[(layer, branch)] = torch.zeros(batch, tokens)
        if probs is not None:
            self.maps[layer] = probs

    def refresh(self, layer: int, tokens: torch.Tensor, probs: torch.Tensor) -> None:
        """The recomputed tokens' rows (B, k) of the layer's map."""
        self.maps[layer] = self.maps[layer].scatter(1, tokens.unsqueeze(-1).expand(-1, -1, probs.shape[-1]), probs)

    def select(self, layer: int, branch: Branch, k: int) -> torch.Tensor:
        """The k tokens (B, k) to recompute, ranked as the code ranks them; ages them all by one."""
        age = self.ages[(layer, branch)]  # (B, N)
        batch, n = age.shape
        pairs = batch // 2 if self.guided else batch
        if self.random:
            base = torch.rand(pairs, n, generator=self.generator)
        else:
            base = l2_normalise(1 + mixed_entropy(self.maps[layer], self.guided))  # (B', N)
        if self.guided:
            base = base.repeat(2, 1)  # (B, N): both halves recompute the same tokens
        score = tile_bonus(base + self.freq_weight * age / self.interval, self.bonus)
        chosen = score.argsort(dim=-1, descending=True)[:, :k]  # (B, k)
        self.ages[(layer, branch)] = (age + 1).scatter(1, chosen, 0.0)
        return chosen


class PixartTokens:
    """ToCa / DuCa's decisions under the PixArt settings, for one run (``TocaPolicy`` delegates here)."""

    def __init__(self, policy, run):
        from .toca import layer_type

        c = policy.config
        if c.score == "vnorm":
            raise ValueError("score=vnorm is not part of the PixArt settings; use attention (the cross-attention "
                             "entropy of the authors' PixArt code) or random, or settings=dit")
        if c.ratio != type(c)().ratio or c.bonus != type(c)().bonus:
            raise ValueError("ratio= and bonus= are the DiT settings' R and 2x2 bonus; under the PixArt settings give "
                             "pixart_ratio= (the 4x4 bonus is fixed at 0.4, as in the code), or settings=dit")
        if Branch.CROSS not in run.branches:
            raise ValueError("the PixArt settings recompute cross-attention tokens; this model has no cross-attention")
        self.layer_type = layer_type
        self.ratio = c.pixart_ratio
        self.types = pixart_step_types(run.num_steps, c.interval, self.ratio, policy.dual)
        self.fresh = pixart_fresh_counts(self.types, run.depth, run.num_tokens, self.ratio)
        self.scorer = CrossAttentionScorer(c.interval, c.freq_weight, 0.4, guided=run.cfg_scale != 1.0,
                                           random=c.score == "random", seed=c.seed)
        self.modules = policy._cross_modules
        if not self.scorer.random and not self.modules:
            raise RuntimeError("the PixArt cross-attention score needs the cross-attention modules; run it "
                               "through a CacheEngine (which calls bind)")

    def action(self, step, site):
        from ..types import COMPUTE, REUSE, Action

        kind = self.layer_type(self.types[step.index], site.block)
        if kind == FULL:
            return COMPUTE
        if kind == AGGRESSIVE or site.branch is Branch.ATTN:
            return REUSE  # self-attention is reused on partial steps; aggressive steps skip the block
        k = int(self.fresh[site.branch][step.index, site.block])
        tokens = self.scorer.select(site.block, site.branch, k)  # also ages the tokens, k = 0 included
        return Action.partial(tokens) if k else REUSE

    def observe(self, step, site, action, inputs, output, kwargs) -> int:
        from ..types import Kind

        if site.branch is Branch.ATTN or action.kind is Kind.REUSE:
            return 0
        batch, tokens = output.shape[0], output.shape[1]
        if site.branch is Branch.MLP:
            if action.kind is Kind.COMPUTE:
                self.scorer.full(site.block, Branch.MLP, None, batch, tokens)
            return 0
        if self.scorer.random:
            if action.kind is Kind.COMPUTE:
                self.scorer.full(site.block, Branch.CROSS, None, batch, tokens)
            return 0
        x = inputs[0] if inputs else kwargs["hidden_states"]  # (B, N, C)
        text, mask = kwargs.get("encoder_hidden_states"), kwargs.get("attention_mask")
        if text is None:
            raise ValueError("the PixArt cross-attention score needs encoder_hidden_states as a keyword argument")
        module = self.modules[site.block]
        with torch.no_grad():
            if action.kind is Kind.COMPUTE:
                probs, macs = self.scorer.probs(module, x, text, mask)  # (B, N, T)
                self.scorer.full(site.block, Branch.CROSS, probs, batch, tokens)
                return macs
            picked = x.gather(1, action.tokens.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, k, C)
            probs, macs = self.scorer.probs(module, picked, text, mask)  # (B, k, T)
            self.scorer.refresh(site.block, action.tokens, probs)
            return macs
