"""`ditcache bench` runs end to end and reports MACs ratios that match the schedules (no timing asserts)."""

import json

import pytest

from ditcache.cli.main import main
from ditcache.models.loading import save_model

from ..conftest import tiny_dit


def test_bench_reports_both_models_with_exact_compute_fractions(tmp_path, capsys):
    model = str(save_model(tiny_dit(depth=2, size=8, channels=1, classes=4), tmp_path / "tiny.safetensors"))
    code = main(["bench", "--model", model, "--xl", "DiT-S/8", "--xl-steps", "8", "--steps", "8",
                 "--batch-size", "2", "--repeats", "1", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    for label in ("large", "small"):
        rows = {r["spec"]: r for r in out[label]["rows"]}
        assert list(rows) == ["bare", "none", "rule:preset=rm-25", "rule:preset=rm-50", "fora:interval=2",
                              "fora:interval=3"]
        assert rows["bare"]["speedup"] == 1.0
        assert rows["none"]["compute_fraction"] == 1.0 and rows["none"]["macs_ratio"] == 1.0
        # at 8 steps: rm-25 reuses steps {1, 3}; rm-50 {1, 3, 5, 7}; FORA N=2 reuses r in {5, 3, 1}
        assert rows["rule:preset=rm-25"]["compute_fraction"] == pytest.approx(6 / 8)
        assert rows["rule:preset=rm-50"]["compute_fraction"] == pytest.approx(4 / 8)
        assert rows["fora:interval=2"]["compute_fraction"] == pytest.approx(5 / 8)
        for r in rows.values():
            assert r["macs_bound"] == pytest.approx(1 / r["macs_ratio"])
    assert out["large"]["batch"] == 2  # one conditional + one unconditional sample


def test_bench_peers_runs_every_system_from_one_flag(tmp_path, capsys):
    model = str(save_model(tiny_dit(depth=2, size=12, channels=1, classes=4), tmp_path / "tiny.safetensors"))
    code = main(["bench", "--peers", "--model", model, "--steps", "6", "--num-samples", "2", "--batch-size", "2",
                 "--repeats", "1", "--timing-samples", "1", "--no-fid", "--json",
                 "--cache", "rule:preset=rm-50+forecast", "--cache", "diffusers:taylorseer:interval=2,warmup=1",
                 "--cache", "diffusers:magcache"])
    assert code == 0
    rows = {r["spec"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert list(rows) == ["none", "rule:preset=rm-50+forecast", "diffusers:taylorseer:interval=2,warmup=1",
                          "diffusers:magcache"]
    assert rows["none"]["speedup"] == 1.0
    # 6 steps: rm-50 reuses 1, 3, 5; TaylorSeer with warmup 1 and N = 2 computes 0, 2, 4
    assert rows["rule:preset=rm-50+forecast"]["compute_fraction"] == 0.5
    assert rows["diffusers:taylorseer:interval=2,warmup=1"]["compute_fraction"] == 0.5
    assert rows["diffusers:magcache"]["status"].startswith("not run")


def test_bench_times_the_caches_inside_a_saved_pipeline(pipeline_folders, capsys):
    code = main(["bench", "--model", str(pipeline_folders / "pixart"), "--prompt", "a photo of a cat", "--steps", "4",
                 "--height", "16", "--width", "16", "--cache", "fora:interval=2", "--cache", "rule:preset=rm-50",
                 "--repeats", "1", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["pipeline"], out["steps"], out["batch"], out["guidance_scale"]) == ("PixArtAlphaPipeline", 4, 1, 4.5)
    rows = {r["spec"]: r for r in out["rows"]}
    assert list(rows) == ["bare", "fora:interval=2", "rule:preset=rm-50"]
    assert rows["fora:interval=2"]["compute_fraction"] == pytest.approx(0.75)  # step 2 of 0..3 reused
    assert rows["rule:preset=rm-50"]["compute_fraction"] == pytest.approx(0.5)
    for r in rows.values():
        assert r["macs_bound"] == pytest.approx(1 / r["macs_ratio"])


def test_bench_pipeline_arguments_are_checked(pipeline_folders, tmp_path, capsys):
    model = str(pipeline_folders / "pixart")
    assert main(["bench", "--model", model, "--prompt", "a cat", "--pipeline", "pixart-alpha"]) == 2
    assert "does not combine" in capsys.readouterr().err
    assert main(["bench", "--model", model, "--steps", "2"]) == 2  # a text-to-image pipeline needs a prompt
    assert "give --prompt TEXT or --prompts FILE" in capsys.readouterr().err
    assert main(["bench", "--cfg-scale", "3", "--xl", "skip"]) == 2
    assert "--cfg-scale applies to --model PIPELINE" in capsys.readouterr().err
