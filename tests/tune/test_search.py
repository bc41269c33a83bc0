"""`tune`'s search on a tiny model: meets the target, resumes to the same result, checks on other noise."""

import json

import numpy as np
import pytest

from ditcache.models.loading import load_model, save_model
from ditcache.sampling.generate import SampleConfig
from ditcache.tune import search as search_mod
from ditcache.tune.search import (Evaluator, TuneOptions, choose, fastest, pareto, preset_steps, required_macs,
                                  tune)

from ..conftest import tiny_dit

CONFIG = SampleConfig(num_samples=4, batch_size=4, steps=6)


@pytest.fixture
def loaded(tmp_path):
    return load_model(str(save_model(tiny_dit(depth=2, size=12, channels=1, classes=4), tmp_path / "tiny.safetensors")))


def options(**kw):
    return TuneOptions(**{"target_compute": 0.5, "repeats": 1, "beam": 2, "timed": 2, "token_presets": False,
                          "progress": False, **kw})


def test_search_meets_the_compute_target_and_beats_or_ties_the_presets(tmp_path, loaded):
    result = tune(loaded, CONFIG, tmp_path / "t", options())
    rows = {e["spec"]: e for e in json.loads((tmp_path / "t" / "front-target_compute0.5.json").read_text())}
    chosen = rows[result["chosen"]]
    assert chosen["chosen"] and chosen["compute_fraction"] <= 0.5
    meeting = [r for r in rows.values() if r["compute_fraction"] <= 0.5 and r["psnr_vs_uncached"] is not None]
    assert all((chosen["psnr_vs_uncached"] or np.inf) >= r["psnr_vs_uncached"] for r in meeting if r["speedup"] is not None)
    assert any("steps=" in s for s in rows) and "rule:preset=rm-50+goc" in rows  # presets and the search
    assert (tmp_path / "t" / "front-target_compute0.5.png").stat().st_size > 0


