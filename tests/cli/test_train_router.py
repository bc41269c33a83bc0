"""`ditcache train-router` end to end on tiny models, in one process and in two (gloo)."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from ditcache.calibration.artifact import load_artifact
from ditcache.calibration.train_router import RouterConfig, RouterTrainer, TrajectoryStates, data_seed
from ditcache.cli.main import main
from ditcache.models.loading import load_model, save_model

from ..conftest import tiny_dit


@pytest.fixture
def tiny28(tmp_path):
    """A tiny pixel model of MNIST's shape (1 x 28 x 28, 10 classes), 16 tokens."""
    return str(save_model(tiny_dit(size=28, patch=7, channels=1, classes=10), tmp_path / "tiny28.safetensors"))


@pytest.fixture
def tiny8(tmp_path):
    return str(save_model(tiny_dit(), tmp_path / "tiny8.safetensors"))


def test_images_mode_trains_a_router_that_sampling_accepts(tmp_path, tiny28, capsys):
    out = tmp_path / "run"
    code = main(["train-router", "--model", tiny28, "--steps", "6", "--batch-size", "4", "--iterations", "3",
                 "--checkpoint-every", "2", "--out", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["iterations"] == 3 and summary["router"] == str(out / "router")
    meta = summary["meta"]
    assert (meta["l1"], meta["lr"], meta["penalty"], meta["optimizer"], meta["step_draw"], meta["data"]) == (
        1e-3, 0.15, "l2", "sign", "all", "images")  # the "ranked" recipe
    artifact = load_artifact(out / "router", "l2c-router")
    assert artifact.tensors["logits"].shape == (6, 6) and artifact.key.resolution == 28
    assert (out / "checkpoint.pt").is_file() and len((out / "train_log.csv").read_text().splitlines()) == 3

    policy = f"l2c:router={out / 'router'}"
    assert main(["sample", "--model", tiny28, "--steps", "6", "--num-samples", "2", "--policy", policy,
                 "--out", str(tmp_path / "s"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["policy"]["name"] == "l2c" and report["compute_fraction"] <= 1.0
    assert main(["sample", "--model", tiny28, "--steps", "8", "--num-samples", "2", "--policy", policy,
                 "--out", str(tmp_path / "s2")]) == 2
    assert "steps: artifact 6 vs run 8" in capsys.readouterr().err
    assert main(["schedule", "--model", tiny28, "--steps", "6", "--policy", policy]) == 0
    assert "6 steps x 3 blocks" in capsys.readouterr().out


def test_the_paper_recipe_stays_reachable(tmp_path, tiny28, capsys):
    out = tmp_path / "paper"
    assert main(["train-router", "--model", tiny28, "--steps", "6", "--recipe", "paper", "--batch-size", "4",
                 "--iterations", "1", "--out", str(out), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)["meta"]
    assert (meta["l1"], meta["lr"], meta["penalty"], meta["optimizer"], meta["step_draw"], meta["logit_bound"],
            meta["lr_final"]) == (5e-6, 1e-3, "l1", "adamw", "one", 5.0, 1.0)
    with pytest.raises(SystemExit):  # argparse refuses an unknown recipe with its one-line usage error
        main(["train-router", "--model", tiny28, "--recipe", "nope", "--out", str(out)])


def test_images_mode_refuses_a_model_mnist_does_not_fit(tmp_path, tiny8, capsys):
    assert main(["train-router", "--model", tiny8, "--steps", "6", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--data trajectories" in err and len(err.strip().splitlines()) == 1


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["train-router", "--help"])
    text = capsys.readouterr().out
    for option in ("--data", "--l1", "--lr", "--batch-size", "--iterations", "--checkpoint-every", "torchrun",
                   "--recipe", "--penalty", "--optimizer", "--step-draw", "--logit-bound", "--lr-final"):
        assert option in text


def _worker(rank, argv, port):
    """One torchrun-like process: the environment torchrun sets, then the command itself."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    code = main(argv)
    if code != 0:
        raise SystemExit(code)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_average_their_gradients(tmp_path, tiny8):
    out = tmp_path / "ddp"
    argv = ["train-router", "--model", tiny8, "--steps", "6", "--data", "trajectories", "--trajectories", "3",
            "--batch-size", "4", "--lr", "0.1", "--iterations", "2", "--out", str(out), "--no-progress"]
    # fork: the children share this process's imports, so two processes start in well under a second
    mp.start_processes(_worker, args=(argv, _free_port()), nprocs=2, start_method="fork")
    artifact = load_artifact(out / "router", "l2c-router")
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["world"] == 2 and len(state["gens"]) == 2 and not torch.equal(*state["gens"])
    assert artifact.meta["processes"] == 2 and artifact.meta["iterations"] == 2

    # the same two iterations by hand in one process: each rank's draws, gradients summed, halved
    loaded = load_model(tiny8, vae=None)
    config = RouterConfig(steps=6, data="trajectories", trajectories=3, batch_size=4, lr=0.1, iterations=2)
    trainer = RouterTrainer(loaded, config, tmp_path / "by-hand")
    trainer.batch = 2
    gens = [torch.Generator().manual_seed(data_seed(0, rank)) for rank in (0, 1)]
    pools = [TrajectoryStates(loaded, 6, 3, 0, rank) for rank in (0, 1)]
    for _ in range(2):
        trainer.opt.zero_grad(set_to_none=True)
        for gen, pool in zip(gens, pools):
            trainer.gen, trainer.states = gen, pool
            trainer.local_step()
        for p in trainer.router.logits:
            if p.grad is not None:
                p.grad /= 2
        for group in trainer.opt.param_groups:
            group["lr"] = trainer.learning_rate()
        trainer.opt.step()
        trainer.router.clamp_(config.logit_bound)
        trainer.iteration += 1
    torch.testing.assert_close(artifact.tensors["logits"], trainer.router.stacked(), rtol=1e-6, atol=1e-7)
    assert not torch.equal(artifact.tensors["logits"], RouterTrainer(loaded, config, tmp_path / "x").router.stacked())


def test_a_router_trains_on_a_text_to_image_pipeline_folder_with_prompts(tmp_path, pipeline_folders, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\na red car on the beach\n")
    model = str(pipeline_folders / "pixart")
    out = tmp_path / "run"
    common = ["--model", model, "--steps", "4", "--cfg-scale", "4.5", "--height", "16", "--width", "16"]
    train = ["train-router", *common, "--prompts", str(prompts), "--batch-size", "2", "--lr-final", "1",
             "--out", str(out), "--json"]
    assert main([*train, "--iterations", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["key"]["sampler"].startswith("DPMSolverMultistepScheduler-") and summary["key"]["resolution"] == 16
    assert summary["key"]["cfg_scale"] == 4.5 and summary["key"]["steps"] == 4
    assert summary["meta"]["prompts"] == ["a photo of a cat", "a red car on the beach"]
    assert summary["meta"]["branches"] == ["attn", "mlp", "cross"]
    assert main([*train, "--iterations", "2"]) == 0  # resumes from its checkpoint
    assert json.loads(capsys.readouterr().out)["iterations"] == 2
    assert len((out / "train_log.csv").read_text().splitlines()) == 3
    artifact = load_artifact(out / "router", "l2c-router")
    assert artifact.tensors["logits"].shape == (4, 6)

    policy = f"l2c:router={out / 'router'},threshold=0.5"
    sample = ["sample", *common, "--prompt", "a red car", "--num-samples", "1", "--policy", policy, "--json",
              "--no-progress"]
    assert main([*sample, "--out", str(tmp_path / "s")]) == 0
    assert json.loads(capsys.readouterr().out)["policy"]["name"] == "l2c"
    # refused, by name, for another step count and another scheduler
    assert main([*sample[:4], "6", *sample[5:], "--out", str(tmp_path / "s6")]) == 2
    assert "steps: artifact 4 vs run 6" in capsys.readouterr().err
    assert main([*sample, "--scheduler", "ddim", "--out", str(tmp_path / "sd")]) == 2
    assert "sampler: artifact 'DPMSolverMultistepScheduler-" in capsys.readouterr().err


def test_a_pipeline_router_refuses_image_data_and_needs_prompts(tmp_path, pipeline_folders, capsys):
    model = str(pipeline_folders / "pixart")
    assert main(["train-router", "--model", model, "--prompt", "a cat", "--data", "images",
                 "--out", str(tmp_path / "a")]) == 2
    assert "no image dataset" in capsys.readouterr().err
    assert main(["train-router", "--model", model, "--steps", "4", "--out", str(tmp_path / "b")]) == 2
    assert "give --prompt TEXT or --prompts FILE" in capsys.readouterr().err


def test_a_class_conditional_pipeline_trains_with_its_chosen_scheduler(tmp_path, pipeline_folders, capsys):
    out = tmp_path / "run"
    assert main(["train-router", "--model", str(pipeline_folders / "dit"), "--scheduler", "dpm++", "--steps", "4",
                 "--batch-size", "1", "--iterations", "1", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["key"]["sampler"].startswith("DPMSolverMultistepScheduler-")
    assert summary["meta"]["branches"] == ["attn", "mlp"] and summary["meta"]["pipeline"] == "DiTPipeline"
