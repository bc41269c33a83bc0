"""`ditcache tune`: the best cache configuration for a speed, compute or quality target.

What it does, in order, and why:

1. **Uncached trajectory.** One uncached batch with ``ChangeRecorder`` gives the per-step relative
   feature change d_t (``steps.py``): the steps where features barely move are the cheap ones to
   reuse. Saved as ``profile.json``.
2. **Published presets.** FORA N = 2, 3, 4, RM-25/50/75 (each also with GOC), ToCa and DuCa at their
   defaults are sampled on the tuning set (seed ``seed``) from identical noise and scored by PSNR
   to the uncached samples, as ``compare`` does (``tuning/<config>/row.json``, written atomically
   as each finishes, so an interrupted run resumes where it stopped).
3. **Requirement.** ``--target-compute c`` needs compute fraction <= c. ``--target-speedup S`` is
   turned into a MACs ratio with a two-point model of this device, time(m) = t0 (a + (1 - a) m),
   fitted by timing uncached and RM-50 in interleaved repeats (``speed_model.json``): a is the
   share of the time caching cannot remove (sampler maths, VAE, engine), so S is reachable only
   when 1/S > a. The MACs ratio fixes k, the number of reused steps.
4. **Local search over step sets.** Starting points: the proxy-greedy k-step set and every
   static preset trimmed to k steps (dropping its most expensive reuses by the proxy), all sampled.
   The corrector (none or GOC) is chosen once, on the greedy start. Then hill climbing from the best
   start: the ``beam`` swaps (one
   reused step for one computed step, same compute) of lowest proxy cost are sampled; the best is
   kept if it raises PSNR, and the search stops when an iteration does not (or at the budget).
   With ``--min-psnr`` the same climb runs for k = 1, 2, ... and stops at the first k whose best
   set falls below the floor.
5. **Measured choice.** The best configuration of each MACs level meeting the requirement (for a
   speed target: within 15% of the modelled MACs ratio), the few best of those and the best preset
   are timed with the uncached sampler in interleaved repeats (``bench``'s method); the chosen
   configuration is the best PSNR whose *measured* speed-up meets the target (``timing.json``).
   For a speed target the time model is then fitted again, to every configuration measured, and
   when it asks for a set size not yet climbed that size is climbed and its best timed as well
   (``refine``, at most REFITS rounds, within the budget): the first model rests on RM-50 alone.
   When none does, nothing is chosen and no artifact is written: the result says "target not met"
   and names the fastest configuration measured (``target_met``: false, ``fastest``).
6. **Held-out check.** The chosen configuration (or, target not met, the fastest) and the best
   preset are sampled again from other noise (``heldout_seed``) with ``compare``, so over-fitting to
   the tuning noise shows: PSNR to uncached with a 95% bootstrap interval over the held-out images,
   the paired interval of the PSNR difference chosen - best preset (``report.py``), speed, and with
   ``fid`` FID with intervals. The result is saved as a ``tuned-config`` artifact that
   ``--policy tuned:path=DIR`` reuses, with the Pareto front as JSON and a plot.

Only whole-step reuse is searched (per-block schedules and token-wise ratios are presets only):
the step set is where the measured trajectory says most, and it keeps the space small enough to
search with real samples.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..bench.compare import CompareOptions, compare, slug
from ..engine import CacheEngine
from ..outdir import claim
from ..policies.fora import fora_schedule
from ..policies.rule import rm_steps
from ..policies.schedule import write_json_atomic
from ..sampling.generate import SampleConfig, generate
from ..strict_json import dumps
from .steps import ChangeRecorder, greedy_steps, proxy_cost, steps_spec, swaps, trim

GOC = "+goc"
PRESET_SPECS = ("fora:interval=2", "fora:interval=3", "fora:interval=4", "rule:preset=rm-25", "rule:preset=rm-50",
                "rule:preset=rm-75")
TOKEN_SPECS = ("toca", "duca")
SPEED_PROBE = "rule:preset=rm-50"
HELDOUT_OFFSET = 1000  # held-out noise: seed + 1000 unless given
SPEED_MARGIN = 0.15  # configurations up to 15% above the modelled MACs ratio are timed too
REFITS = 2  # speed targets: rounds of refitting the time model to the measured candidates


class BudgetSpent(Exception):
    """The configuration or time budget is used up: the search keeps what it has."""


@dataclass
class TuneOptions:
    target_speedup: Optional[float] = None
    target_compute: Optional[float] = None
    min_psnr: Optional[float] = None  # the opposite question: fastest with PSNR to uncached >= this
    heldout_seed: Optional[int] = None  # default: seed + HELDOUT_OFFSET
    heldout_samples: Optional[int] = None  # default: the tuning sample count
    repeats: int = 3  # interleaved timing repeats
    beam: int = 4  # swaps sampled per search iteration
    timed: int = 3  # best candidates timed at the end
    max_configs: Optional[int] = None
    budget_minutes: Optional[float] = None
    token_presets: bool = True  # also try ToCa and DuCa
    fid: bool = False
    reference: str = "mnist"
    reference_limit: Optional[int] = None
    bootstrap: int = 1000
    device: str = "cpu"
    progress: bool = True
    overwrite: bool = False

    def check(self) -> None:
        given = [x is not None for x in (self.target_speedup, self.target_compute, self.min_psnr)]
        if sum(given) != 1:
            raise ValueError("give exactly one of --target-speedup, --target-compute, --min-psnr")
        if self.target_speedup is not None and not self.target_speedup > 1:
            raise ValueError(f"--target-speedup must be above 1, got {self.target_speedup}")
        if self.target_compute is not None and not 0 < self.target_compute < 1:
            raise ValueError(f"--target-compute must be between 0 and 1, got {self.target_compute}")
        if self.repeats < 1 and self.target_speedup is not None:
            raise ValueError("--target-speedup needs --repeats of at least 1 (speed is measured)")
        for name in ("beam", "timed"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.max_configs is not None and self.max_configs < 1:
            raise ValueError(f"--max-configs must be at least 1, got {self.max_configs}")
        if self.budget_minutes is not None and not self.budget_minutes > 0:
            raise ValueError(f"--budget-minutes must be positive, got {self.budget_minutes}")

    def target(self) -> dict:
        return {k: getattr(self, k) for k in ("target_speedup", "target_compute", "min_psnr") if getattr(self, k) is not None}


class Evaluator:
    """Samples one configuration on the tuning set (through ``compare``, so rows resume) and counts the budget."""

    def __init__(self, loaded, config: SampleConfig, folder: Path, options: TuneOptions):
        self.loaded, self.config, self.folder, self.options = loaded, config, folder, options
        self.rows: dict[str, dict] = {}
        self.start = time.monotonic()

    def __call__(self, spec: str) -> dict:
        if spec in self.rows:
            return self.rows[spec]
        o = self.options
        if o.max_configs is not None and len(self.rows) >= o.max_configs:
            raise BudgetSpent(f"--max-configs {o.max_configs} reached")
        saved = (self.folder / slug(spec) / "row.json").is_file()
        if not saved and o.budget_minutes is not None and time.monotonic() - self.start > 60 * o.budget_minutes:
            raise BudgetSpent(f"--budget-minutes {o.budget_minutes:g} spent")
        row = compare(self.loaded, self.config, [spec], self.folder,
                      CompareOptions(classifier=False, device=o.device, progress=False, repeats=0))[-1]
        row = {k: row[k] for k in ("spec", "compute_fraction", "macs_ratio", "psnr_vs_uncached", "ssim_vs_uncached")}
        if row["psnr_vs_uncached"] is None:  # identical images: inf, which a saved row holds as null
            row["psnr_vs_uncached"] = math.inf
        self.rows[spec] = row
        if o.progress:
            print(f"[{len(self.rows)}] {spec}: PSNR {row['psnr_vs_uncached']:.2f} dB, compute "
                  f"{row['compute_fraction']:.3f}, MACs {row['macs_ratio']:.3f}{' (resumed)' if saved else ''}",
                  flush=True)
        return row


def preset_steps(spec: str, num_steps: int) -> Optional[tuple[int, ...]]:
    """The reused steps of a FORA or RM preset spec (without corrector), None for other specs."""
    name, _, value = spec.partition(":")
    if name == "fora":
        cached = fora_schedule(num_steps, 1, int(value.split("=")[1]), 2).cached[:, 0, 0]
        return tuple(int(t) for t in cached.nonzero()[0])
    if name == "rule" and value.startswith("preset="):
        return tuple(rm_steps(value.split("=")[1], num_steps))
    return None


def _profile(loaded, config: SampleConfig, out: Path, device: str) -> list[float]:
    """d_t of the uncached trajectory on the first tuning batch (cached in ``profile.json``)."""
    path = out / "profile.json"
    if path.is_file():
        return json.loads(path.read_text())["changes"]
    recorder = ChangeRecorder()
    batch = dataclasses.replace(config, num_samples=min(config.batch_size, config.num_samples))
    with CacheEngine(loaded.module, recorder, []) as engine:
        generate(loaded, batch, engine=engine, device=device)
    changes = recorder.changes(config.steps)
    write_json_atomic(path, {"changes": changes, "samples": batch.num_samples})
    return changes


def _timing(loaded, config: SampleConfig, specs: list[str], out: Path, name: str, options: TuneOptions) -> dict:
    """{spec: timing dict} from ``bench``'s interleaved repeats, reused from ``out/name`` for the same specs."""
    path = out / name
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["specs"] == specs and saved["repeats"] == options.repeats:
            return saved["rows"]
    from ..bench.speed import time_policies

    batch = dataclasses.replace(config, num_samples=min(config.batch_size, config.num_samples))
    if options.progress:
        print(f"timing {len(specs)} configurations, {options.repeats} interleaved repeats of one batch of "
              f"{batch.num_samples}", flush=True)
    rows = {s: r.as_dict() for s, r in zip(specs, time_policies(loaded, batch, specs, options.repeats, options.device,
                                                                   progress=False))}
    write_json_atomic(path, {"specs": specs, "repeats": options.repeats, "rows": rows})
    return rows


