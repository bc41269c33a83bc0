"""Latency benchmark: measured wall-clock speed-up of cache policies against the MACs bound.

Every policy runs the same sampling job in one process, after one untimed warm-up; each is timed
``repeats`` times, the configurations taking turns, and the median kept with its min-max. A
speed-up is the median over repeats of the paired ratio (reference's repeat r / this spec's repeat
r), so a machine that drifts moves both sides of each ratio alike; a median above the MACs bound or
a single repeat comes with a warning, never alone. The table puts the
measured speed-up beside the bound the engine's MACs counters allow (1 / macs_ratio), their ratio
(the share of the bound realised), and the share of the wall-clock spent inside the correctors
(EOC, GOC), timed in the engine around their calls: the in-process latency overhead of a
corrector, free of run-to-run noise.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..engine import CacheEngine
from ..models.dit import build_dit
from ..models.loading import LoadedModel
from ..sampling.generate import SampleConfig, generate
from .compare import parse_cache

BARE = "bare"  # no engine: the cost of the engine itself is "none" against this
ABOVE_BOUND = 1.02  # a median speed-up more than 2% above 1 / macs_ratio cannot be real: warn
DEFAULT_SPECS = (BARE, "none", "rule:preset=rm-25", "rule:preset=rm-50", "fora:interval=2", "fora:interval=3")


def random_dit(name: str = "DiT-XL/2", seed: int = 0, **overrides) -> LoadedModel:
    """An official-size DiT with random weights (no VAE: latents are returned as they are).

    Speed does not depend on the weights' values, so this times DiT-XL/2 exactly where its
    checkpoint cannot be downloaded. I randomise the zero-initialised adaLN and output layers too,
    so the gates are not all zero and every sub-layer's output is a realistic tensor.
    """
    torch.manual_seed(seed)
    module = build_dit(name, **overrides).eval()  # overrides: e.g. depth=4 for a shorter stack of XL blocks
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
    speedup: float = 1.0  # median over repeats of the paired ratio reference_r / this_r
    speedup_all: list = field(default_factory=list)  # the paired ratio of every repeat

    @property
    def bound(self) -> float:
        return 1.0 / self.macs_ratio

    @property
    def warning(self) -> Optional[str]:
        """Why this figure should not be quoted as it is, or None."""
        if len(self.seconds_all) < 2:
            return f"{self.spec}: one repeat, so no spread: time it with --repeats 3 or more"
        if self.speedup > self.bound * ABOVE_BOUND:
            return (f"{self.spec}: measured speed-up {self.speedup:.2f}x is above its MACs bound {self.bound:.2f}x "
                    f"(spread {min(self.speedup_all):.2f}-{max(self.speedup_all):.2f}x): the machine's speed changed "
                    "during the benchmark; rerun on a quiet machine or with more --repeats")
        return None

    def as_dict(self) -> dict:
        return {"spec": self.spec, "seconds": self.seconds, "seconds_all": self.seconds_all,
                "repeats": len(self.seconds_all), "compute_fraction": self.compute_fraction,
                "macs_ratio": self.macs_ratio, "speedup": self.speedup, "speedup_all": self.speedup_all,
                "speedup_min": min(self.speedup_all), "speedup_max": max(self.speedup_all),
                "macs_bound": self.bound, "share_of_bound": self.speedup / self.bound,
                "corrector_seconds": self.corrector_seconds, "corrector_share": self.corrector_seconds / self.seconds,
                "warning": self.warning}


def time_policies(loaded, config: SampleConfig, specs=DEFAULT_SPECS, repeats: int = 3, device: str = "cpu",
                  progress: bool = True) -> list[SpeedRow]:
    """Median wall-clock of ``generate`` per spec; the first spec is the reference for speed-ups.

    The spec "bare" times the model without any engine, so "none" against it is the engine's cost."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    def run(spec):
        if spec == BARE:  # the model with no engine installed at all
            return generate(loaded, config, device=device)
        policy, correctors = parse_cache(spec)
        with CacheEngine(loaded.module, policy, correctors) as engine:
            return generate(loaded, config, engine=engine, device=device)

    return round_robin(run, specs, repeats, progress)


def time_engine_variants(loaded, config: SampleConfig, specs: list, variants: dict, repeats: int = 3,
                         progress: bool = False) -> list[SpeedRow]:
    """Every spec after the first under each engine setting of ``variants`` ({name: {CacheEngine
    attribute: value}}), interleaved, as rows "SPEC|name"; the first spec runs once, as the reference.
    For A/B timings of one engine option (``step_ahead``, ``skip_inputs``) in the same process."""
    def run(name):
        spec, _, variant = name.partition("|")
        policy, correctors = parse_cache(spec)
        with CacheEngine(loaded.module, policy, correctors) as engine:
            for attr, value in variants.get(variant, {}).items():
                setattr(engine, attr, value)
            return generate(loaded, config, engine=engine)

    names = [specs[0]] + [f"{spec}|{variant}" for spec in specs[1:] for variant in variants]
    return round_robin(run, names, repeats, progress)


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
        row.speedup_all = [a / b for a, b in zip(rows[0].seconds_all, row.seconds_all)]  # paired by repeat
        row.speedup = statistics.median(row.speedup_all)
    return rows


def speed_table(rows: list[SpeedRow]) -> str:
    """Median seconds and speed-up with their min-max over the repeats, the MACs bound, and warnings."""
    head = (f"{'policy':<22}{'seconds (min-max)':>22}{'compute':>9}{'MACs':>7}{'speed-up (min-max)':>22}"
            f"{'MACs bound':>12}{'share':>7}{'correctors':>12}")
    lines = [head]
    for r in rows:
        secs = f"{r.seconds:.3f} ({min(r.seconds_all):.3f}-{max(r.seconds_all):.3f})"
        speed = f"{r.speedup:.2f}x ({min(r.speedup_all):.2f}-{max(r.speedup_all):.2f})"
        lines.append(f"{r.spec:<22}{secs:>22}{r.compute_fraction:>9.3f}{r.macs_ratio:>7.3f}{speed:>22}"
                     f"{r.bound:>11.2f}x{r.speedup / r.bound:>7.0%}{r.corrector_seconds / r.seconds:>12.2%}")
    lines.append(f"median of {len(rows[0].seconds_all)} interleaved repeats in one process")
    lines += [f"warning: {r.warning}" for r in rows if r.warning]
    return "\n".join(lines)
