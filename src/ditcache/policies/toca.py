"""ToCa: token-wise feature caching, as in the official DiT code (methods.md §6.1).

Zou, Zhang et al., "Accelerating Diffusion Transformers with Token-wise Feature Caching", ICLR 2025,
https://arxiv.org/abs/2410.05317.

Full computations follow an interval I that changes along sampling. As in the authors' code
(DiT-ToCa ``cal_type.py``, ``force_init.py``, ``force_scheduler.py``) the type is decided in every
layer, with r the count-down respaced index and T the number of steps:

- the first step is full in every layer;
- otherwise a layer is full iff r mod I == 0, else partial ('p'; DuCa: q = r mod I odd 'p', even 'a');
- layer 0 of a full step re-initialises ``I = round(N / (1 + 0.4 − 0.8·r/T))`` (float32, as the
  code's ``torch.tensor``), or 2 for r in ``range(int(0.2T), int(0.4T))``. With ratio 0 (the code's
  FORA mode) I = N and there is no interval-2 window.

So when r is not a multiple of the new I, only layer 0 is computed in full and layers 1.. take the
partial (or aggressive) type of the new I. ``step_types`` writes such a step as the upper-case type
of its layers 1.. ('P', 'A'). At DDIM-50, N = 3 that happens at r = 45 and r = 32 (steps 4 and 17)::

    ToCa  fpppPfpppfpppfpppPpfppfppfppfppfpfpfpfpfpfpfpfpfpf   18 f, 30 p, 2 P
    DuCa  fpapPfpapfpapfpapApfapfapfapfapfpfpfpfpfpfpfpfpfpf   18 f, 22 p, 8 a, 1 P, 1 A

On the partial layers each block reuses its attention output and recomputes only the MLP of its top-k
tokens (token_scores.py), with k from the fresh-ratio schedule::

    ratio = R · (1 + ws − 2·ws·r/T) · (1 + wl − 2·wl·layer/(depth−1)) · m_MLP,  k = int(clamp(ratio)·N_tok)

ddim50: ws = 2, wl = −0.2 (i.e. 1 + 2 − 4r/T and 1 − 0.2 + 0.4·layer/27), m_MLP = 2.5. The attention
weight is 0 (k = 0), so attention is plain reuse. This is narrower than the paper's Algorithm 1,
which also recomputes attention for the chosen tokens; the code does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..types import COMPUTE, REUSE, Action, Branch, Kind, RunInfo, Site, StepInfo
from .base import Policy, positive_int, register_policy
from .token_scores import SCORES, VNORM_RECOMPUTE, TokenScorer

FULL, PARTIAL, AGGRESSIVE = "f", "p", "a"
SETTINGS = ("auto", "dit", "pixart")

# (step weight ws, layer weight wl) of the official fresh-ratio schedulers, in the form
# 1 + w − 2w·x. "ToCa-ddpm250" is quoted as "step weight 0.4 and layer weight +0.8"; reading the
# ddim50 layer factor 1 − 0.2 + 0.4·l/27 as w = −0.2 makes that +0.8 (more fresh tokens in early
# layers) the consistent reading. That sign is our reconstruction.
RATIO_SCHEDULES = {"ddim50": (2.0, -0.2), "ddpm250": (0.4, 0.8)}


def weighted(weight: float, x: float) -> float:
    """The schedulers' linear ramp 1 + w − 2w·x: 1 + w at x = 0, 1 − w at x = 1."""
    return 1.0 + weight - 2.0 * weight * x


def interval_at(respaced: int, num_steps: int, base: int, ratio: float = 0.07) -> int:
    """The full-step interval set by layer 0 of a full step at count-down index ``respaced``.

    As ``force_scheduler.py``: the window is ``range(int(0.2T), int(0.4T))`` (integer truncation)
    and the division runs in float32 with round-half-to-even (``torch.round``). ``ratio`` 0 is the
    code's FORA mode: step weight 0 and no window, so I = N.
    """
    if ratio != 0 and respaced in range(int(num_steps * 0.2), int(num_steps * 0.4)):
        return 2  # the authors call this stretch "extremely sensitive"
    weight = 0.4 if ratio != 0 else 0.0
    factor = np.float32(1 + weight - 2 * weight * respaced / num_steps)  # the code's torch.tensor(...)
    return max(1, int(np.round(np.float32(base) / factor)))


def _layer_type(respaced: int, interval: int, dual: bool) -> str:
    """A non-first step's type in a layer under interval I (``cal_type.py``)."""
    q = respaced % interval
    if q == 0:
        return FULL
    return AGGRESSIVE if dual and q % 2 == 0 else PARTIAL