def required_macs(loaded, config, out: Path, options: TuneOptions) -> tuple[float, Optional[float]]:
    """(largest MACs ratio that meets the target, fixed share a of the time model or None)."""
    if options.target_compute is not None:
        return options.target_compute, None
    if options.target_speedup is None:
        return 1.0, None
    t = _timing(loaded, config, ["none", SPEED_PROBE], out, "speed_model.json", options)
    probe = t[SPEED_PROBE]
    # time ratio 1/speedup = a + (1 - a) m at m = the probe's MACs ratio
    a = (1 / probe_speedup(t["none"], probe) - probe["macs_ratio"]) / (1 - probe["macs_ratio"])
    a = min(max(a, 0.0), 0.99)
    need = (1 / options.target_speedup - a) / (1 - a)
    if need <= 0:
        raise ValueError(f"a {options.target_speedup:g}x speed-up is out of reach on this device: {a:.0%} of the "
                         f"sampling time is not in the cached sub-layers, so at most {1 / a:.2f}x" if a > 0 else
                         f"a {options.target_speedup:g}x speed-up is out of reach on this device")
    return need, a


def probe_speedup(base: dict, probe: dict) -> float:
    """The probe's speed-up for the time model: the larger of the median paired ratio and the ratio of
    the fastest repeats. On a machine other jobs are using, a repeat is only ever slowed down, and a
    slowdown that hits one run of a pair (minutes long at 50 steps) can sink the median: under load
    average ~11, RM-50 measured paired ratios 0.93-2.13x, median 1.18x, while the fastest repeats
    gave 1.44x. The model only says which MACs level to search, and the measurement at the end
    decides, so an optimistic model costs a few wasted samples, while a pessimistic one refuses a
    reachable target outright."""
    fastest_ratio = min(base.get("seconds_all") or [0.0]) / min(probe.get("seconds_all") or [math.inf])
    return max(probe["speedup"], fastest_ratio)


