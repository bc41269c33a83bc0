"""Compare cache configurations from identical noise and labels: quality and speed side by side.

Every comparison first samples the uncached baseline, then each cache spec, in one process with
the same SampleConfig, so the fidelity figures (PSNR, SSIM, max abs error) compare the same
trajectories; the speed-up is measured as ``ditcache bench`` measures it (interleaved repeats in
this process, median with min-max), never from the sampling runs, which may span processes. The MACs ratio from the engine's
counters is always reported beside it (design.md §6: never call a MACs ratio a speed-up).

With ``--fid`` every row also gets FID with a 95% bootstrap interval and, because all rows come
from the same noise and labels index by index, the FID *difference* to the uncached row with a
paired bootstrap interval (the same resampled indices for both rows; ``metrics/bootstrap.py``);
a difference whose interval contains 0 is marked not significant.

Each configuration's samples and quality figures are written to ``out/<slug>/`` atomically as soon
as they exist; a rerun with the same sampling settings reuses the samples (and the metrics, when
their settings match too), so an interrupted comparison resumes and ``--fid`` can be added
afterwards. ``out`` is claimed by ``ditcache.outdir`` with the sampling settings: other sampling
settings are refused unless ``overwrite``.
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
from ..metrics.bootstrap import REPLICATES
from ..metrics.fidelity import fidelity
from ..outdir import claim
from ..policies.base import POLICIES
from ..atomic import write_atomic
from ..policies.schedule import write_json_atomic
from ..registry import parse_spec
from ..sampling.generate import SampleConfig, generate
from ..strict_json import dumps

BASELINE = "none"
SAMPLING_KEYS = ("spec", "settings", "sample_seconds", "seconds", "compute_fraction", "macs_ratio",
                 "cache_peak_bytes", "labels")
HIDDEN = ("labels", "settings", "metrics")  # kept in row.json, left out of compare.json and --json


def parse_cache(spec: str):
    """'policy[:k=v,...][+corrector[:k=v,...]]...' -> (policy, [correctors])."""
    parts = [p.strip() for p in spec.split("+")]
    if not parts[0]:
        raise ValueError(f"cache spec {spec!r} has no policy")
    policy = parse_spec(POLICIES, parts[0])
    return policy, getattr(policy, "tuned_correctors", []) + [parse_spec(CORRECTORS, p) for p in parts[1:]]


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
    repeats: int = 3  # interleaved timing repeats of one batch per configuration; 0: no speed-up
    overwrite: bool = False  # replace a comparison made with other settings
    bootstrap: int = REPLICATES  # replicates for the FID intervals; 0 turns them off

    def metric_settings(self) -> dict:
        """What the saved metrics of a row depend on besides its samples."""
        if not self.fid:
            return {"fid": False}
        from ..metrics.inception import extractor_key

        return {"fid": True, "reference": self.reference, "reference_limit": self.reference_limit,
                "inception": extractor_key()}


def quality(images: np.ndarray, labels: np.ndarray, base: np.ndarray, options: CompareOptions, is_mnist: bool,
            folder: Path) -> dict:
    """Fidelity to the uncached images, class accuracy and (optionally) data metrics; with FID the
    pool features go to ``folder/features.npz`` for the paired intervals."""
    row = {f"{k}_vs_uncached": v for k, v in fidelity(images, base).items()}
    if options.classifier and is_mnist:
        from ..metrics.classifier import accuracy

        row["class_accuracy"] = accuracy(images, labels)
    if options.fid:
        from ..metrics.evaluate import evaluate_with_features
        from ..metrics.inception import InceptionExtractor

        m, feats, _ = evaluate_with_features(images, labels, reference=options.reference,
                                             extractor=InceptionExtractor(device=options.device),
                                             reference_limit=options.reference_limit, progress=options.progress,
                                             bootstrap=0)  # intervals come later, paired across rows
        pool = feats["pool"].astype(np.float32)  # exact: the network computes in float32
        write_atomic(folder / "features.npz", lambda tmp: np.savez(tmp, pool=pool))
        row.update({k: m.get(k) for k in ("fid", "sfid", "precision", "recall", "num_reference")})
    return row


def add_intervals(rows: list[dict], out: Path, options: CompareOptions) -> None:
    """FID intervals for every row and paired intervals of each row's FID minus the first (uncached)
    row's, from the features saved beside each row's samples (bootstrap.py)."""
    from ..metrics.bootstrap import FIDBootstrap, interval_columns
    from ..metrics.inception import InceptionExtractor
    from ..metrics.reference import get_reference

    ref = get_reference(options.reference, InceptionExtractor(device=options.device), limit=options.reference_limit)
    boot = FIDBootstrap(ref.mu, ref.sigma, options.bootstrap)
    base = None
    for row in rows:
        pool = np.load(out / slug(row["spec"]) / "features.npz")["pool"].astype(np.float64)  # (N, 2048)
        reps = boot.replicates_of(pool)
        row.update(interval_columns(row["fid"], reps, base))
        base = base or (row["fid"], reps)


def _sampling_settings(row: dict) -> dict:
    """A saved row's sampling settings; rows written before metrics were kept apart also hold the
    FID options there, which say nothing about the samples."""
    return {k: v for k, v in row.get("settings", {}).items() if k not in ("fid", "reference", "reference_limit")}


class ModelSampler:
    """What a comparison needs from its sampler, for our class-conditional sampler (``generate``).

    ``pipelines.sampling.PipelineSampler`` is the same for a diffusers pipeline's own call."""

    def __init__(self, loaded, config: SampleConfig, device: str = "cpu"):
        self.loaded, self.config, self.device = loaded, config, device
        self.settings = {"model": loaded.fingerprint, **dataclasses.asdict(config)}
        self.num_samples = config.num_samples
        self.is_mnist = loaded.in_channels == 1 and loaded.image_size == 28 and loaded.num_classes == 10

    def run(self, spec: str):
        """All samples with one configuration: an object with images, labels, seconds and report."""
        policy, correctors = parse_cache(spec)
        with CacheEngine(self.loaded.module, policy, correctors) as engine:
            return generate(self.loaded, self.config, engine=engine, device=self.device)

    def time(self, specs: list[str], repeats: int):
        """SpeedRows of every spec on one batch, interleaved (``bench.speed``)."""
        from .speed import time_policies

        timing = dataclasses.replace(self.config, num_samples=min(self.config.batch_size, self.config.num_samples))
        return time_policies(self.loaded, timing, specs, repeats, self.device, progress=False)