def step_types(num_steps: int, interval: int, dual: bool = False, ratio: float = 0.07) -> str:
    """One letter per step, in sampling order (our step 0 first): the type of its layers.

    'f' full, 'p' partial, 'a' aggressive (``dual``: DuCa) in every layer; 'P' / 'A' when layer 0 is
    full (it re-initialises I) and the other layers are partial / aggressive under the new I.
    """
    positive_int(interval, "ToCa interval")
    types, current = [], interval
    for step in range(num_steps):
        r = num_steps - 1 - step
        if step == 0:  # cal_type's first_step: full in every layer, then I from its own r
            types.append(FULL)
            current = interval_at(r, num_steps, interval, ratio)
            continue
        head = _layer_type(r, current, dual)
        if head == FULL:
            current = interval_at(r, num_steps, interval, ratio)
            rest = _layer_type(r, current, dual)
            types.append(FULL if rest == FULL else rest.upper())
        else:
            types.append(head)
    return "".join(types)


def layer_type(code: str, layer: int) -> str:
    """The type ('f', 'p' or 'a') of one layer at a step whose ``step_types`` letter is ``code``."""
    if code.isupper():
        return FULL if layer == 0 else code.lower()
    return code


def fresh_ratio(respaced: int, num_steps: int, layer: int, depth: int, ratio: float,
                schedule: str = "ddim50", mlp_weight: float = 2.5) -> float:
    """The unclamped fraction of MLP tokens recomputed at a partial step (methods.md §6.1)."""
    step_w, layer_w = RATIO_SCHEDULES[schedule]
    layer_pos = layer / (depth - 1) if depth > 1 else 0.0  # the paper's layer/27 at depth 28
    return ratio * weighted(step_w, respaced / num_steps) * weighted(layer_w, layer_pos) * mlp_weight


def fresh_counts(types: str, depth: int, num_tokens: int, ratio: float, schedule: str = "ddim50",
                 mlp_weight: float = 2.5) -> np.ndarray:
    """k per (step, layer), shape (T, depth): the MLP tokens recomputed in each partial layer, 0 elsewhere.

    ``types`` is a ``step_types`` string.
    """
    num_steps = len(types)
    k = np.zeros((num_steps, depth), dtype=np.int64)
    for step, code in enumerate(types):
        r = num_steps - 1 - step
        for layer in range(depth):
            if layer_type(code, layer) != PARTIAL:
                continue
            share = fresh_ratio(r, num_steps, layer, depth, ratio, schedule, mlp_weight)
            k[step, layer] = int(min(max(share, 0.0), 1.0) * num_tokens)
    return k


@dataclass(frozen=True)
class TocaConfig:
    interval: int = 3  # N, the base full-step interval (--fresh-threshold); README DDIM-50 value
    ratio: float = 0.07  # R, the base fresh ratio (README DDIM-50); 0 is the code's FORA mode: interval N throughout
    score: str = "attention"  # token score: attention (s1) | vnorm | random
    freq_weight: float = 0.25  # λ3 of the cache-frequency score s3 (--soft-fresh-weight)
    bonus: float = 0.6  # s4 spatial-uniformity bonus
    ratio_schedule: str = "ddim50"  # fresh-ratio constants: ddim50 | ddpm250
    mlp_weight: float = 2.5  # m_MLP of the fresh-ratio schedule
    vnorm_recompute: str = "small"  # V-norm sign: recompute small-norm tokens (DuCa code) | large
    seed: int = 0  # random token selection
    settings: str = "auto"  # the authors' DiT or PixArt code; auto: pixart where blocks have cross-attention
    pixart_ratio: float = 0.30  # R under the PixArt settings (the ToCa PixArt command; DuCa's is 0.75)


def check_config(config: TocaConfig) -> None:
    positive_int(config.interval, "interval")
    if config.score not in SCORES:
        raise ValueError(f"unknown token score {config.score!r}; choose from {SCORES}")
    if config.ratio_schedule not in RATIO_SCHEDULES:
        raise ValueError(f"unknown ratio_schedule {config.ratio_schedule!r}; choose from {sorted(RATIO_SCHEDULES)}")
    if config.vnorm_recompute not in VNORM_RECOMPUTE:
        raise ValueError(f"vnorm_recompute must be one of {VNORM_RECOMPUTE}, got {config.vnorm_recompute!r}")
    for name, value in (("ratio", config.ratio), ("pixart_ratio", config.pixart_ratio)):
        if not 0.0 <= value <= 1.0:  # a fraction of the tokens; also refuses NaN
            raise ValueError(f"{name} is the fraction of tokens recomputed and must be in [0, 1], got {value}")
    for name in ("bonus", "mlp_weight", "freq_weight"):
        value = getattr(config, name)
        if not 0.0 <= value < float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    if config.settings not in SETTINGS:
        raise ValueError(f"settings must be one of {SETTINGS}, got {config.settings!r}")


