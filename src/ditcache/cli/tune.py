"""`ditcache tune`: search cache configurations for a speed, compute or quality target (tune/search.py)."""

from __future__ import annotations

import argparse
import math

from ..metrics.bootstrap import REPLICATES
from ..models.loading import load_model
from ..tune.search import TuneOptions, tune
from .common import add_model_args, add_overwrite_arg, add_sampling_args, print_json, sample_config


def add_parser(sub) -> None:
    p = sub.add_parser(
        "tune", help="find the best cache configuration for a speed-up, compute or quality target",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sample the published presets (FORA, RM-25/50/75, each with and without GOC, ToCa, DuCa) on a "
                    "tuning set from identical noise, then hill-climb over reused-step sets ranked by the uncached "
                    "trajectory's per-step feature change, score by PSNR to the uncached samples, time the best "
                    "candidates on this device (interleaved repeats; for a speed target the time model is then "
                    "refitted to those measurements and the sizes it asks for searched and timed too) and return "
                    "the best configuration meeting the "
                    "target as measured (or say that none does: exit status 1, nothing chosen). The choice and the best "
                    "preset are checked again on held-out noise (--heldout-seed): PSNR with 95% bootstrap intervals "
                    "and the paired interval of their difference. Writes OUT/tuned-<target> (use it with --policy tuned:path=...), "
                    "OUT/front-<target>.json/.png and OUT/result-<target>.json. Interrupt and rerun to resume: "
                    "every configuration is saved as it finishes.")
    add_model_args(p)
    add_sampling_args(p, num_samples=32)
    t = p.add_argument_group("target (exactly one)")
    t.add_argument("--target-speedup", type=float, default=None, help="measured speed-up over uncached, e.g. 2.0")
    t.add_argument("--target-compute", type=float, default=None, help="compute fraction of the sub-layers, e.g. 0.5")
    t.add_argument("--min-psnr", type=float, default=None,
                   help="the opposite question: the fastest configuration whose PSNR to uncached is at least this (dB)")
    s = p.add_argument_group("search")
    s.add_argument("--beam", type=int, default=4, help="step-set swaps sampled per search iteration (default: 4)")
    s.add_argument("--timed", type=int, default=3, help="best candidates timed at the end (default: 3)")
    s.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats (default: 3)")
    s.add_argument("--max-configs", type=int, default=None, help="stop after this many configurations")
    s.add_argument("--budget-minutes", type=float, default=None,
                   help="sample no new configuration after this many minutes (a resumed run may then go further)")
    s.add_argument("--no-token-presets", action="store_true", help="leave ToCa and DuCa out (slow on a CPU)")
    h = p.add_argument_group("held-out check")
    h.add_argument("--heldout-seed", type=int, default=None, help="noise seed of the held-out set (default: seed + 1000)")
    h.add_argument("--heldout-samples", type=int, default=None, help="held-out images (default: --num-samples)")
    h.add_argument("--fid", action="store_true", help="also FID with 95%% bootstrap intervals on the held-out set")
    h.add_argument("--reference", default="mnist", help="FID reference (as compare)")
    h.add_argument("--reference-limit", type=int, default=None, help="use only the first N reference images")
    h.add_argument("--bootstrap", type=int, default=REPLICATES, help=f"bootstrap replicates of the held-out PSNR (and FID) intervals; 0: none (default: {REPLICATES})")
    p.add_argument("--out", default="runs/tune", help="folder for everything the search makes (resumes)")
    add_overwrite_arg(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    options = TuneOptions(target_speedup=args.target_speedup, target_compute=args.target_compute,
                          min_psnr=args.min_psnr, heldout_seed=args.heldout_seed, heldout_samples=args.heldout_samples,
                          repeats=args.repeats, beam=args.beam, timed=args.timed, max_configs=args.max_configs,
                          budget_minutes=args.budget_minutes, token_presets=not args.no_token_presets, fid=args.fid,
                          reference=args.reference, reference_limit=args.reference_limit, bootstrap=args.bootstrap,
                          device=args.device, progress=not args.json, overwrite=args.overwrite)
    options.check()  # bad input fails before the model loads
    if args.heldout_samples is not None and args.heldout_samples < 1:
        raise ValueError(f"--heldout-samples must be at least 1, got {args.heldout_samples}")
    loaded = load_model(args.model, vae=args.vae, device=args.device, num_heads=args.num_heads)
    result = tune(loaded, sample_config(args), args.out, options)
    if args.json:
        print_json(result)
    else:
        print(summary(result))
    return 0 if result.get("chosen") else 1  # a script must not take an unmet target for an answer


def summary(result: dict) -> str:
    """The chosen configuration, its tuning and held-out numbers beside the best preset's."""
    lines = [f"target: {result['target']} on {result['device']}; {result['configs_evaluated']} configurations "
             f"sampled on {result['tuning_samples']} tuning images (seed {result['tuning_seed']})"]
    lines += [f"note: {n}" for n in result["notes"]]
    if result.get("warning"):
        lines.append(result["warning"] if result["warning"].startswith("target not met") else
                     f"warning: {result['warning']}")
    if not result.get("heldout"):
        lines.append("no configuration found")
        return "\n".join(lines)
    if result.get("chosen"):
        lines.append(f"chosen: {result['chosen']}")
    else:
        lines.append(f"nothing chosen, no artifact written; held-out check of the fastest: {result['fastest']}")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    w = max([36] + [len(r["spec"]) + 2 for r in result["heldout"]])  # long step sets keep the columns aligned
    lines.append(f"{'role':<15}{'config':<{w}}{'tune PSNR':>10}{'tune x':>8}{'held PSNR [95% CI]':>24}{'held x':>8}"
                 f"{'MACs':>7}{'held FID':>10}")
    for r in result["heldout"]:
        held = fmt(r["heldout_psnr_vs_uncached"], ".2f") + _interval(r, "heldout_psnr_ci", ".2f")
        lines.append(f"{r['role']:<15}{r['spec']:<{w}}{fmt(r['tuning_psnr'], '.2f'):>10}{fmt(r['tuning_speedup'], '.2f'):>8}"
                     f"{held:>24}{fmt(r['heldout_speedup'], '.2f'):>8}"
                     f"{fmt(r['heldout_macs_ratio'], '.3f'):>7}{fmt(r.get('heldout_fid'), '.2f'):>10}")
    first = result["heldout"][0]
    if first.get("heldout_psnr_diff") is not None:
        ci = _interval(first, "heldout_psnr_diff_ci", "+.2f")
        sig = "" if first["heldout_psnr_diff_significant"] else " n.s." if ci else \
            " (no interval: some resamples match uncached exactly)"
        lines.append(f"held-out PSNR {first['role']} - {first['heldout_psnr_diff_vs']}: "
                     f"{first['heldout_psnr_diff']:+.2f} dB{ci}{sig} (paired bootstrap over the same held-out images)")
    lines.append(f"held-out: seed {result['heldout_seed']}, {first['heldout_samples']} images; "
                 "speed-ups are medians of interleaved repeats on this device")
    if result.get("chosen"):
        lines.append(f"reuse it: --policy tuned:path={result['artifact']}  (or --cache '{result['chosen']}')")
    return "\n".join(lines)


def _interval(row: dict, prefix: str, f: str) -> str:
    low, high = row.get(f"{prefix}_low"), row.get(f"{prefix}_high")
    missing = low is None or high is None or math.isnan(low) or math.isnan(high)  # nan: no interval
    return "" if missing else f" [{low:{f}}, {high:{f}}]"
