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