def climb(evaluate, start: tuple[int, ...], suffix: str, changes: list[float], beam: int) -> dict:
    """Hill climbing over same-size step sets by proxy-ranked swaps; stops when an iteration does not improve."""
    best = evaluate(steps_spec(start, suffix))
    while True:
        current = _steps_of(best["spec"])
        tried = [evaluate(steps_spec(s, suffix)) for s in swaps(current, changes, beam)]
        better = max(tried, key=lambda r: r["psnr_vs_uncached"], default=None)
        if better is None or not better["psnr_vs_uncached"] > best["psnr_vs_uncached"] + 1e-9:
            return best
        best = better


def _steps_of(spec: str) -> tuple[int, ...]:
    body = spec.split("+")[0].split("steps=")[1]
    return tuple(int(t) for t in body.split("/") if t)


@dataclass
class Searched:
    """What the step-set search did: the set sizes it climbed and the corrector it chose for them."""

    sizes: set = dataclasses.field(default_factory=set)
    suffix: str = ""


def reused_steps(need_macs: float, num_steps: int) -> int:
    """Reused steps k whose MACs ratio, about (S - k) / S, is at most ``need_macs``."""
    return min(num_steps - 1, max(1, math.ceil((1 - need_macs) * num_steps - 1e-9)))


def search(evaluate, num_steps: int, changes: list[float], need_macs: float, options: TuneOptions,
           searched: Optional[Searched] = None) -> list[str]:
    """Run steps 2 and 4 of the module docstring (into ``searched``); returns the notes of anything cut short."""
    notes = []
    searched = searched if searched is not None else Searched()
    try:
        presets = [s + c for s in PRESET_SPECS for c in ("", GOC)]
        presets += list(TOKEN_SPECS) if options.token_presets else []
        for spec in presets:
            evaluate(spec)
        if options.min_psnr is not None:
            _climb_down(evaluate, num_steps, changes, options)
            return notes
        k = reused_steps(need_macs, num_steps)
        start = greedy_steps(k, changes)
        plain, goc = evaluate(steps_spec(start)), evaluate(steps_spec(start, GOC))
        suffix = searched.suffix = GOC if goc["psnr_vs_uncached"] > plain["psnr_vs_uncached"] else ""
        # a speed target's k comes from a timing model, so the sizes either side are searched too and
        # the measurement at the end decides between them
        sizes = [k] if options.target_speedup is None else [k, k - 1, k + 1]
        for size in (n for n in sizes if 1 <= n < num_steps):
            searched.sizes.add(size)
            _climb_size(evaluate, size, num_steps, changes, suffix, options)
    except BudgetSpent as err:
        notes.append(f"search stopped early: {err}")
    return notes


