"""Latency benchmark: measured wall-clock speed-up of cache policies against the MACs bound.

Every policy runs the same sampling job in one process, after one untimed warm-up; each is timed
``repeats`` times, the configurations taking turns, and the median kept. The table puts the
measured speed-up beside the bound the engine's MACs counters allow (1 / macs_ratio), their ratio
(the share of the bound realised), and the share of the wall-clock spent inside the correctors
(EOC, GOC), timed in the engine around their calls: the in-process latency overhead of a
corrector, free of run-to-run noise.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from ..engine import CacheEngine
from ..models.dit import build_dit
from ..models.loading import LoadedModel
from ..sampling.generate import SampleConfig, generate
from .compare import parse_cache

BARE = "bare"  # no engine: the cost of the engine itself is "none" against this
DEFAULT_SPECS = (BARE, "none", "rule:preset=rm-25", "rule:preset=rm-50", "fora:interval=2", "fora:interval=3")


def random_dit(name: str = "DiT-XL/2", seed: int = 0) -> LoadedModel:
    """An official-size DiT with random weights (no VAE: latents are returned as they are).

    Speed does not depend on the weights' values, so this times DiT-XL/2 exactly where its
    checkpoint cannot be downloaded. I randomise the zero-initialised adaLN and output layers too,
    so the gates are not all zero and every sub-layer's output is a realistic tensor.
    """
    torch.manual_seed(seed)
    module = build_dit(name).eval()
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "adaLN" in n or "final_layer.linear" in n:
                p.normal_(0, 0.02)
    size = module.input_size
    return LoadedModel(module=module, family="dit", name=f"{name}-random", image_size=size, latent_size=size,
                       in_channels=module.in_channels, num_classes=module.num_classes, null_class=module.null_class,
                       learn_sigma=module.learn_sigma, guided_channels=3, vae=None, fingerprint=f"random-{seed}")


@dataclass
class SpeedRow:
    spec: str
    seconds: float  # median over repeats
    seconds_all: list
    compute_fraction: float
    macs_ratio: float
    corrector_seconds: float = 0.0  # median over repeats of the time inside the correctors
    speedup: float = 1.0

    @property
    def bound(self) -> float:
        return 1.0 / self.macs_ratio

    def as_dict(self) -> dict:
        return {"spec": self.spec, "seconds": self.seconds, "seconds_all": self.seconds_all,
                "compute_fraction": self.compute_fraction, "macs_ratio": self.macs_ratio,
                "speedup": self.speedup, "macs_bound": self.bound, "share_of_bound": self.speedup / self.bound,
                "corrector_seconds": self.corrector_seconds, "corrector_share": self.corrector_seconds / self.seconds}


def time_policies(loaded, config: SampleConfig, specs=DEFAULT_SPECS, repeats: int = 3, device: str = "cpu",
                  progress: bool = True) -> list[SpeedRow]:
    """Median wall-clock of ``generate`` per spec; the first spec is the reference for speed-ups.

    The spec "bare" times the model without any engine, so "none" against it is the engine's cost."""
    def run(spec):
        if spec == BARE:  # the model with no engine installed at all
            return generate(loaded, config, device=device)
        policy, correctors = parse_cache(spec)
        with CacheEngine(loaded.module, policy, correctors) as engine:
            return generate(loaded, config, engine=engine, device=device)

    return round_robin(run, specs, repeats, progress)


def round_robin(run, specs, repeats: int = 3, progress: bool = True) -> list[SpeedRow]:
    """Time ``run(spec)`` (which returns an object with ``seconds`` and ``report``) for every spec after
    one warm-up of the first; speed-ups are against the first spec."""
    run(specs[0])  # warm-up: allocator, thread pool, caches
    # round-robin: repeat r of every spec runs before repeat r + 1 of any, so a machine that speeds
    # up or slows down during the benchmark biases no configuration against another
    results = {spec: [] for spec in specs}
    for r in range(repeats):
        for spec in specs:
            results[spec].append(run(spec))
            if progress:
                print(f"  repeat {r + 1}/{repeats} {spec}: {results[spec][-1].seconds:.3f} s", flush=True)
    rows = []
    for spec, runs in results.items():
        report = runs[-1].report
        rows.append(SpeedRow(spec, statistics.median(x.seconds for x in runs), [x.seconds for x in runs],
                             report.get("compute_fraction", 1.0), report.get("macs_ratio", 1.0),
                             statistics.median(x.report.get("corrector_seconds", 0.0) for x in runs)))
    for row in rows:
        row.speedup = rows[0].seconds / row.seconds
    return rows


def speed_table(rows: list[SpeedRow]) -> str:
    head = (f"{'policy':<22}{'seconds':>9}{'compute':>9}{'MACs':>7}{'speed-up':>10}{'MACs bound':>12}{'share':>7}"
            f"{'correctors':>12}")
    lines = [head]
    for r in rows:
        lines.append(f"{r.spec:<22}{r.seconds:>9.3f}{r.compute_fraction:>9.3f}{r.macs_ratio:>7.3f}"
                     f"{r.speedup:>9.2f}x{r.bound:>11.2f}x{r.speedup / r.bound:>7.0%}"
                     f"{r.corrector_seconds / r.seconds:>12.2%}")
    return "\n".join(lines)