def test_interrupted_search_resumes_to_the_same_result(tmp_path, loaded, monkeypatch):
    whole = tune(loaded, CONFIG, tmp_path / "whole", options())
    calls = {"n": 0}
    real = Evaluator.__call__

    def interrupted(self, spec):
        if spec not in self.rows:
            calls["n"] += 1
            if calls["n"] == 7:
                raise KeyboardInterrupt
        return real(self, spec)

    monkeypatch.setattr(Evaluator, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tune(loaded, CONFIG, tmp_path / "cut", options())
    assert len(list((tmp_path / "cut" / "tuning").glob("*/row.json"))) == 1 + 6  # uncached + 6 finished
    monkeypatch.setattr(Evaluator, "__call__", real)
    resumed = tune(loaded, CONFIG, tmp_path / "cut", options())
    assert resumed["chosen"] == whole["chosen"]
    assert resumed["configs_evaluated"] == whole["configs_evaluated"]
    front = lambda p: [(e["spec"], e["psnr_vs_uncached"]) for e in json.loads((p / "front-target_compute0.5.json").read_text())]  # noqa: E731
    assert front(tmp_path / "cut") == front(tmp_path / "whole")


def test_heldout_numbers_come_from_other_noise(tmp_path, loaded):
    result = tune(loaded, CONFIG, tmp_path / "t", options(heldout_seed=77))
    assert result["heldout_seed"] == 77 and result["heldout"][0]["role"].startswith("chosen")
    with np.load(tmp_path / "t" / "tuning" / "none" / "samples.npz") as a, \
            np.load(tmp_path / "t" / "heldout-seed77-n4" / "none" / "samples.npz") as b:
        assert not np.array_equal(a["arr_0"], b["arr_0"])
    settings = json.loads((tmp_path / "t" / "heldout-seed77-n4" / "run.json").read_text())
    assert settings["seed"] == 77
    with pytest.raises(ValueError, match="must differ"):
        tune(loaded, CONFIG, tmp_path / "u", options(heldout_seed=CONFIG.seed))


def test_budget_stops_the_search_and_says_so(tmp_path, loaded):
    result = tune(loaded, CONFIG, tmp_path / "t", options(max_configs=3))
    assert result["configs_evaluated"] == 3
    assert any("--max-configs 3" in n for n in result["notes"])


def test_speed_target_uses_the_measured_fixed_share(tmp_path, loaded, monkeypatch):
    # uncached 1.0, rm-50 (MACs 0.5) measured 1.6x: time = a + (1 - a) m gives a = 0.25
    fake = {"none": {"speedup": 1.0, "macs_ratio": 1.0}, "rule:preset=rm-50": {"speedup": 1.6, "macs_ratio": 0.5}}
    monkeypatch.setattr(search_mod, "_timing", lambda *a, **k: fake)
    need, a = required_macs(loaded, CONFIG, tmp_path, options(target_compute=None, target_speedup=2.0))
    assert a == pytest.approx(0.25) and need == pytest.approx((0.5 - 0.25) / 0.75)
    with pytest.raises(ValueError, match="out of reach.*at most 4.00x"):
        required_macs(loaded, CONFIG, tmp_path, options(target_compute=None, target_speedup=5.0))


def test_time_model_is_not_sunk_by_one_slowed_repeat():
    base = {"speedup": 1.0, "seconds_all": [67.0, 111.5, 105.2]}
    probe = {"speedup": 1.18, "seconds_all": [70.0, 46.6, 108.8], "macs_ratio": 0.5}  # under heavy load
    assert search_mod.probe_speedup(base, probe) == pytest.approx(67.0 / 46.6)
    assert search_mod.probe_speedup(base, {**probe, "speedup": 1.6}) == 1.6
    assert search_mod.probe_speedup({"speedup": 1.0}, {"speedup": 1.6}) == 1.6  # saved without repeats


def test_choice_is_by_measured_speed_not_macs():
    rows = [{"spec": "a", "psnr_vs_uncached": 40.0, "compute_fraction": 0.5, "macs_ratio": 0.5},
            {"spec": "b", "psnr_vs_uncached": 30.0, "compute_fraction": 0.5, "macs_ratio": 0.5}]
    timing = {"a": {"speedup": 1.7}, "b": {"speedup": 2.1}}
    chosen, warning = choose(rows, timing, TuneOptions(target_speedup=2.0))
    assert chosen["spec"] == "b" and warning is None
    chosen, warning = choose(rows, timing, TuneOptions(target_speedup=3.0))
    assert chosen is None  # never the fastest in the target's place
    assert warning == "target not met: no configuration reached 3x as measured; the fastest, b, measured 2.10x"
    assert fastest(rows, timing)["spec"] == "b"
    assert pareto(rows) == {"a"}


def unreachable(monkeypatch, speedup=2.0):
    """Timing where rm-50 measures 2.4x (so the model asks for few MACs) and every candidate ``speedup``."""
    def fake(loaded, config, specs, out, name, options):
        return {s: {"speedup": 1.0 if s == "none" else 2.4 if name == "speed_model.json" else speedup,
                    "macs_ratio": 1.0 if s == "none" else 0.5} for s in specs}
    monkeypatch.setattr(search_mod, "_timing", fake)


def test_an_unmet_speed_target_chooses_nothing_and_says_so(tmp_path, loaded, monkeypatch):
    unreachable(monkeypatch)
    result = tune(loaded, CONFIG, tmp_path / "t", options(target_compute=None, target_speedup=2.5))
    assert result["target_met"] is False and result["chosen"] is None and result["fastest"]
    assert result["warning"].startswith("target not met: no configuration reached 2.5x")
    assert result["heldout"][0]["role"] == "fastest" and result["heldout"][0]["spec"] == result["fastest"]
    assert "artifact" not in result and not list((tmp_path / "t").glob("tuned-*"))
    saved = json.loads((tmp_path / "t" / "result-target_speedup2.5.json").read_text())
    assert saved["target_met"] is False


def test_heldout_psnr_has_intervals_and_a_paired_difference(tmp_path, loaded):
    result = tune(loaded, CONFIG, tmp_path / "t", options(bootstrap=200))
    first = result["heldout"][0]
    for r in result["heldout"]:
        if r["heldout_psnr_vs_uncached"] is not None and np.isfinite(r["heldout_psnr_vs_uncached"]):
            assert r["heldout_psnr_ci_low"] <= r["heldout_psnr_vs_uncached"] <= r["heldout_psnr_ci_high"]
    assert first["heldout_psnr_diff_vs"] == result["heldout"][-1]["spec"] == result["best_preset"]
    if len(result["heldout"]) == 1:  # the choice is the preset
        assert (first["heldout_psnr_diff"], first["heldout_psnr_diff_ci_low"]) == (0.0, 0.0)
    again = tune(loaded, CONFIG, tmp_path / "t", options(bootstrap=200))  # resumed: the same intervals
    assert [{k: v for k, v in r.items() if "speedup" not in k} for r in again["heldout"]] == \
        [{k: v for k, v in r.items() if "speedup" not in k} for r in result["heldout"]]


def test_preset_steps_match_the_policies():
    assert preset_steps("rule:preset=rm-50", 6) == (1, 3, 5)
    assert preset_steps("fora:interval=2", 6) == (2, 4)
    assert preset_steps("toca", 6) is None


@pytest.mark.parametrize("kw, match", [({"target_speedup": 2.0}, "exactly one"), ({"target_compute": 1.5}, "between"),
                                       ({"beam": 0}, "beam")])
def test_bad_options_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        options(**kw).check()


def test_speed_targets_time_one_candidate_per_macs_level_within_the_margin():
    rows = [{"spec": "rule:steps=1/3", "psnr_vs_uncached": 40.0, "compute_fraction": 0.5, "macs_ratio": 0.52},
            {"spec": "rule:steps=1/4", "psnr_vs_uncached": 39.0, "compute_fraction": 0.5, "macs_ratio": 0.52},
            {"spec": "fora:interval=3", "psnr_vs_uncached": 30.0, "compute_fraction": 0.4, "macs_ratio": 0.41},
            {"spec": "rule:preset=rm-25", "psnr_vs_uncached": 50.0, "compute_fraction": 0.75, "macs_ratio": 0.76}]
    specs = search_mod.timing_candidates(rows, 0.46, TuneOptions(target_speedup=2.0, timed=3))
    assert specs == ["rule:steps=1/3", "fora:interval=3"]  # 0.52 is within 15% of 0.46; 0.76 is not
    specs = search_mod.timing_candidates(rows, 0.46, TuneOptions(target_compute=0.46, timed=3))
    assert specs == ["fora:interval=3"]  # a compute target has no margin


def test_min_psnr_returns_a_configuration_above_the_floor(tmp_path, loaded):
    result = tune(loaded, CONFIG, tmp_path / "t", options(target_compute=None, min_psnr=30.0))
    rows = {e["spec"]: e for e in json.loads((tmp_path / "t" / "front-min_psnr30.json").read_text())}
    chosen = rows[result["chosen"]]
    assert chosen["psnr_vs_uncached"] is None or chosen["psnr_vs_uncached"] >= 30.0  # None: identical (inf)
    assert chosen["compute_fraction"] < 1


def test_a_speed_target_refits_the_time_model_to_the_measured_candidates(tmp_path, loaded, monkeypatch):
    """The probe says no fixed share (rm-50 at its bound), so 1.6x looks like 3 of 6 steps reused; the
    device really spends half its time outside the sub-layers (a = 0.5), where only sets of 5 reach
    1.6x. Without the refit nothing would be chosen; with it the 5-step sets are searched and timed."""
    def macs(spec):
        base = spec.split("+")[0]
        k = len(base.split("=")[1].split("/")) if base.startswith("rule:steps=") else len(preset_steps(base, 6))
        return (6 - k) / 6 + 0.02

    def fake(loaded, config, specs, out, name, options):
        true = lambda m: 1 / (0.5 + 0.5 * m) if name != "speed_model.json" else 1 / m  # noqa: E731
        return {s: {"speedup": 1.0 if s == "none" else true(macs(s)), "macs_ratio": 1.0 if s == "none" else macs(s)}
                for s in specs}

    monkeypatch.setattr(search_mod, "_timing", fake)
    result = tune(loaded, CONFIG, tmp_path / "t", options(target_compute=None, target_speedup=1.6))
    assert result["target_met"] is True
    assert len(result["chosen"].split("+")[0].split("=")[1].split("/")) == 5
    assert any(n.startswith("refit 1: ") and "of 5 reused steps" in n and "timed" in n for n in result["notes"])
    monkeypatch.setattr(search_mod, "REFITS", 0)  # the same search without the refit: nothing meets 1.6x
    again = tune(loaded, CONFIG, tmp_path / "u", options(target_compute=None, target_speedup=1.6))
    assert again["target_met"] is False


def test_a_refit_times_untimed_candidates_of_sizes_already_searched(tmp_path, monkeypatch):
    """DDIM-20, 2x: the first model (rm-50 at 1.96x: no fixed share) timed the best three levels up to
    MACs 0.57; they measured 1.62-1.94x, which fit a share of about 15%, so MACs <= 0.415 is needed:
    sets of 12 were searched already, but their best (MACs 0.409) had not been timed."""
    from types import SimpleNamespace

    rows = [("fora:interval=2", 0.557, 34.3, 1.655), ("rule:preset=rm-50+goc", 0.508, 33.0, 1.618),
            ("rule:steps=1/2/3/5/7/9/11/13/15/16/18", 0.459, 32.3, 1.938),
            ("rule:steps=1/2/3/4/6/7/9/11/13/15/16/18", 0.409, 30.1, None)]
    evaluate = SimpleNamespace(rows={s: {"spec": s, "macs_ratio": m, "compute_fraction": m, "psnr_vs_uncached": p}
                                     for s, m, p, _ in rows})
    timing = {"none": {"speedup": 1.0}} | {s: {"speedup": x} for s, _, _, x in rows if x is not None}
    calls = []

    def fake(loaded, config, specs, out, name, options):
        calls.append((specs, name))
        return {s: {"speedup": 1.0 if s == "none" else 2.07} for s in specs}

    monkeypatch.setattr(search_mod, "_timing", fake)
    searched = search_mod.Searched(sizes={10, 11, 12})
    timing, notes = search_mod.refine(evaluate, None, SimpleNamespace(steps=20), tmp_path,
                                      TuneOptions(target_speedup=2.0), timing, searched, [], "t")
    assert calls == [(["none", rows[3][0]], "timing-t-refit1.json")]
    assert timing[rows[3][0]]["speedup"] == 2.07 and searched.sizes == {10, 11, 12}
    assert len(notes) == 1 and "fixed time share of 14." in notes[0] and notes[0].endswith("timed 1 more")
    chosen, _ = choose(list(evaluate.rows.values()), timing, TuneOptions(target_speedup=2.0))
    assert chosen["spec"] == rows[3][0]


def test_a_refit_times_only_what_could_change_the_choice():
    """DDIM-50, 2x: the sets of 29-31 reused steps measured 1.84-1.95x and FORA-3 2.04x at 35.9 dB. A
    refit must not time those levels again (a set of the same size and corrector takes the same
    time); it times the best untimed set of a new level that beats 35.9 dB."""
    def row(spec, macs, psnr):
        return {"spec": spec, "macs_ratio": macs, "compute_fraction": macs, "psnr_vs_uncached": psnr}

    rows = [row("fora:interval=3", 0.370, 35.9), row("rule:steps=a31", 0.390, 38.1), row("rule:steps=b31", 0.390, 38.0),
            row("rule:steps=c32", 0.370, 37.2), row("rule:steps=d32", 0.370, 36.9), row("rule:steps=e33", 0.350, 35.0), row("rule:steps=f32+goc", 0.370, 37.5)]
    timing = {"fora:interval=3": {"speedup": 2.04}, "rule:steps=a31": {"speedup": 1.95}}
    new = search_mod.refit_candidates(rows, timing, 0.377, TuneOptions(target_speedup=2.0, timed=3))
    # b31: a timed set of its level missed; e33: below the PSNR to beat; c32 and f32+goc: the best of
    # their levels (FORA-3 met the target at 0.370 without GOC, so that level is open)
    assert new == ["rule:steps=f32+goc", "rule:steps=c32"]
    # FORA-2 missed at 1.65x and rm-50+goc at 1.62x: nothing met the target yet, so the best of each
    # open level is timed (the set of 12 at 0.409, RM-75 at 0.262), and FORA-3, which shares the set's
    # level, as well: it is the preset the choice will be compared with
    rows = [row("fora:interval=2", 0.557, 34.3), row("rule:preset=rm-50+goc", 0.508, 33.0),
            row("fora:interval=3", 0.409, 28.1), row("rule:preset=rm-75", 0.262, 25.5), row("rule:steps=s12", 0.409, 30.4)]
    timing = {"fora:interval=2": {"speedup": 1.65}, "rule:preset=rm-50+goc": {"speedup": 1.62}}
    assert search_mod.refit_candidates(rows, timing, 0.415, TuneOptions(target_speedup=2.0)) == [
        "rule:steps=s12", "rule:preset=rm-75", "fora:interval=3"]


def test_a_speed_target_with_refits_resumes_without_timing_again(tmp_path, loaded, monkeypatch):
    """Timings are saved as they are made (the first one and each refit's), so a rerun from the same
    --out reads them back: the same refits, the same choice, and nothing timed twice."""
    from ditcache.bench import speed

    calls = []

    def macs(spec):  # as in the refit test: (6 - k) / 6 + 0.02 for k reused steps
        base = spec.split("+")[0]
        k = len(base.split("=")[1].split("/")) if base.startswith("rule:steps=") else len(preset_steps(base, 6))
        return (6 - k) / 6 + 0.02

    def fake_rows(loaded_, config, specs, repeats, device, progress=False):
        calls.append(specs)
        rows = []
        for spec in specs:
            m = 1.0 if spec == "none" else macs(spec)
            # the first call is the probe, which sees no fixed share; the device has one of 0.5
            s = 1.0 if spec == "none" else (1 / m if len(calls) == 1 else 1 / (0.5 + 0.5 * m))
            row = speed.SpeedRow(spec, 1.0 / s, [1.0 / s], m, m)
            row.speedup, row.speedup_all = s, [s]
            rows.append(row)
        return rows

    monkeypatch.setattr(speed, "time_policies", fake_rows)
    first = tune(loaded, CONFIG, tmp_path / "t", options(target_compute=None, target_speedup=1.6))
    assert any(n.startswith("refit 1: ") for n in first["notes"]) and list((tmp_path / "t").glob("timing-*-refit1.json"))

    saved = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "t").glob("*.json") if p.name.startswith(("timing-", "speed_model"))}
    calls.clear()
    again = tune(loaded, CONFIG, tmp_path / "t", options(target_compute=None, target_speedup=1.6))
    assert (again["chosen"], again["notes"], again["target_met"]) == (first["chosen"], first["notes"], first["target_met"])
    # no search timing was made again (the files were not rewritten); the held-out check times its
    # two rows, as compare always does
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "t").glob("*.json") if p.name in saved} == saved
    assert all(set(specs) <= {"none", again["chosen"], again["best_preset"]} for specs in calls)
