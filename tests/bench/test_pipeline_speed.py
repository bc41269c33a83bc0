"""The pipeline benchmark times every cache inside the pipeline's own loop and counts exactly."""

import pytest

from ditcache.bench.pipeline_speed import time_pipeline


def test_rows_carry_the_engines_exact_counts():
    rows = time_pipeline(("bare", "none", "fora:interval=2", "rule:preset=rm-50"), steps=3, depth=1, latent=8,
                         text_tokens=4, repeats=1, progress=False)
    assert [r.spec for r in rows] == ["bare", "none", "fora:interval=2", "rule:preset=rm-50"]
    assert rows[0].speedup == 1.0 and rows[1].compute_fraction == 1.0 and rows[1].macs_ratio == 1.0
    # 3 steps: FORA N=2 (count-down 2, 1, 0) reuses step 1; RM-50 reuses the odd step 1
    assert rows[2].compute_fraction == pytest.approx(2 / 3) and rows[3].compute_fraction == pytest.approx(2 / 3)
    assert 2 / 3 < rows[2].macs_ratio < 1  # embeddings and the final layer always run
    assert all(r.seconds > 0 and len(r.seconds_all) == 1 for r in rows)