def compare(loaded, config: SampleConfig, specs: Sequence[str], out: str | Path,
            options: CompareOptions = CompareOptions()) -> list[dict]:
    """``compare_runs`` with our class-conditional sampler."""
    return compare_runs(ModelSampler(loaded, config, options.device), specs, out, options)


def compare_runs(sampler, specs: Sequence[str], out: str | Path, options: CompareOptions = CompareOptions()) -> list[dict]:
    """One row per spec (the uncached baseline first); resumes from ``out``.

    Quality figures are kept in ``out/<slug>/row.json`` and reused by a rerun with the same settings.
    Speed is never reused: with ``options.repeats`` > 0 every configuration is timed again in this
    process on one batch, in interleaved repeats (``bench.speed``), so no speed-up divides times from
    different processes; with 0 no speed-up is reported.
    """
    for spec in specs:
        parse_cache(spec)  # every spec is checked before any sampling starts
    if options.repeats < 0:
        raise ValueError(f"--repeats must be >= 0, got {options.repeats}")
    out = Path(out)
    settings = sampler.settings
    metrics = options.metric_settings()
    specs = [BASELINE] + [s for s in specs if s != BASELINE]
    rows, base_images = [], None
    with claim(out, settings, options.overwrite, "a comparison"):
        for spec in specs:
            row, images = _quality_row(sampler, spec, out / slug(spec), settings, metrics, base_images, options)
            base_images = images if base_images is None else base_images
            row["macs_speedup_bound"] = 1.0 / row["macs_ratio"]
            rows.append(row)
        if options.fid and options.bootstrap:
            add_intervals(rows, out, options)
        _add_speed(rows, sampler, specs, options)
        write_json_atomic(out / "compare.json", [{k: v for k, v in r.items() if k not in HIDDEN} for r in rows])
    return rows


def _quality_row(sampler, spec, folder, settings, metrics, base_images, options):
    """(row, images) of one configuration. Samples are read from ``folder`` when made with these
    sampling settings, their metrics measured again when made with other metric settings; else sampled."""
    saved = folder / "row.json"
    row = json.loads(saved.read_text()) if saved.is_file() else None
    if row is not None and _sampling_settings(row) == json.loads(dumps(settings)):
        with np.load(folder / "samples.npz") as data:
            images = data["arr_0"]
        fresh = row.get("metrics") == json.loads(dumps(metrics)) and (not options.fid or (folder / "features.npz").is_file())
        if not fresh:  # same samples, other metrics: measure them again
            row = {k: v for k, v in row.items() if k in SAMPLING_KEYS} | {"settings": settings}
            base = images if base_images is None else base_images
            row.update(quality(images, np.asarray(row["labels"]), base, options, sampler.is_mnist, folder),
                       metrics=metrics)
            write_json_atomic(saved, row)
        if options.progress:
            print(f"{spec}: reused samples{' and metrics' if fresh else ''} from {folder}")
        return row, images
    if options.progress:
        print(f"{spec}: sampling {sampler.num_samples} images")
    result = sampler.run(spec)
    save_npz(folder / "samples.npz", result.images, result.labels)
    row = {"spec": spec, "settings": settings, "sample_seconds": result.seconds,
           "compute_fraction": result.report["compute_fraction"], "macs_ratio": result.report["macs_ratio"],
           "cache_peak_bytes": result.report.get("cache_peak_bytes", 0), "labels": result.labels.tolist()}
    row.update(quality(result.images, result.labels, result.images if base_images is None else base_images,
                       options, sampler.is_mnist, folder), metrics=metrics)
    write_json_atomic(saved, row)
    return row, result.images


