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
    assert base["psnr_vs_uncached"] == float("inf") and base["max_abs_error_vs_uncached"] == 0
    assert base["compute_fraction"] == 1.0 and base["speedup"] == 1.0
    assert rows[2]["compute_fraction"] == pytest.approx(0.5)  # rm-50 at 4 steps reuses steps 1 and 3
    assert rows[2]["max_abs_error_vs_uncached"] > 0  # reusing half the steps changed the images


def test_resume_reuses_saved_rows(tmp_path, capsys, model_file):
    first = run(capsys, model_file, tmp_path / "c", "fora:interval=2")
    (tmp_path / "c" / "fora_interval=2" / "samples.npz").chmod(0o444)
    again = run(capsys, model_file, tmp_path / "c", "fora:interval=2")
    assert [r["seconds"] for r in again] == [r["seconds"] for r in first]  # nothing was sampled again


def test_bad_spec_fails_before_sampling(tmp_path, capsys, model_file):
    code = main(["compare", "--model", model_file, "--out", str(tmp_path / "c"), "--cache", "fora:interval=x"])
    assert code == 2 and "interval" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
