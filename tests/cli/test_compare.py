"""`ditcache compare`: same noise for every row, exact fidelity for the baseline, resumable."""

import json

import pytest

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
