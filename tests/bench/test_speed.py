"""Speed figures carry their spread, and a warning where they cannot be quoted as they are."""

from ditcache.bench.speed import SpeedRow, speed_table


def _rows(ref, other, macs_ratio):
    a = SpeedRow("none", sorted(ref)[len(ref) // 2], ref, 1.0, 1.0)
    b = SpeedRow("rule:preset=rm-50", sorted(other)[len(other) // 2], other, 0.5, macs_ratio)
    for row in (a, b):
        row.speedup_all = [x / y for x, y in zip(ref, row.seconds_all)]
        row.speedup = sorted(row.speedup_all)[len(row.speedup_all) // 2]
    return [a, b]


def test_table_shows_median_and_min_max_and_warns_above_the_bound():
    rows = _rows([1.0, 1.2, 1.1], [0.3, 0.4, 0.35], macs_ratio=0.52)  # bound 1.92x, measured ~3.1x
    text = speed_table(rows)
    assert "1.100 (1.000-1.200)" in text and "3.14x (3.00-3.33)" in text
    assert "median of 3 interleaved repeats in one process" in text
    assert ("warning: rule:preset=rm-50: measured speed-up 3.14x is above its MACs bound 1.92x (spread 3.00-3.33x)"
            in text)
    assert rows[1].as_dict()["warning"] == rows[1].warning and rows[0].warning is None


def test_a_single_repeat_is_flagged():
    rows = _rows([1.0], [0.6], macs_ratio=0.52)
    assert rows[1].warning == "rule:preset=rm-50: one repeat, so no spread: time it with --repeats 3 or more"


def test_engine_variants_time_each_spec_under_each_setting_in_turn(monkeypatch):
    from ditcache.bench import speed
    from ditcache.engine import CacheEngine

    from ..correctors.conftest import tiny_loaded

    seen = []
    real = speed.generate

    def spy(loaded, config, engine=None, **kw):
        seen.append(engine.skip_inputs)
        return real(loaded, config, engine=engine, **kw)

    monkeypatch.setattr(speed, "generate", spy)
    from ditcache.sampling.generate import SampleConfig

    variants = {"full": {"skip_inputs": False}, "skip": {"skip_inputs": True}}
    rows = speed.time_engine_variants(tiny_loaded(), SampleConfig(num_samples=2, batch_size=2, steps=4), ["none", "fora:interval=2"],
                                      variants, repeats=2)
    assert [r.spec for r in rows] == ["none", "fora:interval=2|full", "fora:interval=2|skip"]
    # warm-up, then per repeat: the reference, full, skip
    assert seen == [True, True, False, True, True, False, True]
    assert rows[1].macs_ratio == rows[2].macs_ratio < 1 and isinstance(CacheEngine.patches_inputs, bool)
