"""Classifier-free guidance (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598) as DiT runs it.

The conditional and unconditional passes run as one doubled batch, conditional half first. A caching
engine sees that batch, so the features it stores hold both halves in this order.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def cfg_model_fn(model_fn: ModelFn, cfg_scale: float, null_class: int,
                 guided_channels: Optional[int] = None, in_channels: Optional[int] = None) -> ModelFn:
    """Wrap ``model_fn(x, t, y) -> (B, C_out, H, W)`` into a guided function of the same signature.

    The wrapper calls ``model_fn`` once on ``cat([x, x])`` with labels ``cat([y, null])`` and returns
    ``uncond + cfg_scale * (cond - uncond)`` on the first ``guided_channels`` eps channels (None: all
    ``in_channels``, which default to ``x.shape[1]``). Every other output channel (the remaining eps
    channels and the variance channels) is the conditional half's, unguided.

    I guide only part of eps because DiT's ``forward_with_cfg`` guides only the first 3 of the 4 latent
    channels "for exact reproducibility" of its paper numbers; the published FIDs of DiT and of every
    cache paper come from that quirk, so reproducing them needs ``guided_channels=3``.

    ``cfg_scale == 1`` is no guidance: ``model_fn`` itself is returned and runs on the plain batch, as
    in DiT's ``sample_ddp.py``. Scales in [0, 1) are guided like any other (0 is the unconditional
    model on the guided channels).
    """
    scale = _checked_scale(cfg_scale)
    if guided_channels is not None and guided_channels < 0:
        raise ValueError(f"guided_channels must be >= 0 or None, got {guided_channels}")
    if in_channels is not None and guided_channels is not None and guided_channels > in_channels:
        raise ValueError(f"guided_channels={guided_channels} exceeds in_channels={in_channels}")
    if scale == 1.0:
        return model_fn

    def guided(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        eps_channels = x.shape[1] if in_channels is None else in_channels
        n_guided = eps_channels if guided_channels is None else guided_channels
        if n_guided > eps_channels:
            raise ValueError(f"guided_channels={n_guided} exceeds the {eps_channels} eps channels")
        null = torch.full_like(y, null_class)  # (B,)
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2B, C_out, H, W)
        if out.shape[0] != 2 * batch or out.shape[1] < eps_channels:
            raise ValueError(f"model output {tuple(out.shape)} does not fit a doubled batch of {batch} "
                             f"with {eps_channels} eps channels")
        cond, uncond = out[:batch], out[batch:]  # (B, C_out, H, W) each
        eps_cond, eps_uncond = cond[:, :n_guided], uncond[:, :n_guided]  # (B, G, H, W)
        guided_eps = eps_uncond + scale * (eps_cond - eps_uncond)  # (B, G, H, W)
        return torch.cat([guided_eps, cond[:, n_guided:]], dim=1)  # (B, C_out, H, W)

    return guided


def _checked_scale(cfg_scale) -> float:
    """cfg_scale as a float, or ValueError unless it is a finite number >= 0."""
    try:
        scale = float(cfg_scale)
    except (TypeError, ValueError):
        scale = math.nan
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"cfg_scale must be a finite number >= 0 (1.0 = no guidance), got {cfg_scale!r}")
    return scale
