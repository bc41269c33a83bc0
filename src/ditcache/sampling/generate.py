"""From a loaded model and a sampling config to images and a report: the job `ditcache sample` runs.

Noise and random labels are drawn per sample from a generator seeded by (seed, sample index), so a
sample's image depends only on the seed and its index: not on the batch size, the number of
processes a run is sharded over, or whether it was resumed. DDPM's step noise is drawn per batch
from (seed, first index of the batch), so DDPM results also depend on the batch size.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from ..images import to_uint8
from .loops import SAMPLERS, sample


@dataclass(frozen=True)
class SampleConfig:
    """What to sample. Defaults follow the cache papers' DDIM-20, cfg 1.5 evaluation setting."""

    num_samples: int = 16
    batch_size: int = 64
    sampler: str = "ddim"
    steps: int = 20
    cfg_scale: float = 1.5
    seed: int = 0
    labels: Optional[tuple[int, ...]] = None  # None: uniform random; shorter lists repeat in order

    def validate(self, num_classes: int) -> None:
        if self.num_samples < 1 or self.batch_size < 1:
            raise ValueError("num_samples and batch_size must be at least 1")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose from {list(SAMPLERS)}")
        if not 1 <= self.steps <= 1000:
            raise ValueError(f"steps must be between 1 and 1000, got {self.steps}")
        if not self.cfg_scale >= 0:  # also rejects NaN
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.labels is not None:
            if len(self.labels) == 0:
                raise ValueError("labels is empty")
            bad = [y for y in self.labels if not 0 <= y < num_classes]
            if bad:
                raise ValueError(f"labels {bad} are outside 0..{num_classes - 1} for this model")

    def tag(self) -> str:
        """A short stable name for output folders."""
        return f"{self.sampler}{self.steps}-cfg{self.cfg_scale:g}-seed{self.seed}-n{self.num_samples}"


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for one sample, independent of batching and sharding."""
    return int(hashlib.sha256(f"ditcache:{seed}:{index}".encode()).hexdigest()[:15], 16)


def noise_and_labels(indices: Sequence[int], config: SampleConfig, shape: tuple, num_classes: int):
    """Per-sample noise (B, C, H, W) and labels (B,) for the given global sample indices."""
    noise, labels = [], []
    for i in indices:
        g = torch.Generator().manual_seed(sample_seed(config.seed, i))
        noise.append(torch.randn(shape, generator=g))  # (C, H, W)
        if config.labels is None:
            labels.append(int(torch.randint(0, num_classes, (1,), generator=g)))
        else:
            labels.append(config.labels[i % len(config.labels)])
    return torch.stack(noise), torch.tensor(labels, dtype=torch.long)


@dataclass
class SampleResult:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,)
    seconds: float  # wall-clock of sampling and decoding, model loading excluded
    report: dict = field(default_factory=dict)  # engine counters summed over batches


def decode(loaded, x: torch.Tensor) -> torch.Tensor:
    """Latent models go through their VAE (DiT: decode(z / 0.18215)); pixel models pass through."""
    if loaded.vae is None:
        return x
    return loaded.vae.decode(x / 0.18215).sample


@torch.no_grad()
def generate(loaded, config: SampleConfig, engine=None, indices: Optional[Sequence[int]] = None,
             progress: bool = False, device: str = "cpu") -> SampleResult:
    """Sample ``config.num_samples`` images (or the given global ``indices``) with an optional engine."""
    config.validate(loaded.num_classes)
    if engine is not None:
        engine.describe_model(loaded.fingerprint, loaded.image_size)
    indices = list(range(config.num_samples)) if indices is None else list(indices)
    shape = (loaded.in_channels, loaded.latent_size, loaded.latent_size)
    images, labels, totals = [], [], _Totals()
    start = time.perf_counter()
    batches = [indices[i:i + config.batch_size] for i in range(0, len(indices), config.batch_size)]
    for n, batch in enumerate(batches):
        z, y = noise_and_labels(batch, config, shape, loaded.num_classes)
        step_gen = torch.Generator(device=device).manual_seed(sample_seed(config.seed, -1 - batch[0]))
        x = sample(
            loaded.forward, z.to(device), y.to(device),
            sampler=config.sampler, num_steps=config.steps, cfg_scale=config.cfg_scale,
            null_class=loaded.null_class, learn_sigma=loaded.learn_sigma,
            guided_channels=loaded.guided_channels, hooks=engine, generator=step_gen,
            progress=progress and len(batches) == 1,
        )
        if engine is not None:
            engine.end_run()
            totals.add(engine.report())
        images.append(to_uint8(decode(loaded, x)))
        labels.append(y.numpy())
        if progress and len(batches) > 1:
            print(f"\rbatch {n + 1}/{len(batches)}", end="", flush=True)
    if progress and len(batches) > 1:
        print()
    seconds = time.perf_counter() - start
    report = totals.report(engine)
    return SampleResult(np.concatenate(images), np.concatenate(labels), seconds, report)


class _Totals:
    """Sums the engine's per-call counters over batches."""

    def __init__(self):
        self.sums = {"sites_run": 0.0, "sites_total": 0.0, "macs_run": 0, "macs_total": 0, "extra_macs": 0,
                     "corrector_seconds": 0.0}
        self.peak = 0

    def add(self, report: dict) -> None:
        for key in self.sums:
            self.sums[key] += report.get(key, 0)
        self.peak = max(self.peak, report["cache_peak_bytes"])

    def report(self, engine) -> dict:
        if engine is None:
            return {"compute_fraction": 1.0, "macs_ratio": 1.0}
        s = self.sums
        return {
            "compute_fraction": s["sites_run"] / s["sites_total"] if s["sites_total"] else 1.0,
            "macs_ratio": s["macs_run"] / s["macs_total"] if s["macs_total"] else 1.0,
            "macs_run": s["macs_run"],
            "macs_total": s["macs_total"],
            "extra_macs": s["extra_macs"],  # policy overhead (token scoring), already inside macs_run
            "cache_peak_bytes": self.peak,
            "corrector_seconds": s["corrector_seconds"],  # inside the correctors, part of the wall-clock
            "policy": engine.policy.describe(),
            "correctors": [c.describe() for c in engine.correctors],
        }
