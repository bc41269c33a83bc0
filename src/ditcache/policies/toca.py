"""ToCa: token-wise feature caching, as in the official DiT code (methods.md §6.1).

Zou, Zhang et al., "Accelerating Diffusion Transformers with Token-wise Feature Caching", ICLR 2025,
https://arxiv.org/abs/2410.05317.

Full steps follow an interval I that changes along sampling. In the count-down respaced index r
(T = number of steps) a step is full iff it is the first step or r mod I == 0, and every full step
sets ``I = round(N / (1 + 0.4 − 0.8·r/T))``, or 2 for r in [0.2T, 0.4T). On the other (partial)
steps each block reuses its attention output and recomputes only the MLP of its top-k tokens
(token_scores.py), with k from the fresh-ratio schedule::

    ratio = R · (1 + ws − 2·ws·r/T) · (1 + wl − 2·wl·layer/(depth−1)) · m_MLP,  k = int(clamp(ratio)·N_tok)

ddim50: ws = 2, wl = −0.2 (i.e. 1 + 2 − 4r/T and 1 − 0.2 + 0.4·layer/27), m_MLP = 2.5. The attention
weight is 0 (k = 0), so attention is plain reuse. This is narrower than the paper's Algorithm 1,
which also recomputes attention for the chosen tokens; the code does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..types import COMPUTE, REUSE, Action, Branch, Kind, RunInfo, Site, StepInfo
from .base import Policy, positive_int, register_policy
from .token_scores import SCORES, VNORM_RECOMPUTE, TokenScorer

FULL, PARTIAL, AGGRESSIVE = "f", "p", "a"

# (step weight ws, layer weight wl) of the official fresh-ratio schedulers, in the form
# 1 + w − 2w·x. "ToCa-ddpm250" is quoted as "step weight 0.4 and layer weight +0.8"; reading the
# ddim50 layer factor 1 − 0.2 + 0.4·l/27 as w = −0.2 makes that +0.8 (more fresh tokens in early
# layers) the consistent reading. That sign is our reconstruction.
RATIO_SCHEDULES = {"ddim50": (2.0, -0.2), "ddpm250": (0.4, 0.8)}


def weighted(weight: float, x: float) -> float:
    """The schedulers' linear ramp 1 + w − 2w·x: 1 + w at x = 0, 1 − w at x = 1."""
    return 1.0 + weight - 2.0 * weight * x


def interval_at(respaced: int, num_steps: int, base: int) -> int:
    """The full-step interval set by a full step at count-down index ``respaced``."""
    if 0.2 * num_steps <= respaced < 0.4 * num_steps:
        return 2  # the authors call this stretch "extremely sensitive"
    return max(1, round(base / weighted(0.4, respaced / num_steps)))


def step_types(num_steps: int, interval: int, dual: bool = False) -> str:
    """The type of every step, in sampling order (our step 0 first): 'f' full, 'p' partial, 'a' aggressive.

    ``dual`` gives DuCa's split of the non-full steps: q = r mod I odd -> 'p', even -> 'a'.

    The first step is full and, like every full step, sets I from its own r. methods.md also says
    "the first step uses N directly"; read as "I = N until the first step recomputes it" this changes
    nothing. Keeping I = N after step 0 instead gives 21 full / 29 partial at DDIM-50, N = 3, and a
    DuCa sequence that differs from the derived one at its second step, so we do not.
    """
    positive_int(interval, "ToCa interval")
    types, current = [], interval
    for step in range(num_steps):
        r = num_steps - 1 - step
        if step == 0 or r % current == 0:
            types.append(FULL)
            current = interval_at(r, num_steps, interval)
        elif dual and (r % current) % 2 == 0:
            types.append(AGGRESSIVE)
        else:
            types.append(PARTIAL)
    return "".join(types)


def fresh_ratio(respaced: int, num_steps: int, layer: int, depth: int, ratio: float,
                schedule: str = "ddim50", mlp_weight: float = 2.5) -> float:
    """The unclamped fraction of MLP tokens recomputed at a partial step (methods.md §6.1)."""
    step_w, layer_w = RATIO_SCHEDULES[schedule]
    layer_pos = layer / (depth - 1) if depth > 1 else 0.0  # the paper's layer/27 at depth 28
    return ratio * weighted(step_w, respaced / num_steps) * weighted(layer_w, layer_pos) * mlp_weight


def fresh_counts(types: str, depth: int, num_tokens: int, ratio: float, schedule: str = "ddim50",
                 mlp_weight: float = 2.5) -> np.ndarray:
    """k per (step, layer), shape (T, depth): the MLP tokens recomputed at each partial step, 0 elsewhere."""
    num_steps = len(types)
    k = np.zeros((num_steps, depth), dtype=np.int64)
    for step, kind in enumerate(types):
        if kind != PARTIAL:
            continue
        r = num_steps - 1 - step
        for layer in range(depth):
            share = fresh_ratio(r, num_steps, layer, depth, ratio, schedule, mlp_weight)
            k[step, layer] = int(min(max(share, 0.0), 1.0) * num_tokens)
    return k


