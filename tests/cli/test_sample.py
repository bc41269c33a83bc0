"""`ditcache sample` end to end on a tiny model file: outputs, JSON report, determinism, bad input."""

import json

import numpy as np
import torch
import pytest

from ditcache.cli.common import build_cache, cache_tag
from ditcache.cli.main import main
from ditcache.models.loading import save_model

from ..conftest import tiny_dit


@pytest.fixture
def model_file(tmp_path):
    model = tiny_dit(depth=2, hidden=32, heads=2, size=8, patch=2, channels=1, classes=4)
    return str(save_model(model, tmp_path / "tiny.safetensors", name="tiny"))


def run_sample(capsys, model_file, out, *extra):
    code = main(["sample", "--model", model_file, "--num-samples", "5", "--batch-size", "3", "--steps", "4",
                 "--out", str(out), "--json", *extra])
    assert code == 0
    return json.loads(capsys.readouterr().out)


def test_round_trip_writes_grid_npz_and_report(tmp_path, capsys, model_file):
    report = run_sample(capsys, model_file, tmp_path / "a", "--policy", "fora:interval=2", "--labels", "1,3")
    for key in ("model", "sampler", "steps", "cfg_scale", "policy", "num_samples", "seconds",
                "compute_fraction", "macs_ratio", "outputs"):
        assert key in report
    assert report["policy"] == {"name": "fora", "interval": 2}
    # 4 steps with FORA N=2 (count-down r = 3,2,1,0): r=3 full, r=2 full, r=1 reused, r=0 full
    assert report["compute_fraction"] == pytest.approx(3 / 4)
    assert 0.75 < report["macs_ratio"] < 1.0  # embeddings, adaLN and the final layer always run
    data = np.load(report["outputs"]["npz"])
    assert data["arr_0"].shape == (5, 8, 8, 1) and data["arr_0"].dtype == np.uint8
    assert data["labels"].tolist() == [1, 3, 1, 3, 1]
    assert (tmp_path / "a" / "grid.png").stat().st_size > 0
    assert json.loads((tmp_path / "a" / "report.json").read_text())["num_samples"] == 5


def test_same_seed_same_images_independent_of_batch_size(tmp_path, capsys, model_file):
    a = run_sample(capsys, model_file, tmp_path / "a", "--seed", "7")
    b = run_sample(capsys, model_file, tmp_path / "b", "--seed", "7", "--batch-size", "5")
    c = run_sample(capsys, model_file, tmp_path / "c", "--seed", "8")
    img = lambda r: np.load(r["outputs"]["npz"])["arr_0"]
    assert np.array_equal(img(a), img(b))
    assert not np.array_equal(img(a), img(c))


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "steps must be between"),
    (["--cfg-scale", "-1"], "cfg_scale must be"),
    (["--labels", "9"], "outside 0..3"),
    (["--labels", "a,b"], "comma-separated integers"),
    (["--policy", "fora:interval=0"], "positive integer"),
    (["--policy", "nope"], "unknown cache policy"),
    (["--policy", "rule:path=/no/such.json"], "does not exist"),
])
def test_bad_input_is_one_clear_error(tmp_path, capsys, model_file, args, message):
    code = main(["sample", "--model", model_file, "--num-samples", "2", "--steps", "4", "--out", str(tmp_path / "x"), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_missing_checkpoint_says_what_to_download(tmp_path, capsys):
    assert main(["sample", "--model", str(tmp_path / "DiT-XL-2-256x256.pt"), "--out", str(tmp_path / "x")]) == 2
    assert "dl.fbaipublicfiles.com" in capsys.readouterr().err


def test_an_unofficial_checkpoint_needs_num_heads(tmp_path, capsys):
    """An official-format .pt whose size is no official DiT: a one-line error naming --num-heads, then it runs."""
    import torch

    torch.save(tiny_dit(depth=2, hidden=32, heads=2, size=8, patch=2, channels=1, classes=4).state_dict(),
               tmp_path / "tiny.pt")
    args = ["sample", "--model", str(tmp_path / "tiny.pt"), "--num-samples", "2", "--steps", "2"]
    assert main([*args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--num-heads" in err and len(err.strip().splitlines()) == 1
    assert main([*args, "--num-heads", "2", "--out", str(tmp_path / "y"), "--json"]) == 0


def test_a_run_failing_after_the_claim_leaves_no_folder_and_does_not_block_the_fix(tmp_path, capsys, model_file):
    out = tmp_path / "x"
    # step 9 exists only in a run of 10+ steps: found when the policy is reset for the 4-step run
    code = main(["sample", "--model", model_file, "--num-samples", "2", "--steps", "4", "--out", str(out),
                 "--policy", "rule:steps=9"])
    assert code == 2 and "outside 0..3" in capsys.readouterr().err
    assert not out.exists()
    run_sample(capsys, model_file, out, "--policy", "rule:steps=2")


def test_other_settings_need_overwrite_and_a_finished_run_is_kept(tmp_path, capsys, model_file):
    out = tmp_path / "a"
    first = run_sample(capsys, model_file, out)
    before = (out / "samples.npz").read_bytes()
    code = main(["sample", "--model", model_file, "--num-samples", "5", "--batch-size", "3", "--steps", "4",
                 "--out", str(out), "--seed", "1"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"ditcache sample: error: {out} holds a sampling run with other settings (seed); pass --overwrite to "
        "replace it, or use another --out folder")
    assert (out / "samples.npz").read_bytes() == before
    assert run_sample(capsys, model_file, out)["seconds"] == first["seconds"]  # reused, not resampled
    assert run_sample(capsys, model_file, out, "--seed", "1", "--overwrite")["seed"] == 1


def test_nan_weights_stop_with_one_line_and_write_nothing(tmp_path, capsys):
    model = tiny_dit(depth=2, hidden=32, heads=2, size=8, patch=2, channels=1, classes=4)
    with torch.no_grad():
        model.blocks[1].mlp.fc2.bias.fill_(float("nan"))
    path = save_model(model, tmp_path / "nan.safetensors")
    code = main(["sample", "--model", str(path), "--num-samples", "2", "--steps", "4", "--out", str(tmp_path / "x")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sampling step 0 (timestep 999): the model output is non-finite" in err
    assert not (tmp_path / "x").exists()


def test_default_folder_names_are_one_safe_component_of_the_options_in_use(tmp_path, monkeypatch):
    policy, correctors = build_cache("rule:steps=1/3", ["goc:w=1.2"])
    assert cache_tag(policy, correctors) == "rule-steps1.3+goc-w1.2-branchesboth"  # no spaces, brackets or unused preset
    (tmp_path / "a b").mkdir()
    (tmp_path / "a b" / "[x].json").write_text(json.dumps({"num_steps": 4, "depth": 2, "schedule": [{"step": 1, "cached_attn": [0]}]}))
    monkeypatch.chdir(tmp_path)
    assert cache_tag(*build_cache("rule:path=a b/[x].json")) == "rule-patha_b_x_.json"
