"""Turning samples into pictures and files: uint8 conversion, grids, ADM-format npz."""

from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .atomic import write_atomic


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8, with DiT's clamp(127.5 x + 128, 0, 255)."""
    x = torch.clamp(127.5 * x.float() + 128.0, 0, 255)  # (B, C, H, W)
    return x.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()  # (B, H, W, C)


def grid(images: np.ndarray, columns: Optional[int] = None, pad: int = 2) -> np.ndarray:
    """Tile (B, H, W, C) uint8 images into one (H', W', C) picture."""
    b, h, w, c = images.shape
    columns = columns or max(1, math.ceil(math.sqrt(b)))
    rows = math.ceil(b / columns)
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, columns)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = img
    return canvas


def save_png(picture: np.ndarray, path: str | os.PathLike, scale: int = 1) -> None:
    """Save an (H, W, C) uint8 picture; small pictures are scaled up (nearest) for viewing."""
    img = Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    write_atomic(path, lambda tmp: img.save(tmp, format="PNG"))


def save_npz(path: str | os.PathLike, images: np.ndarray, labels: Optional[np.ndarray] = None) -> None:
    """ADM-evaluator format: uint8 NHWC images under ``arr_0``, plus ``labels``."""
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    write_atomic(path, lambda tmp: np.savez(tmp, **arrays))
