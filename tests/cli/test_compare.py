"""`ditcache compare`: same noise for every row, exact fidelity for the baseline, resumable."""

import json

import numpy as np
import pytest

from ditcache.bench.compare import table
from ditcache.cli.main import main
from ditcache.models.loading import save_model

from ..conftest import tiny_dit


@pytest.fixture
def model_file(tmp_path):
    return str(save_model(tiny_dit(depth=2, size=12, channels=1, classes=4), tmp_path / "tiny.safetensors"))


def run(capsys, model_file, out, *caches):
    args = ["compare", "--model", model_file, "--num-samples", "4", "--steps", "4", "--out", str(out), "--json"]
    for c in caches:
        args += ["--cache", c]
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


def test_rows_share_noise_and_the_baseline_is_exact(tmp_path, capsys, model_file):
    rows = run(capsys, model_file, tmp_path / "c", "none", "fora:interval=2", "rule:preset=rm-50")
    assert [r["spec"] for r in rows] == ["none", "fora:interval=2", "rule:preset=rm-50"]
    base = rows[0]
    # PSNR of identical images is infinite: strict JSON writes it as null, in --json and in compare.json
    assert base["psnr_vs_uncached"] is None and base["max_abs_error_vs_uncached"] == 0
    assert "Infinity" not in (tmp_path / "c" / "compare.json").read_text()
    assert base["compute_fraction"] == 1.0 and base["speedup"] == 1.0
    assert base["speed_repeats"] == 3 and rows[1]["speedup_min"] <= rows[1]["speedup"] <= rows[1]["speedup_max"]
    assert rows[2]["compute_fraction"] == pytest.approx(0.5)  # rm-50 at 4 steps reuses steps 1 and 3
    assert rows[2]["max_abs_error_vs_uncached"] > 0  # reusing half the steps changed the images


def test_resume_reuses_saved_rows(tmp_path, capsys, model_file):
    first = run(capsys, model_file, tmp_path / "c", "fora:interval=2")
    (tmp_path / "c" / "fora_interval=2" / "samples.npz").chmod(0o444)
    again = run(capsys, model_file, tmp_path / "c", "fora:interval=2")
    assert [r["sample_seconds"] for r in again] == [r["sample_seconds"] for r in first]  # nothing sampled again


def test_other_settings_refused_and_no_speed_without_repeats(tmp_path, capsys, model_file):
    run(capsys, model_file, tmp_path / "c", "fora:interval=2")
    code = main(["compare", "--model", model_file, "--num-samples", "4", "--steps", "5", "--out", str(tmp_path / "c"),
                 "--cache", "fora:interval=2"])
    assert code == 2 and capsys.readouterr().err.strip() == (
        f"ditcache compare: error: {tmp_path / 'c'} holds a comparison with other settings (steps); pass "
        "--overwrite to replace it, or use another --out folder")
    code = main(["compare", "--model", model_file, "--num-samples", "4", "--steps", "5", "--out", str(tmp_path / "c"),
                 "--cache", "fora:interval=2", "--overwrite", "--repeats", "0"])
    assert code == 0
    text = capsys.readouterr().out
    assert "speed-up not measured (--repeats 0)" in text and "x  " not in text.splitlines()[1]
    assert json.loads((tmp_path / "c" / "compare.json").read_text())[1]["speedup"] is None


def test_bad_spec_fails_before_sampling(tmp_path, capsys, model_file):
    code = main(["compare", "--model", model_file, "--out", str(tmp_path / "c"), "--cache", "fora:interval=x"])
    assert code == 2 and "interval" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


class StubExtractor:
    """Stands in for Inception: a fixed random projection of the pixels to 32-d "pool" / 24-d "spatial"."""

    preprocessing_key = "stub"

    def __init__(self, device="cpu", batch_size=50):
        self.device = device

    def features(self, images, progress=False):
        flat = np.asarray(images, np.float64).reshape(len(images), -1) / 255.0  # (N, H*W*C)
        rng = np.random.default_rng(0)
        return {"pool": flat @ rng.normal(size=(flat.shape[1], 32)),
                "spatial": flat @ rng.normal(size=(flat.shape[1], 24))}


def test_fid_added_later_reuses_samples_and_pairs_intervals(tmp_path, capsys, model_file, monkeypatch):
    from ditcache.metrics import inception

    monkeypatch.setenv("DITCACHE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(inception, "InceptionExtractor", StubExtractor)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (40, 12, 12), dtype=np.uint8))
    out = tmp_path / "c"
    base = ["compare", "--model", model_file, "--num-samples", "8", "--steps", "4", "--out", str(out), "--json",
            "--cache", "fora:interval=1", "--cache", "rule:preset=rm-50"]
    assert main(base) == 0
    first = json.loads(capsys.readouterr().out)
    assert all("fid" not in r for r in first)
    assert main(base + ["--fid", "--reference", str(ref), "--bootstrap", "50"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["sample_seconds"] for r in rows] == [r["sample_seconds"] for r in first]  # samples reused, metrics added
    none, same, rm50 = rows
    assert "fid_diff" not in none and none["fid_ci_low"] <= none["fid"] <= none["fid_ci_high"]
    # interval 1 reuses nothing: the same images as uncached, so the paired difference is exactly 0
    assert same["fid"] == none["fid"]
    assert (same["fid_diff"], same["fid_diff_ci_low"], same["fid_diff_ci_high"]) == (0.0, 0.0, 0.0)
    assert same["fid_diff_significant"] is False
    assert rm50["fid_diff"] == pytest.approx(rm50["fid"] - none["fid"])
    assert rm50["fid_diff_ci_low"] <= rm50["fid_diff"] <= rm50["fid_diff_ci_high"]
    assert rm50["fid_diff_significant"] == (rm50["fid_diff_ci_low"] > 0 or rm50["fid_diff_ci_high"] < 0)
    assert (out / "rule_preset=rm-50" / "features.npz").is_file()


def test_table_marks_intervals_and_non_significant_differences():
    rows = [{"spec": "none", "fid": 10.0, "fid_ci_low": 9.0, "fid_ci_high": 11.5},
            {"spec": "a", "fid": 10.5, "fid_ci_low": 9.4, "fid_ci_high": 11.9,
             "fid_diff": 0.5, "fid_diff_ci_low": -0.1, "fid_diff_ci_high": 1.2, "fid_diff_significant": False},
            {"spec": "b", "fid": 14.0, "fid_ci_low": 13.0, "fid_ci_high": 15.2,
             "fid_diff": 4.0, "fid_diff_ci_low": 3.1, "fid_diff_ci_high": 5.0, "fid_diff_significant": True}]
    lines = table(rows).splitlines()
    assert "10.00 [9.00, 11.50]" in lines[1] and lines[1].rstrip().endswith("-")
    assert "+0.50 [-0.10, 1.20] n.s." in lines[2]
    assert "+4.00 [3.10, 5.00]" in lines[3] and "n.s." not in lines[3]
