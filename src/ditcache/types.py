"""The vocabulary of ditcache: sites, actions, steps and runs. Read this file first.

A *site* is one cacheable computation of a transformer: the pre-gate output of a block's attention
or MLP sub-module, or the whole block stack (the "trunk"). At every sampling step a *policy* picks
an *action* for every site; the engine carries it out.

Steps count up: step 0 is the first (noisiest) sampling step, step ``num_steps - 1`` the last.
This is GOC/EOC's ``current_step``. Papers that count down (FORA, L2C, ToCa, DuCa) are converted
with ``respaced_index = num_steps - 1 - step`` (see ``StepInfo.respaced_index``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

import torch


class Branch(str, enum.Enum):
    """Which computation of a block a site is."""

    ATTN = "attn"  # self-attention, pre-gate
    MLP = "mlp"  # feed-forward, pre-gate
    CROSS = "cross"  # cross-attention to the text tokens (PixArt); ungated in the block
    TRUNK = "trunk"  # the whole block stack; only DuCa's aggressive step reuses it


@dataclass(frozen=True, order=True)
class Site:
    """One cacheable computation: (block index, branch). The trunk has block -1."""

    block: int
    branch: Branch

    def __str__(self) -> str:
        return "trunk" if self.branch is Branch.TRUNK else f"{self.branch.value}{self.block}"

    @property
    def is_trunk(self) -> bool:
        return self.branch is Branch.TRUNK


TRUNK = Site(-1, Branch.TRUNK)
BRANCHES = (Branch.ATTN, Branch.MLP)  # the per-block site branches of a DiT, in schedule-column order
WITH_CROSS = (Branch.ATTN, Branch.MLP, Branch.CROSS)  # text-conditioned blocks (PixArt): a third column
# PARTIAL needs a token-wise sub-module: the MLP, and cross-attention (each image token's query attends
# to the text on its own); self-attention mixes image tokens, so it has no per-token result
TOKENWISE = (Branch.MLP, Branch.CROSS)


class Kind(str, enum.Enum):
    COMPUTE = "compute"
    REUSE = "reuse"
    PARTIAL = "partial"


@dataclass(frozen=True)
class Action:
    """What happens at a site at one step.

    COMPUTE runs the sub-module and stores its output. REUSE returns the stored output (after the
    correctors). PARTIAL runs the sub-module on ``tokens`` only, a LongTensor of shape (B, k) of token
    indices per batch row, and scatters the result into the stored output.
    """

    kind: Kind
    tokens: Optional[torch.Tensor] = field(default=None, compare=False)

    def __post_init__(self):
        if self.kind is Kind.PARTIAL:
            if self.tokens is None or self.tokens.dim() != 2 or self.tokens.dtype != torch.long:
                raise ValueError("PARTIAL needs tokens as a LongTensor of shape (B, k)")
        elif self.tokens is not None:
            raise ValueError(f"{self.kind.value} takes no tokens")

    @staticmethod
    def partial(tokens: torch.Tensor) -> "Action":
        return Action(Kind.PARTIAL, tokens)


COMPUTE = Action(Kind.COMPUTE)
REUSE = Action(Kind.REUSE)


@dataclass(frozen=True)
class RunInfo:
    """What a policy or corrector learns when a sampling call starts."""

    num_steps: int
    depth: int
    num_tokens: int
    timesteps: tuple[float, ...] = ()  # the model's timestep at each step, in sampling order (DDPM: 0..999)
    sampler: str = ""  # "ddim" / "ddpm", or a diffusers scheduler's key (class and settings digest)
    cfg_scale: float = 1.0
    fingerprint: str = ""  # the model's weights digest (keys calibration artifacts); "" if unknown
    resolution: int = 0  # pixel size of the generated images; 0 if unknown
    branches: tuple[Branch, ...] = BRANCHES  # the model's per-block branches, in schedule-column order


@dataclass(frozen=True)
class StepInfo:
    """The step the sampler is on."""

    index: int  # counts up from 0 (first, noisiest step)
    num_steps: int
    timestep: float = -1  # the model's timestep (original DDPM timestep, or a flow-matching t*1000); -1 if unknown

    @property
    def respaced_index(self) -> int:
        """The official DiT code's count-down index (FORA, L2C, ToCa, DuCa)."""
        return self.num_steps - 1 - self.index
