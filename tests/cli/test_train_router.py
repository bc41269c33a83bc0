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