def fitted_fixed_share(rows: list[dict], timing: dict) -> Optional[float]:
    """The least-squares a of 1 / speed-up = a + (1 - a) m over every timed configuration (m: its MACs
    ratio), or None without one below m = 1. The probe's a rests on one configuration; this one on
    all the candidates measured, whose sizes are the ones the target needs."""
    points = [(r["macs_ratio"], 1 / timing[r["spec"]]["speedup"]) for r in rows
              if r["spec"] in timing and r["macs_ratio"] < 1 and timing[r["spec"]]["speedup"] > 0]
    denominator = sum((1 - m) ** 2 for m, _ in points)
    if not points or denominator == 0:
        return None
    return min(max(sum((t - m) * (1 - m) for m, t in points) / denominator, 0.0), 0.99)


def refine(evaluate, loaded, config: SampleConfig, out: Path, options: TuneOptions, timing: dict,
           searched: Searched, changes: list[float], tag: str) -> tuple[dict, list[str]]:
    """Speed targets: refit the time model to the measured candidates; when it asks for a set size the
    search has not climbed, climb it, time its best and repeat (at most REFITS rounds). The probe's
    model is fitted on RM-50 alone, and a share off by a few percent moves the size the target
    needs by a step or two (DDIM-50 here: the probe asked for 30 reused steps; the sets of 30
    measured 1.95x and FORA-3, with 31, 2.04x)."""
    notes = []
    for round_ in range(1, REFITS + 1):
        a = fitted_fixed_share(list(evaluate.rows.values()), timing)
        if a is None:
            break
        need = (1 / options.target_speedup - a) / (1 - a)
        if need <= 0:
            break
        note = (f"refit {round_}: the {len(timing) - 1} measured configurations give a fixed time share of {a:.1%}, "
                f"so MACs <= {need:.3f}")
        k = reused_steps(need, config.steps)
        if k not in searched.sizes:
            searched.sizes.add(k)
            note += f"; searched sets of {k} reused steps as well"
            try:
                _climb_size(evaluate, k, config.steps, changes, searched.suffix, options)
            except BudgetSpent as err:
                notes.append(f"refit {round_} stopped early: {err}")
        # the sizes may all have been searched, yet the first timing took only the best few of the
        # MACs levels the first model allowed, which may not be the levels the refitted one needs
        new = refit_candidates(list(evaluate.rows.values()), timing, need, options)
        if not new:
            break
        notes.append(f"{note}; timed {len(new)} more")
        timing = {**timing, **_timing(loaded, config, ["none"] + new, out, f"timing-{tag}-refit{round_}.json", options)}
    return timing, notes


