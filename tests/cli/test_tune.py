"""`ditcache tune` on the command line: strict JSON, a reusable result, one-line errors."""

import json

import pytest

from ditcache.cli.main import main
from ditcache.models.loading import save_model

from ..conftest import tiny_dit


@pytest.fixture
def model_file(tmp_path):
    return str(save_model(tiny_dit(depth=2, size=12, channels=1, classes=4), tmp_path / "tiny.safetensors"))


BASE = ["--num-samples", "4", "--steps", "6", "--repeats", "1", "--beam", "2", "--no-token-presets"]


def test_json_result_is_strict_and_its_artifact_samples(tmp_path, capsys, model_file):
    out = tmp_path / "t"
    assert main(["tune", "--model", model_file, *BASE, "--target-compute", "0.5", "--out", str(out), "--json"]) == 0
    text = capsys.readouterr().out
    result = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert result["chosen"] and result["heldout"][0]["spec"] == result["chosen"]
    sample_out = tmp_path / "s"
    assert main(["sample", "--model", model_file, "--num-samples", "2", "--steps", "6", "--out", str(sample_out),
                 "--policy", f"tuned:path={result['artifact']}"]) == 0
    capsys.readouterr()
    assert main(["sample", "--model", model_file, "--num-samples", "2", "--steps", "8", "--out", str(tmp_path / "s8"),
                 "--policy", f"tuned:path={result['artifact']}"]) == 2
    assert "steps: artifact 6 vs run 8" in capsys.readouterr().err


def test_table_names_the_choice_and_how_to_reuse_it(tmp_path, capsys, model_file):
    assert main(["tune", "--model", model_file, *BASE, "--target-compute", "0.6", "--out", str(tmp_path / "t")]) == 0
    text = capsys.readouterr().out
    assert "chosen: rule:" in text or "chosen: fora" in text
    assert ("best preset" in text or "chosen=preset" in text) and "--policy tuned:path=" in text


@pytest.mark.parametrize("extra, message", [([], "exactly one of"),
                                            (["--target-speedup", "0.5"], "--target-speedup must be above 1"),
                                            (["--target-compute", "0.5", "--max-configs", "0"], "--max-configs")])
def test_bad_input_is_one_line(tmp_path, capsys, model_file, extra, message):
    assert main(["tune", "--model", model_file, *BASE, "--out", str(tmp_path / "t"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "t").exists()


def test_unmet_target_exits_1_and_says_so(tmp_path, capsys, model_file, monkeypatch):
    from ditcache.tune import search as search_mod

    def fake(loaded, config, specs, out, name, options):
        return {s: {"speedup": 1.0 if s == "none" else 2.4 if name == "speed_model.json" else 2.0,
                    "macs_ratio": 1.0 if s == "none" else 0.5} for s in specs}

    monkeypatch.setattr(search_mod, "_timing", fake)
    assert main(["tune", "--model", model_file, *BASE, "--target-speedup", "2.5", "--out", str(tmp_path / "t")]) == 1
    text = capsys.readouterr().out
    assert "target not met: no configuration reached 2.5x as measured; the fastest" in text
    assert "nothing chosen, no artifact written" in text and "--policy tuned" not in text
    assert "fastest " in text


def test_table_shows_heldout_psnr_intervals(tmp_path, capsys, model_file):
    assert main(["tune", "--model", model_file, *BASE, "--target-compute", "0.5", "--bootstrap", "100",
                 "--out", str(tmp_path / "t")]) == 0
    text = capsys.readouterr().out
    assert "held PSNR [95% CI]" in text and "(paired bootstrap over the same held-out images)" in text
