"""What `ditcache tune` leaves behind: held-out check, the tuned-config artifact, the Pareto front.

The artifact (kind ``tuned-config``) is keyed like every calibration artifact (model fingerprint,
sampler, steps, CFG scale, resolution); the device it was timed on is in its meta, because a speed
target measured on one device says little about another. ``--policy tuned:path=DIR`` reuses it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..bench.compare import BASELINE, CompareOptions, compare, slug
from ..calibration.artifact import Artifact, ArtifactKey, save_artifact
from ..metrics.bootstrap import paired_difference, psnr_interval
from ..metrics.fidelity import squared_error
from ..policies.schedule import write_json_atomic
from ..strict_json import dumps

TUNED_KIND = "tuned-config"
HELDOUT_KEYS = ("spec", "compute_fraction", "macs_ratio", "psnr_vs_uncached", "ssim_vs_uncached", "speedup",
                "speedup_min", "speedup_max", "fid", "fid_ci_low", "fid_ci_high", "fid_diff", "fid_diff_ci_low",
                "fid_diff_ci_high")


def heldout_rows(loaded, config, seed: int, chosen: dict, best_preset: Optional[dict], timing: dict, out: Path,
                 options, met: bool = True) -> list[dict]:
    """The chosen configuration and the best preset on held-out noise (``compare``), beside their tuning
    numbers, with PSNR intervals (``add_psnr_intervals``). ``met=False``: the target was not met, and
    ``chosen`` / ``best_preset`` are the fastest configuration and preset measured."""
    held = dataclasses.replace(config, seed=seed, num_samples=options.heldout_samples or config.num_samples)
    specs = list(dict.fromkeys([chosen["spec"]] + ([best_preset["spec"]] if best_preset else [])))
    folder = out / f"heldout-seed{seed}-n{held.num_samples}"
    rows = compare(loaded, held, specs, folder,
                   CompareOptions(fid=options.fid, reference=options.reference, reference_limit=options.reference_limit,
                                  classifier=False, device=options.device, progress=options.progress,
                                  repeats=options.repeats, bootstrap=options.bootstrap))
    tuning = {chosen["spec"]: chosen} | ({best_preset["spec"]: best_preset} if best_preset else {})
    report = []
    for row in rows[1:]:
        t = tuning[row["spec"]]
        report.append({"spec": row["spec"], "role": _role(row["spec"], chosen, best_preset, met),
                       "tuning_psnr": t["psnr_vs_uncached"], "tuning_speedup": timing.get(row["spec"], {}).get("speedup"),
                       **{f"heldout_{k}": row.get(k) for k in HELDOUT_KEYS if k != "spec"},
                       "heldout_samples": held.num_samples})
    if options.bootstrap:
        add_psnr_intervals(report, folder, options.bootstrap, paired=best_preset is not None)
    return report


def add_psnr_intervals(report: list[dict], folder: Path, replicates: int, paired: bool = True) -> None:
    """95% bootstrap intervals of held-out PSNR to uncached for every row, and (``paired``) the paired
    interval of PSNR(first row) - PSNR(last row): chosen - best preset, same noise and same resampled
    images (``metrics/bootstrap.py``); exactly 0 [0, 0] when the chosen configuration is the preset."""
    with np.load(folder / slug(BASELINE) / "samples.npz") as data:
        base = data["arr_0"]  # (N, H, W) uint8, uncached from the same held-out noise
    reps = []
    for row in report:
        with np.load(folder / slug(row["spec"]) / "samples.npz") as data:
            mse = squared_error(data["arr_0"], base)  # (N,)
        interval, r = psnr_interval(mse, row["heldout_psnr_vs_uncached"], replicates)
        row.update(heldout_psnr_ci_low=interval.low, heldout_psnr_ci_high=interval.high, psnr_bootstrap=replicates)
        reps.append((interval.value, r))
    if paired and report:
        diff = paired_difference(*reps[0], *reps[-1])
        report[0].update(heldout_psnr_diff=diff.value, heldout_psnr_diff_ci_low=diff.low,
                         heldout_psnr_diff_ci_high=diff.high, heldout_psnr_diff_vs=report[-1]["spec"],
                         heldout_psnr_diff_significant=diff.excludes_zero)


def _role(spec: str, chosen: dict, best_preset: Optional[dict], met: bool = True) -> str:
    if not met:
        return "fastest" if spec == chosen["spec"] else "fastest preset"
    if spec != chosen["spec"]:
        return "best preset"
    return "chosen=preset" if best_preset and best_preset["spec"] == spec else "chosen"


def save_tuned(loaded, config, path: Path, spec: str, result: dict) -> Path:
    """The tuned-config artifact: the configuration string, what it was tuned for, and its numbers."""
    key = ArtifactKey.for_run(loaded, config.sampler, config.steps, config.cfg_scale)
    meta = {"spec": spec, "device": result["device"], "target": result["target"],
            "tuning_samples": result["tuning_samples"], "heldout": result.get("heldout")}
    tensors = {"changes": torch.tensor(result["changes"], dtype=torch.float32)}  # the measured d_t profile
    return save_artifact(Artifact(TUNED_KIND, key, tensors, meta=json_safe(meta)), path)


def json_safe(obj):
    import json

    return json.loads(dumps(obj))


def save_front(rows: list[dict], timing: dict, chosen: Optional[dict], out: Path, options) -> str:
    """``front.json`` (every configuration tried, Pareto flag, chosen flag) and ``front.png``; returns the JSON path."""
    from .search import _target_tag, pareto

    front = pareto(rows)
    entries = [{**r, "speedup": timing.get(r["spec"], {}).get("speedup"), "pareto": r["spec"] in front,
                "chosen": chosen is not None and r["spec"] == chosen["spec"]} for r in rows]
    tag = _target_tag(options)
    write_json_atomic(out / f"front-{tag}.json", json_safe(entries))
    plot_front(entries, out / f"front-{tag}.png")
    return str(out / f"front-{tag}.json")


def short_name(spec: str) -> str:
    """A plot label: a step set by its size ("rule:steps (39 reused)+goc"), so a 50-step set's
    list does not squeeze the axes; the full specs are in the front's JSON."""
    if not spec.startswith("rule:steps="):
        return spec
    base, plus, rest = spec.partition("+")
    return f"rule:steps ({len(base.split('=', 1)[1].split('/'))} reused){plus}{rest}"