def _add_speed(rows: list[dict], sampler, specs: list[str], options: CompareOptions) -> None:
    """Median speed-up over interleaved repeats of one batch, with min-max and any warning; None without repeats."""
    for row in rows:
        row.update(speedup=None, speedup_min=None, speedup_max=None, speed_repeats=options.repeats, warning=None)
    if options.repeats == 0:
        return
    if options.progress:
        print(f"timing {len(specs)} configurations on one batch, {options.repeats} interleaved repeats")
    for row, t in zip(rows, sampler.time(specs, options.repeats)):
        d = t.as_dict()
        row.update(speedup=d["speedup"], speedup_min=d["speedup_min"], speedup_max=d["speedup_max"],
                   warning=d["warning"] if options.repeats > 1 else None)


COLUMNS = [("spec", "{}"), ("compute_fraction", "{:.3f}"), ("macs_ratio", "{:.3f}"), ("speedup", "{:.2f}x"),
           ("speedup_range", "{}"),
           ("psnr_vs_uncached", "{:.2f}"), ("ssim_vs_uncached", "{:.4f}"), ("max_abs_error_vs_uncached", "{:.0f}"),
           ("class_accuracy", "{:.4f}"), ("fid", "{:.2f}"), ("fid_diff", "{:+.2f}"), ("sfid", "{:.2f}"),
           ("precision", "{:.3f}"), ("recall", "{:.3f}")]
INTERVALS = {"fid": "fid_ci", "fid_diff": "fid_diff_ci"}  # column -> prefix of its _low/_high keys


def _cell(row: dict, key: str, fmt: str) -> str:
    """One table cell; FID and its difference carry their 95% interval, n.s. when it contains 0."""
    if row.get(key) is None:
        return "-"
    text = fmt.format(row[key])
    prefix = INTERVALS.get(key)
    if prefix and row.get(f"{prefix}_low") is not None:
        text += f" [{row[f'{prefix}_low']:.2f}, {row[f'{prefix}_high']:.2f}]"
        if key == "fid_diff" and not row.get("fid_diff_significant"):
            text += " n.s."
    return text


def table(rows: list[dict]) -> str:
    """A plain-text table of the columns any row has. FID intervals are 95% bootstrap intervals;
    fid_diff is FID minus the uncached row's, paired over the shared noise."""
    rows = [{**r, "speedup_range": f"{r['speedup_min']:.2f}-{r['speedup_max']:.2f}"} if r.get("speedup_min")
            is not None else r for r in rows]
    cols = [(k, f) for k, f in COLUMNS if any(r.get(k) is not None for r in rows)]
    cells = [[k for k, _ in cols]]
    for r in rows:
        cells.append([_cell(r, k, f) for k, f in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    repeats = rows[0].get("speed_repeats") if rows else None
    lines.append(f"speed-up: median (min-max) of {repeats} interleaved repeats of one batch in this process"
                 if repeats else "speed-up not measured (--repeats 0); the MACs ratio is not a speed-up")
    lines += [f"warning: {r['warning']}" for r in rows if r.get("warning")]
    return "\n".join(lines)


def plot(rows: list[dict], path: str | Path, metric: Optional[str] = None) -> str:
    """Quality versus measured speed-up, one labelled point per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric or next(m for m in ("fid", "class_accuracy", "psnr_vs_uncached") if rows[0].get(m) is not None)
    x_key = "speedup" if all(r.get("speedup") is not None for r in rows) else "macs_speedup_bound"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        y = r.get(metric)
        if y is None or (isinstance(y, float) and not np.isfinite(y)):
            continue
        ax.scatter(r[x_key], y)
        ax.annotate(r["spec"], (r[x_key], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("measured speed-up over uncached (median of interleaved repeats)" if x_key == "speedup"
                  else "MACs bound 1 / macs_ratio (speed not measured)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return metric