def _climb_size(evaluate, k: int, num_steps: int, changes: list[float], suffix: str, options: TuneOptions) -> dict:
    """Sample the k-step starting points (greedy and trimmed presets) and climb from the best."""
    starts = {greedy_steps(k, changes)} | {trim(s, k, changes) for p in PRESET_SPECS
                                           if (s := preset_steps(p, num_steps)) and len(s) >= k}
    # every start is sampled, and the climb goes on from the best one only: a climb costs beam
    # samples per iteration, and a start that loses to another rarely overtakes it
    tried = [evaluate(steps_spec(s, suffix)) for s in sorted(starts, key=lambda s: (proxy_cost(s, changes), s))]
    best = max(tried, key=lambda r: r["psnr_vs_uncached"])
    return climb(evaluate, _steps_of(best["spec"]), suffix, changes, options.beam)


def _climb_down(evaluate, num_steps, changes, options) -> None:
    """--min-psnr: the best k-step set for k = 1, 2, ... until it falls below the floor."""
    for k in range(1, num_steps):
        start = greedy_steps(k, changes)
        plain, goc = evaluate(steps_spec(start)), evaluate(steps_spec(start, GOC))
        suffix = GOC if goc["psnr_vs_uncached"] > plain["psnr_vs_uncached"] else ""
        if climb(evaluate, start, suffix, changes, options.beam)["psnr_vs_uncached"] < options.min_psnr:
            return


def meets(row: dict, need_macs: float, options: TuneOptions) -> bool:
    """Does a tuning row meet the requirement before speed is measured?"""
    if options.min_psnr is not None:
        return row["psnr_vs_uncached"] >= options.min_psnr
    key = "compute_fraction" if options.target_compute is not None else "macs_ratio"
    return row[key] <= need_macs + 1e-9


def timing_candidates(rows: list[dict], need_macs: float, options: TuneOptions) -> list[str]:
    """What is timed: the best row of each MACs level that meets the requirement (for a speed target,
    within SPEED_MARGIN of the modelled MACs ratio, since the measurement decides), the ``timed``
    best of those, and the best preset."""
    margin = SPEED_MARGIN if options.target_speedup is not None else 0.0
    ok = [r for r in rows if meets(r, need_macs * (1 + margin), options)]
    if options.min_psnr is not None:
        order = lambda r: (r["macs_ratio"], -r["psnr_vs_uncached"])  # noqa: E731
    else:
        order = lambda r: (-r["psnr_vs_uncached"], r["macs_ratio"])  # noqa: E731
    levels: dict[float, dict] = {}
    for r in sorted(ok, key=order):
        levels.setdefault(round(r["macs_ratio"], 3), r)
    best = sorted(levels.values(), key=order)[:options.timed]
    presets = sorted((r for r in ok if "steps=" not in r["spec"]), key=order)[:1]
    return list(dict.fromkeys(r["spec"] for r in best + presets))


