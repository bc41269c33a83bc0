"""Compare cache configurations from identical noise and labels: quality and speed side by side.

Every comparison first samples the uncached baseline, then each cache spec, in one process with
the same SampleConfig, so the fidelity figures (PSNR, SSIM, max abs error) compare the same
trajectories and the speed-up is a same-process wall-clock ratio. The MACs ratio from the engine's
counters is always reported beside it (design.md §6: never call a MACs ratio a speed-up).

Each configuration's samples and figures are written to ``out/<slug>/`` atomically as soon as they
exist; a rerun with the same settings reuses them, so an interrupted comparison resumes.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..correctors.base import CORRECTORS
from ..engine import CacheEngine
from ..images import save_npz
from ..metrics.fidelity import fidelity
from ..policies.base import POLICIES
from ..policies.schedule import write_json_atomic
from ..registry import parse_spec
from ..sampling.generate import SampleConfig, generate

BASELINE = "none"


def parse_cache(spec: str):
    """'policy[:k=v,...][+corrector[:k=v,...]]...' -> (policy, [correctors])."""
    parts = [p.strip() for p in spec.split("+")]
    if not parts[0]:
        raise ValueError(f"cache spec {spec!r} has no policy")
    return parse_spec(POLICIES, parts[0]), [parse_spec(CORRECTORS, p) for p in parts[1:]]


def slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", spec)[:120]


@dataclass
class CompareOptions:
    fid: bool = False  # Inception FID/sFID/precision/recall (slow on a CPU)
    reference: str = "mnist"
    reference_limit: Optional[int] = None  # use the first N reference images
    classifier: bool = True  # class accuracy with the shipped digit classifier (MNIST models)
    device: str = "cpu"
    progress: bool = True


def run_config(loaded, config: SampleConfig, spec: str, options: CompareOptions):
    policy, correctors = parse_cache(spec)
    with CacheEngine(loaded.module, policy, correctors) as engine:
        result = generate(loaded, config, engine=engine, device=options.device)
    return result


def warm_up(loaded, config: SampleConfig, device: str) -> None:
    """One short untimed run at the real batch size (thread pool, allocator, caches), so that the
    first timed configuration, the baseline every speed-up divides by, pays no start-up cost."""
    n = min(config.batch_size, config.num_samples)
    generate(loaded, dataclasses.replace(config, num_samples=n, steps=min(2, config.steps)), device=device)


def quality(images: np.ndarray, labels: np.ndarray, base: np.ndarray, options: CompareOptions, is_mnist: bool) -> dict:
    """Fidelity to the uncached images, class accuracy and (optionally) data metrics."""
    row = {f"{k}_vs_uncached": v for k, v in fidelity(images, base).items()}
    if options.classifier and is_mnist:
        from ..metrics.classifier import accuracy

        row["class_accuracy"] = accuracy(images, labels)
    if options.fid:
        from ..metrics.evaluate import evaluate

        m = evaluate(images, labels, reference=options.reference, reference_limit=options.reference_limit,
                     progress=options.progress)
        row.update({k: m.get(k) for k in ("fid", "sfid", "precision", "recall", "num_reference")})
    return row


def compare(loaded, config: SampleConfig, specs: Sequence[str], out: str | Path,
            options: CompareOptions = CompareOptions()) -> list[dict]:
    """One row per spec (the uncached baseline first); resumes from ``out``."""
    for spec in specs:
        parse_cache(spec)  # every spec is checked before any sampling starts
    out = Path(out)
    settings = {"model": loaded.fingerprint, **dataclasses.asdict(config),
                "fid": options.fid, "reference": options.reference, "reference_limit": options.reference_limit}
    is_mnist = loaded.in_channels == 1 and loaded.image_size == 28 and loaded.num_classes == 10
    rows, base_images, base_seconds = [], None, None
    warmed = False
    for spec in [BASELINE] + [s for s in specs if s != BASELINE]:
        folder = out / slug(spec)
        saved = folder / "row.json"
        if saved.is_file() and json.loads(saved.read_text()).get("settings") == settings:
            row = json.loads(saved.read_text())
            images = np.load(folder / "samples.npz")["arr_0"]
            if options.progress:
                print(f"{spec}: reused {saved}")
        else:
            if not warmed:
                warm_up(loaded, config, options.device)
                warmed = True
            if options.progress:
                print(f"{spec}: sampling {config.num_samples} images")
            result = run_config(loaded, config, spec, options)
            images = result.images
            save_npz(folder / "samples.npz", images, result.labels)
            row = {"spec": spec, "settings": settings, "seconds": result.seconds,
                   "compute_fraction": result.report["compute_fraction"],
                   "macs_ratio": result.report["macs_ratio"],
                   "cache_peak_bytes": result.report.get("cache_peak_bytes", 0),
                   "labels": result.labels.tolist()}
            row.update(quality(images, result.labels, images if base_images is None else base_images, options, is_mnist))
            write_json_atomic(saved, row)
        if base_images is None:
            base_images, base_seconds = images, row["seconds"]
        row["speedup"] = base_seconds / row["seconds"]
        row["macs_speedup_bound"] = 1.0 / row["macs_ratio"]
        rows.append(row)
    write_json_atomic(out / "compare.json", [{k: v for k, v in r.items() if k not in ("labels", "settings")} for r in rows])
    return rows


COLUMNS = [("spec", "{}"), ("compute_fraction", "{:.3f}"), ("macs_ratio", "{:.3f}"), ("speedup", "{:.2f}x"),
           ("psnr_vs_uncached", "{:.2f}"), ("ssim_vs_uncached", "{:.4f}"), ("max_abs_error_vs_uncached", "{:.0f}"),
           ("class_accuracy", "{:.4f}"), ("fid", "{:.3f}"), ("sfid", "{:.3f}"), ("precision", "{:.3f}"),
           ("recall", "{:.3f}")]


def table(rows: list[dict]) -> str:
    """A plain-text table of the columns any row has."""
    cols = [(k, f) for k, f in COLUMNS if any(r.get(k) is not None for r in rows)]
    cells = [[k for k, _ in cols]]
    for r in rows:
        cells.append([f.format(r[k]) if r.get(k) is not None else "-" for k, f in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells)


def plot(rows: list[dict], path: str | Path, metric: Optional[str] = None) -> str:
    """Quality versus measured speed-up, one labelled point per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric or next(m for m in ("fid", "class_accuracy", "psnr_vs_uncached") if rows[0].get(m) is not None)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        y = r.get(metric)
        if y is None or (isinstance(y, float) and not np.isfinite(y)):
            continue
        ax.scatter(r["speedup"], y)
        ax.annotate(r["spec"], (r["speedup"], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("measured speed-up over uncached (same process)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return metric