@dataclass(frozen=True)
class TocaConfig:
    interval: int = 3  # N, the base full-step interval (--fresh-threshold); README DDIM-50 value
    ratio: float = 0.07  # R, the base fresh ratio (README DDIM-50)
    score: str = "attention"  # token score: attention (s1) | vnorm | random
    freq_weight: float = 0.25  # λ3 of the cache-frequency score s3 (--soft-fresh-weight)
    bonus: float = 0.6  # s4 spatial-uniformity bonus
    ratio_schedule: str = "ddim50"  # fresh-ratio constants: ddim50 | ddpm250
    mlp_weight: float = 2.5  # m_MLP of the fresh-ratio schedule
    vnorm_recompute: str = "small"  # V-norm sign: recompute small-norm tokens (DuCa code) | large
    seed: int = 0  # random token selection


def check_config(config: TocaConfig) -> None:
    positive_int(config.interval, "interval")
    if config.score not in SCORES:
        raise ValueError(f"unknown token score {config.score!r}; choose from {SCORES}")
    if config.ratio_schedule not in RATIO_SCHEDULES:
        raise ValueError(f"unknown ratio_schedule {config.ratio_schedule!r}; choose from {sorted(RATIO_SCHEDULES)}")
    if config.vnorm_recompute not in VNORM_RECOMPUTE:
        raise ValueError(f"vnorm_recompute must be one of {VNORM_RECOMPUTE}, got {config.vnorm_recompute!r}")
    if not 0.0 <= config.ratio <= 1.0:  # a fraction of the tokens; also refuses NaN
        raise ValueError(f"ratio is the fraction of tokens recomputed and must be in [0, 1], got {config.ratio}")
    for name in ("bonus", "mlp_weight", "freq_weight"):
        value = getattr(config, name)
        if not 0.0 <= value < float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")


class TocaPolicy(Policy):
    """Full steps by the interval rule; partial steps reuse attention and recompute top-k MLP tokens.

    After ``reset`` the run's plan is inspectable: ``types`` (str, f/p/a per step), ``fresh``
    ((T, depth) tokens recomputed per MLP) and ``scored`` ((T, depth) full-step layers scored).
    """

    name = "toca"
    dual = False  # DuCa turns the even-q partial steps into aggressive ones

    def __init__(self, config: TocaConfig):
        check_config(config)
        self.config = config
        self._attn_modules: dict[int, nn.Module] = {}

    def plan(self, num_steps: int) -> str:
        """The step types (f/p/a) this policy would use for ``num_steps`` steps, step 0 first."""
        return step_types(num_steps, self.config.interval, self.dual)

    def bind(self, modules: dict[Site, nn.Module]) -> None:
        self._attn_modules = {site.block: m for site, m in modules.items() if site.branch is Branch.ATTN}

    def reset(self, run: RunInfo) -> None:
        super().reset(run)
        c = self.config
        self.types = self.plan(run.num_steps)
        self.fresh = fresh_counts(self.types, run.depth, run.num_tokens, c.ratio, c.ratio_schedule, c.mlp_weight)
        self.scorer = TokenScorer(c.score, c.interval, c.freq_weight, c.bonus, c.vnorm_recompute, c.seed)
        self.scored = self._scored_layers()
        if self.scorer.needs_module and self.scored.any() and not self._attn_modules:
            raise RuntimeError(f"{self.name} with score {c.score!r} needs the attention modules; "
                               "run it through a CacheEngine (which calls bind)")

    def _scored_layers(self) -> np.ndarray:
        """(T, depth) bool: a full step scores a layer only if a partial step before the next full
        step recomputes tokens there. I skip the rest because their score would never be read
        (early steps have k = 0), and scoring is extra compute."""
        needs = np.zeros_like(self.fresh, dtype=bool)
        if not self.scorer.needs_module:
            return needs
        last_full = None
        for step, kind in enumerate(self.types):
            if kind == FULL:
                last_full = step
            elif last_full is not None:
                needs[last_full] |= self.fresh[step] > 0
        return needs

    def action(self, step: StepInfo, site: Site) -> Action:
        kind = self.types[step.index]
        if kind == FULL:
            return COMPUTE
        k = int(self.fresh[step.index, site.block]) if site.branch is Branch.MLP else 0
        return Action.partial(self.scorer.select(site.block, k)) if k else REUSE

    def may_reuse(self, site: Site) -> bool:
        return True

    def observe(self, step: StepInfo, site: Site, action: Action, inputs: tuple, output: torch.Tensor) -> int:
        layer = site.block
        if site.branch is Branch.ATTN:
            if action.kind is Kind.COMPUTE and self.scored[step.index, layer]:
                if not inputs:
                    raise ValueError("token scoring needs the attention input as a positional argument")
                return self.scorer.score_full_step(layer, self._attn_modules[layer], inputs[0])
            return 0
        # MLP: keep each token's cache age (partial steps since it was last computed)
        if action.kind is Kind.COMPUTE:
            self.scorer.computed(layer, output)
        else:
            none = torch.zeros(output.shape[0], 0, dtype=torch.long)  # (B, 0): a REUSE ages every token
            self.scorer.computed(layer, output, action.tokens if action.kind is Kind.PARTIAL else none)
        return 0


@register_policy("toca", TocaConfig, "ToCa: interval full steps; partial steps reuse attention, recompute top-k MLP tokens")
def _toca(config: TocaConfig) -> TocaPolicy:
    return TocaPolicy(config)
