"""bench --peers on a PixArt pipeline: the pipeline's own loop for every system, the external counter
(cross-attention included) agreeing with the engine, diffusers' hooks stepped by the transformer's
calls, fidelity of the final latents to the uncached run."""

import math

import pytest

from ditcache.bench.peers import NONE
from ditcache.bench.peers_pipeline import PixArtJob, compare_pipeline_peers

pytest.importorskip("diffusers.hooks")
pytest.importorskip("transformers")

JOB = PixArtJob(depth=2, hidden=32, sample_size=16, steps=6, num_samples=2)


@pytest.fixture(scope="module")
def rows():
    specs = ["fora:interval=2+forecast", "toca:interval=2", "diffusers:taylorseer:interval=2,order=1,warmup=1",
             "diffusers:magcache", "cache-dit:dbcache:mask=2"]
    return {r["spec"]: r for r in compare_pipeline_peers(specs, JOB, progress=False)}


def test_uncached_row_is_the_reference(rows):
    none = rows[NONE]
    assert none["status"] == "ok" and none["compute_fraction"] == 1.0 and math.isinf(none["psnr_vs_uncached"])


@pytest.mark.parametrize("spec", ["fora:interval=2+forecast", "toca:interval=2"])
def test_counted_fraction_equals_the_engines_own_count_with_cross_attention(rows, spec):
    row = rows[spec]
    assert row["status"] == "ok" and row["compute_fraction"] < 1.0
    assert row["compute_fraction"] == pytest.approx(row["engine_compute_fraction"], abs=1e-12)
    assert 0 < row["psnr_vs_uncached"] < math.inf


def test_diffusers_taylorseer_runs_inside_the_pipeline_at_its_interval(rows):
    row = rows["diffusers:taylorseer:interval=2,order=1,warmup=1"]
    assert row["status"] == "ok"
    assert row["compute_fraction"] == pytest.approx(0.5)  # steps 0, 2, 4 of 6 computed
    assert 0 < row["psnr_vs_uncached"] < math.inf


def test_peers_that_do_not_apply_are_rows(rows):
    assert rows["diffusers:magcache"]["status"].startswith("not run: MagCache")
    assert rows["cache-dit:dbcache:mask=2"]["status"].startswith("not run: cache-dit is not run inside")


def test_forecast_order_one_on_taylorseers_schedule_is_taylorseer():
    """diffusers' TaylorSeer (order 1, warmup 1, interval 2: steps 0, 2, 4 of 6 computed) and ditcache's
    forecast:order=1 on the same schedule give the same latents: the gap between them in the table is
    the choice of steps, not the extrapolation."""
    import numpy as np

    from ditcache.bench.peers_pipeline import run_pipeline_system
    from ditcache.pipelines.toy import pixart_pipeline

    pipe = pixart_pipeline(depth=JOB.depth, hidden=JOB.hidden, heads=4, sample_size=JOB.sample_size)
    base = pipe.transformer
    ours, _ = run_pipeline_system("rule:steps=1/3/5+forecast:order=1", pipe, base, JOB)
    theirs, _ = run_pipeline_system("diffusers:taylorseer:interval=2,order=1,warmup=1", pipe, base, JOB)
    plain, _ = run_pipeline_system("rule:steps=1/3/5", pipe, base, JOB)
    assert ours.fraction == theirs.fraction == 0.5
    np.testing.assert_allclose(ours.images, theirs.images, rtol=1e-5, atol=1e-4)
    assert np.abs(plain.images - theirs.images).max() > 1e-2  # and the extrapolation does act