class TocaPolicy(Policy):
    """Full steps by the interval rule; partial steps reuse attention and recompute top-k MLP tokens.

    After ``reset`` the run's plan is inspectable: ``types`` (str, one ``step_types`` letter per
    step), ``fresh`` ((T, depth) tokens recomputed per MLP) and ``scored`` ((T, depth) full layers
    scored).
    """

    name = "toca"
    dual = False  # DuCa turns the even-q partial steps into aggressive ones
    observes_kwargs = True  # the PixArt score reads the caption the cross-attention attends to

    def __init__(self, config: TocaConfig):
        check_config(config)
        self.config = config
        self._attn_modules: dict[int, nn.Module] = {}
        self._cross_modules: dict[int, nn.Module] = {}
        self.pixart = None

    def plan(self, num_steps: int) -> str:
        """The step types (f/p/a, P/A) this policy would use for ``num_steps`` steps, step 0 first."""
        return step_types(num_steps, self.config.interval, self.dual, self.config.ratio)

    def bind(self, modules: dict[Site, nn.Module]) -> None:
        self._attn_modules = {site.block: m for site, m in modules.items() if site.branch is Branch.ATTN}
        self._cross_modules = {site.block: m for site, m in modules.items() if site.branch is Branch.CROSS}

    def uses_pixart(self, run: RunInfo) -> bool:
        """The PixArt settings (toca_pixart.py) for this run: asked for, or auto on cross-attention blocks."""
        if self.config.settings == "auto":
            return Branch.CROSS in run.branches
        return self.config.settings == "pixart"

    def reset(self, run: RunInfo) -> None:
        super().reset(run)
        c = self.config
        from .toca_pixart import PixartTokens  # it builds on this module's step typing

        self.pixart = PixartTokens(self, run) if self.uses_pixart(run) else None
        if self.pixart is not None:
            self.types = self.pixart.types
            return
        self.types = self.plan(run.num_steps)
        self.fresh = fresh_counts(self.types, run.depth, run.num_tokens, c.ratio, c.ratio_schedule, c.mlp_weight)
        # with guidance the batch is [cond; uncond] (sampling/guidance.py): random scores are shared
        self.scorer = TokenScorer(c.score, c.interval, c.freq_weight, c.bonus, c.vnorm_recompute, c.seed,
                                  shared_halves=run.cfg_scale != 1.0)
        self.scored = self._scored_layers()
        if self.scorer.needs_module and self.scored.any() and not self._attn_modules:
            raise RuntimeError(f"{self.name} with score {c.score!r} needs the attention modules; "
                               "run it through a CacheEngine (which calls bind)")

    def _scored_layers(self) -> np.ndarray:
        """(T, depth) bool: a layer computed in full is scored only if a partial step of that layer
        before its next full computation recomputes tokens. I skip the rest because their score
        would never be read (early steps have k = 0), and scoring is extra compute."""
        needs = np.zeros_like(self.fresh, dtype=bool)
        if not self.scorer.needs_module:
            return needs
        for layer in range(needs.shape[1]):
            last_full = None
            for step, code in enumerate(self.types):
                if layer_type(code, layer) == FULL:
                    last_full = step
                elif last_full is not None and self.fresh[step, layer] > 0:
                    needs[last_full, layer] = True
        return needs

    def action(self, step: StepInfo, site: Site) -> Action:
        if self.pixart is not None:
            return self.pixart.action(step, site)
        kind = layer_type(self.types[step.index], site.block)
        if kind == FULL:
            return COMPUTE
        if kind == AGGRESSIVE:  # DuCa skips these blocks (trunk reuse); never asked through the engine
            return REUSE
        k = int(self.fresh[step.index, site.block]) if site.branch is Branch.MLP else 0
        return Action.partial(self.scorer.select(site.block, k)) if k else REUSE

    def may_reuse(self, site: Site) -> bool:
        return True

    def observe(self, step: StepInfo, site: Site, action: Action, inputs: tuple, output: torch.Tensor,
                kwargs: Optional[dict] = None) -> int:
        if self.pixart is not None:
            return self.pixart.observe(step, site, action, inputs, output, kwargs or {})
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
