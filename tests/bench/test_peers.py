"""bench --peers: one DDIM loop on the diffusers copy of our model for every system, an external call
counter that agrees with the engine's, peers that fail or are missing as rows, not crashes."""

import sys

import pytest

from ditcache.bench.peers import (NONE, NotApplicable, build_system, compare_peers, diffusers_model, group, level,
                                  peers_table, run_system, PeersOptions)
from ditcache.models.loading import LoadedModel, fingerprint
from ditcache.sampling.generate import SampleConfig, generate

from ..conftest import tiny_dit

CONFIG = SampleConfig(num_samples=2, batch_size=2, steps=6, cfg_scale=1.5, seed=1)
QUICK = PeersOptions(fid=False, repeats=0, progress=False)


@pytest.fixture(scope="module")
def loaded():
    module = tiny_dit(size=12)  # 12 x 12 images: SSIM needs at least 11 x 11
    return LoadedModel(module=module, family="dit", name="tiny", image_size=12, latent_size=12, in_channels=4,
                       num_classes=5, null_class=5, learn_sigma=True, guided_channels=None, vae=None,
                       fingerprint=fingerprint(module))


@pytest.fixture(scope="module")
def base(loaded):
    return diffusers_model(loaded)


def run(spec, base, loaded, config=CONFIG):
    return run_system(build_system(spec, base, loaded), loaded, config)


def test_uncached_loop_on_the_diffusers_copy_reproduces_our_sampler(base, loaded):
    ours = generate(loaded, CONFIG).images
    theirs = run(NONE, base, loaded)
    assert theirs.fraction == 1.0
    # the two models differ only in float rounding (split qkv, per-block embedders): at most one level
    assert abs(ours.astype(int) - theirs.images.astype(int)).max() <= 1


@pytest.mark.parametrize("spec", ["rule:preset=rm-50", "fora:interval=3+forecast",
                                  "toca:interval=2,ratio=0.5+forecast:order=1"])
def test_counted_fraction_equals_the_engines_own_count(spec, base, loaded):
    """The forward-hook count knows nothing of the engine, yet agrees with its counters, partial
    (token-wise) steps included."""
    result = run(spec, base, loaded)
    assert result.fraction < 1.0
    assert result.fraction == pytest.approx(result.report["compute_fraction"], abs=1e-12)


def test_diffusers_taylorseer_runs_at_the_fraction_its_interval_gives(base, loaded):
    pytest.importorskip("diffusers.hooks")
    # warmup 1, interval 2 over 6 steps: steps 0, 2, 4 computed
    result = run("diffusers:taylorseer:interval=2,order=2,warmup=1", base, loaded)
    assert result.fraction == 0.5


def test_missing_package_and_failing_peer_are_rows(base, loaded, monkeypatch):
    monkeypatch.setitem(sys.modules, "cache_dit", None)  # import cache_dit now raises ImportError
    with pytest.raises(NotApplicable, match="cache-dit is not installed"):
        build_system("cache-dit:dbcache:threshold=0.1", base, loaded)
    rows = compare_peers(loaded, CONFIG, ["cache-dit:dbcache:threshold=0.1", "diffusers:magcache",
                                          "rule:preset=rm-50+forecast"], QUICK)
    status = {r["spec"]: r["status"] for r in rows}
    assert status["cache-dit:dbcache:threshold=0.1"].startswith("not run: cache-dit is not installed")
    assert status["diffusers:magcache"].startswith("not run: MagCache needs mag_ratios")
    assert status["rule:preset=rm-50+forecast"] == "ok" and status[NONE] == "ok"
    assert "not run" in peers_table(rows)


def test_a_peer_that_breaks_at_run_time_is_a_row(base, loaded):
    pytest.importorskip("diffusers.hooks")
    rows = compare_peers(loaded, CONFIG, ["diffusers:fastercache"], QUICK)
    assert rows[1]["status"].startswith("failed on this model")


def test_bad_specs_fail_before_sampling(base, loaded):
    with pytest.raises(ValueError, match="unknown diffusers cache"):
        build_system("diffusers:nocache", base, loaded)
    with pytest.raises(ValueError, match="key=value"):
        build_system("diffusers:taylorseer:interval", base, loaded)
    with pytest.raises(ValueError):
        compare_peers(loaded, CONFIG, ["nosuchpolicy"], QUICK)


def test_levels():
    assert [level(f) for f in (0.55, 0.5, 0.35, 0.3, 0.28, 0.25)] == [0.5, 0.5, 1 / 3, 1 / 3, 0.25, 0.25]