def plot_front(entries: list[dict], path: Path) -> None:
    """PSNR against measured speed-up (timed configurations) and against 1 / MACs ratio (all); chosen starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [e["psnr_vs_uncached"] for e in entries if np.isfinite(e["psnr_vs_uncached"])]
    cap = max(finite, default=0.0) + 5  # identical images (PSNR inf) are drawn here, labelled
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "speedup", "measured speed-up (median of interleaved repeats)"),
                           (axes[1], "macs", "1 / MACs ratio")):
        pts = [(e["speedup"] if key == "speedup" else 1 / e["macs_ratio"], e) for e in entries
               if (e["speedup"] is not None or key == "macs") and not np.isnan(e["psnr_vs_uncached"])]
        for x, e in pts:
            y = min(e["psnr_vs_uncached"], cap)
            style = dict(marker="*", s=160, c="red", zorder=3) if e["chosen"] else \
                dict(marker="o", s=22, c="tab:blue" if e["pareto"] else "lightgray")
            ax.scatter(x, y, **style)
            if e["chosen"] or (e["pareto"] and "steps=" not in e["spec"]):
                name = short_name(e["spec"]) + (" (identical: inf dB)" if y == cap else "")
                ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("PSNR to uncached (dB), tuning set")
        ax.grid(alpha=0.3)
    axes[0].set_title("timed candidates")
    axes[1].set_title("every configuration tried (blue: Pareto front, red star: chosen)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