def _level(row: dict) -> tuple:
    """Configurations of one MACs level and corrector take the same time: one timing speaks for all."""
    return round(row["macs_ratio"], 3), row["spec"].endswith(GOC)


def refit_candidates(rows: list[dict], timing: dict, need_macs: float, options: TuneOptions) -> list[str]:
    """What a refit times: untimed rows that could still change the choice (PSNR above the best timed
    row meeting the target), at most SPEED_MARGIN above the refitted MACs ratio, none at a level
    (MACs ratio and corrector) where a timed row already missed the target; the best of each
    level, the ``timed`` best levels."""
    timed = _timed(rows, timing)
    best_met = max((r["psnr_vs_uncached"] for r in timed if r["speedup"] >= options.target_speedup), default=-math.inf)
    missed = {_level(r) for r in timed if r["speedup"] < options.target_speedup}
    pool = [r for r in rows if r["spec"] not in timing and r["psnr_vs_uncached"] > best_met
            and _level(r) not in missed and r["macs_ratio"] <= need_macs * (1 + SPEED_MARGIN) + 1e-9]
    levels: dict[tuple, dict] = {}
    for r in sorted(pool, key=lambda r: -r["psnr_vs_uncached"]):
        levels.setdefault(_level(r), r)
    # and the best preset that may meet the target, so the choice is compared with the best preset
    # at the speed it reaches, not with whichever preset the first model happened to time
    met = [r for r in timed if "steps=" not in r["spec"] and r["speedup"] >= options.target_speedup]
    presets = [r for r in rows if "steps=" not in r["spec"] and r["spec"] not in timing and _level(r) not in missed
               and r["macs_ratio"] <= need_macs * (1 + SPEED_MARGIN) + 1e-9
               and r["psnr_vs_uncached"] > max((m["psnr_vs_uncached"] for m in met), default=-math.inf)]
    best_preset = max(presets, key=lambda r: r["psnr_vs_uncached"], default=None)
    specs = [r["spec"] for r in list(levels.values())[:options.timed]]
    return specs + ([best_preset["spec"]] if best_preset and best_preset["spec"] not in specs else [])


def pareto(rows: list[dict]) -> set[str]:
    """Specs no other row beats on both MACs ratio (lower) and PSNR (higher)."""
    return {r["spec"] for r in rows if not any(
        o["macs_ratio"] <= r["macs_ratio"] and o["psnr_vs_uncached"] >= r["psnr_vs_uncached"]
        and (o["macs_ratio"] < r["macs_ratio"] or o["psnr_vs_uncached"] > r["psnr_vs_uncached"]) for o in rows)}


def _timed(rows: list[dict], timing: dict) -> list[dict]:
    return [r | {"speedup": timing[r["spec"]]["speedup"]} for r in rows if r["spec"] in timing]


def fastest(rows: list[dict], timing: dict) -> Optional[dict]:
    """The timed row of highest measured speed-up (None when nothing was timed)."""
    return max(_timed(rows, timing), key=lambda r: (r["speedup"], r["psnr_vs_uncached"]), default=None)


