"""`ditcache calibrate` on a tiny model file: prior extraction (and resuming it), GOC's statistic, EOC's plan,
and the correctors through `ditcache sample --corrector`."""

import json

import pytest
import torch

from ditcache.calibration.prior import load_prior
from ditcache.cli.main import main
from ditcache.models.loading import save_model

from ..conftest import tiny_dit

EXTRACT = ["--num-samples", "5", "--batch-size", "2", "--steps", "6"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    return str(save_model(tiny_dit(depth=2, size=8, channels=1, classes=4), path, name="tiny"))


@pytest.fixture(scope="module")
def prior(model_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("prior") / "prior"
    assert main(["calibrate", "eoc", "--model", model_file, *EXTRACT, "--out", str(out), "--json"]) == 0
    return str(out)


def calibrate(capsys, *args):
    code = main(["calibrate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_extraction_reports_size_and_cost(model_file, tmp_path, capsys):
    code, out, _ = calibrate(capsys, "eoc", "--model", model_file, *EXTRACT, "--out", str(tmp_path / "p"),
                             "--dtype", "float16", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["finished"] and report["K"] == 5 and report["dtype"] == "float16"
    assert report["shape"] == [6, 2, 2, 16, 32]  # (steps, blocks, CFG halves, tokens, channels)
    assert report["forwards"] == 30 and report["model_calls"] == 18 and report["seconds"] > 0
    assert report["bytes"] > 2 * 6 * 2 * 2 * 16 * 32 * 2  # the fp16 tensors plus the manifest
    prior = load_prior(tmp_path / "p")
    assert prior.artifact.meta["labels"] == [0, 1, 2, 3] and prior.key.steps == 6


def test_interrupted_and_resumed_equals_uninterrupted(model_file, prior, tmp_path, capsys):
    out = str(tmp_path / "p")
    code, text, _ = calibrate(capsys, "eoc", "--model", model_file, *EXTRACT, "--out", out, "--max-batches", "2")
    assert code == 0 and "stopped after 4 of 5 samples" in text
    assert not load_prior_or_none(out)
    code, text, _ = calibrate(capsys, "eoc", "--model", model_file, *EXTRACT, "--out", out, "--json")
    assert code == 0 and json.loads(text)["resumed_from"] == 4
    whole, resumed = load_prior(prior), load_prior(out)
    assert whole.key == resumed.key
    for branch in ("attn", "mlp"):
        assert torch.equal(whole.means[branch], resumed.means[branch])


def load_prior_or_none(path):
    try:
        return load_prior(path)
    except FileNotFoundError:
        return None


def test_resuming_with_other_settings_exits_2(model_file, tmp_path, capsys):
    out = str(tmp_path / "p")
    assert calibrate(capsys, "eoc", "--model", model_file, *EXTRACT, "--out", out, "--max-batches", "1")[0] == 0
    code, _, err = calibrate(capsys, "eoc", "--model", model_file, *EXTRACT, "--out", out, "--cfg-scale", "4")
    assert code == 2 and "cfg_scale" in err and "pass --overwrite to start again" in err


def test_a_finished_prior_is_reused_or_refused_never_replaced_silently(model_file, tmp_path, capsys):
    out = tmp_path / "p"
    assert calibrate(capsys, "eoc", "--model", model_file, *EXTRACT, "--out", str(out))[0] == 0
    before = (out / "tensors.safetensors").read_bytes()
    code, text, _ = calibrate(capsys, "eoc", "--model", model_file, *EXTRACT, "--out", str(out), "--json")
    assert code == 0 and json.loads(text)["reused"] is True
    fewer = [a if a != EXTRACT[EXTRACT.index("--num-samples") + 1] else "2" for a in EXTRACT]
    code, _, err = calibrate(capsys, "eoc", "--model", model_file, *fewer, "--out", str(out))
    assert code == 2 and err.strip() == (
        f"ditcache calibrate: error: {out} holds a finished prior made with other settings (num_samples: "
        f"{EXTRACT[EXTRACT.index('--num-samples') + 1]} there, 2 asked); pass --overwrite to replace it, or use "
        "another --out folder")
    assert (out / "tensors.safetensors").read_bytes() == before
    code, text, _ = calibrate(capsys, "eoc", "--model", model_file, *fewer, "--out", str(out), "--overwrite", "--json")
    assert code == 0 and json.loads(text)["K"] == 2


def test_goc_statistic_and_excluded_steps(prior, capsys):
    code, out, _ = calibrate(capsys, "goc", "--prior", prior, "--policy", "rule:preset=rm-50", "--json")
    assert code == 0
    report = json.loads(out)
    cos = report["cosine"]
    assert len(cos) == 6 and cos[0] is None and cos[-1] is None and all(-1 <= c <= 1 for c in cos[1:-1])
    assert report["inflections"] == [v for v in range(1, 5) if cos[v] < 0]
    assert report["excluded"] == sorted({t for v in report["inflections"] for t in (v, v + 1, v + 2) if t < 6})
    assert report["compensated"] == [t for t in (3, 5) if t not in report["excluded"]]
    code, out, _ = calibrate(capsys, "goc", "--prior", prior)
    assert code == 0 and "excluded steps" in out and len(out.splitlines()) == 1 + 6 + 2


def test_eoc_plan(prior, capsys):
    code, out, _ = calibrate(capsys, "eoc-plan", "--corrector", f"eoc:prior={prior},max_step=1", "--json")
    assert code == 0
    entries = json.loads(out)["entries"]
    assert [(e["step"], e["block"], e["optimised"]) for e in entries] == [
        (1, 0, True), (1, 1, True), (3, 0, False), (3, 1, False), (5, 0, False), (5, 1, False)]
    code, out, _ = calibrate(capsys, "eoc-plan", "--corrector", f"eoc:prior={prior}", "--policy", "fora:interval=2")
    assert code == 0 and "corrects" in out


def test_correctors_run_through_sample_specs(model_file, prior, tmp_path, capsys):
    base = ["sample", "--model", model_file, "--num-samples", "2", "--steps", "6", "--policy", "rule:preset=rm-50",
            "--json", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "a"), "--corrector", "goc:w=1.2",
                 "--corrector", f"eoc:prior={prior},gamma=0.01"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in report["correctors"]] == ["goc", "eoc"]
    assert main([*base, "--out", str(tmp_path / "b"), "--corrector", f"eoc:prior={prior},max_step=5",
                 "--corrector", "goc"]) == 2
    assert "goc must be the first corrector" in capsys.readouterr().err
    assert main([*base, "--steps", "4", "--out", str(tmp_path / "c"), "--corrector", f"eoc:prior={prior}"]) == 2
    assert "steps: artifact 6 vs run 4" in capsys.readouterr().err


def fit_a_copy(capsys, command, prior, model_file, tmp_path):
    """Run a fit command (eoc-fit, forecast-fit) on 3 samples into a copy of the shared prior:
    (the copy's path, the JSON report)."""
    import shutil

    path = str(tmp_path / "prior")
    shutil.copytree(prior, path)
    code, out, err = calibrate(capsys, command, "--prior", path, "--model", model_file, "--num-samples", "3", "--json")
    assert code == 0, err
    return path, json.loads(out)


def held_out_report(capsys, command, path, prior, model_file) -> str:
    """The fit's --holdout report on a fitted prior; on the shared, never-fitted prior it is refused."""
    code, out, _ = calibrate(capsys, command, "--prior", path, "--model", model_file, "--num-samples", "2",
                             "--seed", "7", "--holdout")
    assert code == 0 and "held-out samples" in out
    code, _, err = calibrate(capsys, command, "--prior", prior, "--model", model_file, "--holdout")
    assert code == 2 and f"calibrate {command}" in err  # the shared prior was never fitted
    return out


def test_eoc_fit_stores_gamma_and_scores_it_on_held_out_samples(model_file, prior, tmp_path, capsys):
    path, report = fit_a_copy(capsys, "eoc-fit", prior, model_file, tmp_path)
    assert report["K"] == 3 and not report["holdout"] and len(report["gamma_branch"]["mul"]) == 2
    names = [v["name"] for v in report["variants"]]
    assert names[0] == "paper mul γ=0.01" and "fit add per step" in names
    assert load_prior(path).artifact.meta["fit"]["seed"] == 1
    assert "fit mul per block" in held_out_report(capsys, "eoc-fit", path, prior, model_file)
    assert main(["sample", "--model", model_file, "--steps", "6", "--num-samples", "2", "--policy",
                 "rule:steps=1/3", "--corrector", f"eoc:prior={path},fit=branch", "--out", str(tmp_path / "s")]) == 0


def test_forecast_fit_stores_grams_and_scores_them_on_held_out_samples(model_file, prior, tmp_path, capsys):
    path, report = fit_a_copy(capsys, "forecast-fit", prior, model_file, tmp_path)
    assert report["K"] == 3 and not report["holdout"] and [r["interval"] for r in report["intervals"]] == [2, 3, 4]
    assert set(report["intervals"][0]["removed"]) == {"order 1", "order 2", "fit=site", "fit=step"}
    assert load_prior(path).artifact.meta["forecast_fit"]["seed"] == 1
    assert "fit=site" in held_out_report(capsys, "forecast-fit", path, prior, model_file)
    assert main(["sample", "--model", model_file, "--steps", "6", "--num-samples", "2", "--policy",
                 "fora:interval=2", "--corrector", f"forecast:prior={path},fit=site", "--out", str(tmp_path / "s")]) == 0


def test_reuse_cost_maps_and_ranks_a_router(model_file, tmp_path, capsys):
    router = tmp_path / "r"
    assert main(["train-router", "--model", model_file, "--steps", "6", "--data", "trajectories", "--trajectories",
                 "4", "--batch-size", "2", "--iterations", "2", "--out", str(router), "--no-progress"]) == 0
    normal = tmp_path / "n"  # the paper's N(0, 1) start
    assert main(["train-router", "--model", model_file, "--steps", "6", "--data", "trajectories", "--trajectories",
                 "4", "--batch-size", "2", "--iterations", "2", "--init", "normal", "--seed", "1",
                 "--out", str(normal), "--no-progress"]) == 0
    capsys.readouterr()
    cost = str(tmp_path / "cost")
    code, out, err = calibrate(capsys, "reuse-cost", "--model", model_file, "--steps", "6", "--trajectories", "3",
                               "--out", cost, "--router", str(router / "router"), "--router", str(normal / "router"),
                               "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["cost"][0] is None and len(report["cost"][1]) == 4  # 2 blocks x (attn, mlp)
    rows = report["routers"][str(router / "router")]
    # the default (ranked) router starts with every logit at 0: no initial ranking to correlate with
    assert [r["step"] for r in rows] == [1, 3, 5] and all(r["spearman_init"] is None for r in rows)
    # after 2 sign-descent updates from 0 its logits may still all be equal; the normal start's are not
    normal_rows = report["routers"][str(normal / "router")]
    assert all(-1 <= r["spearman_init"] <= 1 and -1 <= r["spearman_context"] <= 1 for r in normal_rows)
    agreement = report["agreement"][str(normal / "router")]
    assert [r["step"] for r in agreement] == [1, 3, 5] and all(r["spearman_init"] is None for r in agreement)
    code, out, _ = calibrate(capsys, "reuse-cost", "--cost", cost, "--model", model_file, "--trajectories", "2",
                             "--router", str(router / "router"), "--router", str(normal / "router"), "--no-progress")
    assert code == 0 and "vs cost  vs context  vs init" in out and "step  logits  inits" in out
    code, _, err = calibrate(capsys, "reuse-cost", "--model", model_file, "--steps", "4", "--trajectories", "2",
                             "--out", str(tmp_path / "c4"), "--router", str(router / "router"))
    assert code == 2 and "steps" in err and len(err.strip().splitlines()) == 1