def test_table_groups_rows_by_level():
    rows = [{"spec": NONE, "status": "ok", "compute_fraction": 1.0},
            {"spec": "a", "status": "ok", "compute_fraction": 0.55}, {"spec": "b", "status": "ok", "compute_fraction": 0.35},
            {"spec": "c", "status": "ok", "compute_fraction": 0.25}, {"spec": "d", "status": "ok", "compute_fraction": 0.82},
            {"spec": "e", "status": "not run: x"}]
    groups = {title: [r["spec"] for r in members] for title, members in group(rows)}
    assert list(groups.values()) == [[NONE, "a"], [NONE, "b"], [NONE, "c"], ["d", "e"]]
    text = peers_table(rows)
    assert text.index("~50%") < text.index("`none`") < text.index("`a`") < text.index("~33%") < text.index("`b`") < text.index("`e`")


def test_cachedit_static_mask_skips_all_but_the_first_block(base, loaded):
    pytest.importorskip("cache_dit")
    # 3 blocks, Fn = 1: block 0 always runs; the other two only at the masked-in steps 0, 2, 4 of 6
    result = run("cache-dit:dbcache:mask=2,steps=6", base, loaded)
    assert result.fraction == pytest.approx(1 / 3 + 2 / 3 * 0.5)


def test_fid_intervals_and_paired_differences_against_uncached(base, loaded, monkeypatch, tmp_path):
    """Every row gets its 95% FID interval and, but for the uncached row, the paired interval of its FID
    minus the uncached FID, from replicates that drew the same sample indices (here on stand-in
    features: the first 16 pixel values, against a unit-Gaussian reference)."""
    import numpy as np

    import ditcache.metrics.evaluate as evaluate
    import ditcache.metrics.inception as inception
    from ditcache.metrics.bootstrap import FIDBootstrap, paired_difference

    boot = FIDBootstrap(np.zeros(16), np.eye(16), replicates=50)

    def stand_in(images, labels, reference, extractor, reference_limit, bootstrap):
        feats = images.reshape(len(images), -1)[:, :16].astype(np.float64) / 64.0  # (N, 16)
        assert bootstrap == 50 and reference_limit == 7
        return {"fid": boot.fid(feats), "num_reference": 7}, {"pool": feats, "spatial": feats}, boot.replicates_of(feats)

    monkeypatch.setattr(evaluate, "evaluate_with_features", stand_in)
    monkeypatch.setattr(inception, "InceptionExtractor", lambda: None)
    config = SampleConfig(num_samples=8, batch_size=8, steps=6, cfg_scale=1.5, seed=1)
    options = PeersOptions(fid=True, repeats=0, progress=False, reference_limit=7, bootstrap=50,
                           features_dir=str(tmp_path / "features"))
    specs = ["rule:preset=rm-50", "rule:preset=rm-50+forecast", "diffusers:magcache"]
    rows = compare_peers(loaded, config, specs, options)
    by = {r["spec"]: r for r in rows}
    none = by[NONE]
    assert none["fid_ci_low"] <= none["fid"] <= none["fid_ci_high"] and "fid_diff" not in none
    feats = {s: run(s, base, loaded, config).images.reshape(8, -1)[:, :16] / 64.0 for s in (NONE, specs[1])}
    want = paired_difference(boot.fid(feats[specs[1]]), boot.replicates_of(feats[specs[1]]),
                             boot.fid(feats[NONE]), boot.replicates_of(feats[NONE]))
    got = by[specs[1]]
    assert got["fid_diff"] == pytest.approx(got["fid"] - none["fid"])
    assert (got["fid_diff_ci_low"], got["fid_diff_ci_high"]) == pytest.approx((want.low, want.high))
    assert got["fid_diff_significant"] == want.excludes_zero
    assert "fid" not in by["diffusers:magcache"]  # a system that did not run has no FID and no interval
    text = peers_table(rows)
    assert "FID [95%]" in text and "ΔFID vs uncached [95%, paired]" in text
    line = next(l for l in text.splitlines() if f"`{specs[1]}`" in l)
    assert f"[{got['fid_ci_low']:.2f}, {got['fid_ci_high']:.2f}]" in line
    assert f"{got['fid_diff']:+.2f} [{got['fid_diff_ci_low']:.2f}, {got['fid_diff_ci_high']:.2f}]" in line
    assert line.count("n.s.") == (0 if want.excludes_zero else 1)

    # rescoring from the kept features against the same reference gives the same numbers
    import types

    import ditcache.metrics.reference as reference
    from ditcache.bench.peers_fid import rescore_peers

    ref = types.SimpleNamespace(mu=np.zeros(16), sigma=np.eye(16), mu_s=np.zeros(16), sigma_s=np.eye(16), pool=None,
                                num_images=7, name="stand-in", precomputed=True)
    monkeypatch.setattr(reference, "get_reference", lambda *a, **k: ref)
    again = {r["spec"]: r for r in rescore_peers(rows, tmp_path / "features", bootstrap=50)}
    for spec in (NONE, specs[1]):
        for key in ("fid", "fid_ci_low", "fid_ci_high", "fid_diff", "fid_diff_ci_low", "fid_diff_ci_high"):
            assert again[spec].get(key) == pytest.approx(by[spec].get(key), rel=1e-6)
    assert again["diffusers:magcache"]["status"].startswith("not run")