def choose(rows: list[dict], timing: dict, options: TuneOptions) -> tuple[Optional[dict], Optional[str]]:
    """(best row meeting the target as measured, None), or (None, why none does).

    A speed target that no timed candidate reaches chooses nothing: handing back the fastest instead
    would look like an answer to the question asked, so the caller reports it as the fastest, apart."""
    timed = _timed(rows, timing)
    if options.target_speedup is not None:
        ok = [r for r in timed if r["speedup"] >= options.target_speedup]
        if not ok:
            best = fastest(rows, timing)
            return None, (f"target not met: no configuration reached {options.target_speedup:g}x as measured; the "
                          f"fastest, {best['spec']}, measured {best['speedup']:.2f}x" if best else
                          "target not met: no configuration was timed")
        return max(ok, key=lambda r: (r["psnr_vs_uncached"], r["speedup"])), None
    if options.target_compute is not None:
        ok = [r for r in timed if r["compute_fraction"] <= options.target_compute + 1e-9]
        return (max(ok, key=lambda r: r["psnr_vs_uncached"]), None) if ok else (None, "no candidate met the target")
    ok = [r for r in timed if r["psnr_vs_uncached"] >= options.min_psnr]
    return (max(ok, key=lambda r: r["speedup"]), None) if ok else (None, f"no configuration keeps PSNR >= "
                                                                       f"{options.min_psnr:g} dB")


def tune(loaded, config: SampleConfig, out: str | Path, options: TuneOptions) -> dict:
    """The whole search (module docstring); returns the result written to ``out/result.json``."""
    from .report import heldout_rows, save_front, save_tuned

    options.check()
    config.validate(loaded.num_classes)
    heldout_seed = config.seed + HELDOUT_OFFSET if options.heldout_seed is None else options.heldout_seed
    if heldout_seed == config.seed:
        raise ValueError("--heldout-seed must differ from --seed: held-out noise must be noise the search never saw")
    out = Path(out)
    settings = {"model": loaded.fingerprint, **dataclasses.asdict(config), "device": options.device,
                "token_presets": options.token_presets, "beam": options.beam}
    with claim(out, settings, options.overwrite, "a tuning run"):
        changes = _profile(loaded, config, out, options.device)
        need_macs, fixed = required_macs(loaded, config, out, options)
        evaluate = Evaluator(loaded, config, out / "tuning", options)
        searched = Searched()
        notes = search(evaluate, config.steps, changes, need_macs, options, searched)
        candidates = timing_candidates(list(evaluate.rows.values()), need_macs, options)
        tag = _target_tag(options)
        timing = _timing(loaded, config, ["none"] + candidates, out, f"timing-{tag}.json", options) if candidates else {}
        if options.target_speedup is not None and timing:
            timing, more = refine(evaluate, loaded, config, out, options, timing, searched, changes, tag)
            notes += more
        rows = list(evaluate.rows.values())
        chosen, warning = choose(rows, timing, options)
        presets = [r for r in rows if "steps=" not in r["spec"]]
        best_preset, _ = choose(presets, timing, options)
        checked, checked_preset = chosen, best_preset
        if chosen is None and options.target_speedup is not None:
            # nothing is chosen, but the held-out check still shows what is reachable here
            checked, checked_preset = fastest(rows, timing), fastest(presets, timing)
        result = {"target": options.target(), "device": options.device, "tuning_seed": config.seed,
                  "heldout_seed": heldout_seed, "tuning_samples": config.num_samples,
                  "configs_evaluated": len(rows), "changes": changes, "required_macs_ratio": need_macs,
                  "fixed_time_share": fixed, "notes": notes, "warning": warning, "target_met": chosen is not None,
                  "chosen": chosen and chosen["spec"], "best_preset": best_preset and best_preset["spec"],
                  "fastest": None if chosen is not None or checked is None else checked["spec"]}
        if checked is not None:
            result["heldout"] = heldout_rows(loaded, config, heldout_seed, checked, checked_preset, timing, out,
                                             options, met=chosen is not None)
        if chosen is not None:
            result["artifact"] = str(save_tuned(loaded, config, out / f"tuned-{_target_tag(options)}",
                                                    chosen["spec"], result))
        result["front"] = save_front(rows, timing, chosen, out, options)
        write_json_atomic(out / f"result-{_target_tag(options)}.json", json.loads(dumps(result)))
    return result


def _target_tag(options: TuneOptions) -> str:
    return "-".join(f"{k}{v:g}" for k, v in options.target().items())
