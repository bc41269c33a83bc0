"""DuCa: dual feature caching, aggressive and conservative steps alternating (methods.md §6.2).

Zou, Zhang et al., "Accelerating Diffusion Transformers with Dual Feature Caching" (v2: "Rethinking
Token-wise Feature Caching"), https://arxiv.org/abs/2412.18911.

Full computations follow ToCa's interval rule, decided per layer (toca.py). A non-full layer with
q = r mod I (r the count-down respaced index) is
- q odd: *conservative*, exactly ToCa's partial step (attention reused, top-k MLP tokens recomputed);
- q even: *aggressive*: the block is skipped, and at the last block the previous step's last-block
  output is reused; only the final layer runs, with the current conditioning (a trunk REUSE in the
  engine).

At a step 'A' (layer 0 full, it re-initialises I, layers 1.. aggressive under the new I; DDIM-50, N = 3:
r = 32) layer 0 is computed and stored, as in the authors' code, and the output is still the reused
stack output: ``runs_in_reused_trunk`` tells the engine to run that block.

Token selection is ``score = attention`` (ToCa's s1, the DiT README command), ``vnorm`` (V-caching:
small value norms recomputed, works with fused attention) or ``random`` (what v2 recommends and
``sample_ddp.py`` defaults to: raw uniform scores, one draw for both guidance halves).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..types import COMPUTE, REUSE, Action, StepInfo
from .base import register_policy
from .toca import AGGRESSIVE, FULL, TocaConfig, TocaPolicy, layer_type


@dataclass(frozen=True)
class DucaConfig(TocaConfig):
    ratio: float = 0.05  # R of the DuCa README (DDIM-50, N = 3)
    bonus: float = 0.8  # DuCa's s4 bonus


class DucaPolicy(TocaPolicy):
    """ToCa's schedule with the even-q partial layers turned into whole-trunk reuse."""

    name = "duca"
    dual = True
    uses_trunk = True

    def trunk_action(self, step: StepInfo) -> Action:
        # No site runs at an aggressive step, so no token ages there: s3 counts partial steps only.
        return REUSE if self.types[step.index].lower() == AGGRESSIVE else COMPUTE

    def runs_in_reused_trunk(self, step: StepInfo, block: int) -> bool:
        return layer_type(self.types[step.index], block) == FULL


@register_policy("duca", DucaConfig, "DuCa: ToCa's partial steps alternating with whole-trunk reuse (aggressive) steps")
def _duca(config: DucaConfig) -> DucaPolicy:
    return DucaPolicy(config)
