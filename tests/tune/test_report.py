"""Held-out PSNR intervals of ``tune``: deterministic, around the estimate, paired over the same images."""

import numpy as np
import pytest

from ditcache.bench.compare import slug
from ditcache.images import save_npz
from ditcache.metrics.fidelity import psnr
from ditcache.tune.report import _role, add_psnr_intervals


@pytest.fixture
def folder(tmp_path):
    """A held-out comparison folder: uncached samples and two cached ones, the second 20% less wrong."""
    rng = np.random.default_rng(0)
    base = rng.integers(20, 236, (48, 12, 12, 1)).astype(np.float64)
    error = rng.normal(0, 1, base.shape) * rng.uniform(1, 8, (48, 1, 1, 1))
    for spec, images in (("none", base), ("fora:interval=3", base + error), ("rule:steps=1/3", base + 0.8 * error)):
        save_npz(tmp_path / slug(spec) / "samples.npz", np.clip(np.round(images), 0, 255).astype(np.uint8))
    return tmp_path


def rows(folder, *specs):
    with np.load(folder / "none" / "samples.npz") as d:
        base = d["arr_0"]
    out = []
    for spec in specs:
        with np.load(folder / slug(spec) / "samples.npz") as d:
            out.append({"spec": spec, "heldout_psnr_vs_uncached": float(psnr(d["arr_0"], base))})
    return out


def test_intervals_are_deterministic_and_contain_the_estimate(folder):
    a, b = rows(folder, "rule:steps=1/3", "fora:interval=3"), rows(folder, "rule:steps=1/3", "fora:interval=3")
    add_psnr_intervals(a, folder, 400)
    add_psnr_intervals(b, folder, 400)
    assert a == b
    for r in a:
        assert r["heldout_psnr_ci_low"] < r["heldout_psnr_vs_uncached"] < r["heldout_psnr_ci_high"]
    tuned = a[0]
    assert tuned["heldout_psnr_diff"] == pytest.approx(a[0]["heldout_psnr_vs_uncached"] - a[1]["heldout_psnr_vs_uncached"])
    assert tuned["heldout_psnr_diff_vs"] == "fora:interval=3"
    assert tuned["heldout_psnr_diff_ci_low"] < tuned["heldout_psnr_diff"] < tuned["heldout_psnr_diff_ci_high"]
    assert tuned["heldout_psnr_diff_significant"] and tuned["heldout_psnr_diff_ci_low"] > 0  # ~1.9 dB better on every image
    assert "heldout_psnr_diff" not in a[1]


def test_a_choice_that_is_the_preset_differs_from_it_by_exactly_zero(folder):
    (row,) = rows(folder, "fora:interval=3")
    add_psnr_intervals([row], folder, 200)
    assert (row["heldout_psnr_diff"], row["heldout_psnr_diff_ci_low"], row["heldout_psnr_diff_ci_high"]) == (0.0, 0.0, 0.0)
    assert not row["heldout_psnr_diff_significant"]


def test_without_a_preset_there_is_no_difference(folder):
    (row,) = rows(folder, "rule:steps=1/3")
    add_psnr_intervals([row], folder, 200, paired=False)
    assert "heldout_psnr_diff" not in row and row["heldout_psnr_ci_low"] < row["heldout_psnr_ci_high"]


def test_roles_say_when_the_target_was_not_met():
    chosen, preset = {"spec": "rule:steps=1/2"}, {"spec": "fora:interval=4"}
    assert [_role(s, chosen, preset) for s in ("rule:steps=1/2", "fora:interval=4")] == ["chosen", "best preset"]
    assert [_role(s, chosen, preset, met=False) for s in ("rule:steps=1/2", "fora:interval=4")] == \
        ["fastest", "fastest preset"]
    assert _role("fora:interval=4", preset, preset) == "chosen=preset"


def test_plot_labels_name_a_step_set_by_its_size():
    from ditcache.tune.report import short_name

    assert short_name("rule:steps=1/2/4/6+goc") == "rule:steps (4 reused)+goc"
    assert short_name("rule:steps=3/5") == "rule:steps (2 reused)"
    assert short_name("fora:interval=3") == "fora:interval=3"
