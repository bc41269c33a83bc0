"""DuCa: dual feature caching, aggressive and conservative steps alternating (methods.md §6.2).

Zou, Zhang et al., "Accelerating Diffusion Transformers with Dual Feature Caching" (v2: "Rethinking
Token-wise Feature Caching"), https://arxiv.org/abs/2412.18911.

Full steps follow ToCa's interval rule (toca.py). A non-full step with q = r mod I (r the count-down
respaced index) is
- q odd: *conservative*, exactly ToCa's partial step (attention reused, top-k MLP tokens recomputed);
- q even: *aggressive*, the whole block stack is skipped and the previous step's last-block output is
  reused; only the final layer runs, with the current conditioning (a trunk REUSE in the engine).

Token selection is ``score = attention`` (ToCa's s1, the DiT README command), ``vnorm`` (V-caching:
small value norms recomputed, works with fused attention) or ``random`` (what v2 recommends and
``sample_ddp.py`` defaults to).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..types import COMPUTE, REUSE, Action, StepInfo
from .base import register_policy
from .toca import AGGRESSIVE, TocaConfig, TocaPolicy


@dataclass(frozen=True)
class DucaConfig(TocaConfig):
    ratio: float = 0.05  # R of the DuCa README (DDIM-50, N = 3)
    bonus: float = 0.8  # DuCa's s4 bonus


class DucaPolicy(TocaPolicy):
    """ToCa's schedule with the even-q partial steps turned into whole-trunk reuse."""

    name = "duca"
    dual = True
    uses_trunk = True

    def trunk_action(self, step: StepInfo) -> Action:
        # No site runs at an aggressive step, so no token ages there: s3 counts partial steps only.
        return REUSE if self.types[step.index] == AGGRESSIVE else COMPUTE


@register_policy("duca", DucaConfig, "DuCa: ToCa's partial steps alternating with whole-trunk reuse (aggressive) steps")
def _duca(config: DucaConfig) -> DucaPolicy:
    return DucaPolicy(config)
