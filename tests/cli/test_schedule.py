"""`ditcache schedule`: text map, JSON and picture of any static policy's schedule."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ditcache.calibration.artifact import Artifact, ArtifactKey, save_artifact
from ditcache.cli.main import main
from ditcache.models.loading import save_model
from ditcache.policies.schedule import Schedule

from ..conftest import tiny_dit


def test_l2c_preset_as_text(capsys):
    assert main(["schedule", "--policy", "l2c:preset=dit-xl2-ddim20", "--depth", "28"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "dit-xl2-ddim20: 20 steps x 28 blocks, 22.1% of sub-layer calls reused"
    assert lines[1] == "step  " + "0123456789" * 2 + "01234567"
    assert lines[2 + 0] == "   0  " + "." * 28
    assert lines[2 + 1] == "   1  " + "#" * 28
    assert lines[2 + 13] == "  13  ." + "a" + "." * 26  # only block 1's attention
    assert len(lines) == 22


def test_json_round_trips_into_a_schedule(capsys):
    assert main(["schedule", "--policy", "rule:preset=rm-50", "--steps", "10", "--depth", "4", "--json"]) == 0
    schedule = Schedule.from_json(json.loads(capsys.readouterr().out))
    assert (schedule.num_steps, schedule.depth) == (10, 4)
    assert [i for i in range(10) if schedule.cached[i].all()] == [1, 3, 5, 7, 9]


def test_fora_png_has_two_panels(tmp_path, capsys):
    path = tmp_path / "maps" / "fora.png"
    assert main(["schedule", "--policy", "fora:interval=3", "--steps", "10", "--depth", "6", "--png", str(path)]) == 0
    assert "fora-3: 10 steps x 6 blocks" in capsys.readouterr().out
    image = np.asarray(Image.open(path).convert("L"))
    assert image.shape[1] > image.shape[0] * 0.8  # side by side panels, not a single column
    assert (image < 50).any() and (image > 200).any()  # dark reused cells on a light background


def test_depth_comes_from_the_model(tmp_path, capsys):
    model = save_model(tiny_dit(depth=5), tmp_path / "m.safetensors")
    assert main(["schedule", "--policy", "fora:interval=2", "--steps", "4", "--model", str(model)]) == 0
    assert "4 steps x 5 blocks" in capsys.readouterr().out


def test_router_without_a_model_shows_it_for_its_own_key(tmp_path, capsys):
    logits = torch.full((4, 4), 5.0)
    logits[3, 0] = -5.0
    path = save_artifact(Artifact("l2c-router", ArtifactKey("f00", "ddim", 4, 1.5, 8), {"logits": logits}),
                         tmp_path / "router")
    assert main(["schedule", "--policy", f"l2c:router={path}", "--steps", "4", "--depth", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1] == "   3  a." and "f00" in captured.err


@pytest.mark.parametrize("argv,message", [
    (["--policy", "l2c:preset=dit-xl2-ddim20", "--depth", "6"], "20 steps x 28 blocks"),
    (["--policy", "l2c:preset=dit-xl2-ddim50", "--depth", "28", "--steps", "20"], "50 steps x 28 blocks"),
    (["--policy", "nope", "--depth", "4"], "unknown cache policy"),
    (["--policy", "fora", "--model", "/no/such/model.pt"], "does not exist"),
])
def test_errors_are_one_line(argv, message, capsys):
    assert main(["schedule", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_readme_png_command_needs_no_depth(tmp_path, capsys):
    """`ditcache schedule --policy l2c:preset=dit-xl2-ddim20 --png l2c.png`: a preset carries its own size."""
    path = tmp_path / "l2c.png"
    assert main(["schedule", "--policy", "l2c:preset=dit-xl2-ddim50", "--png", str(path), "--json"]) == 0
    schedule = Schedule.from_json(json.loads(capsys.readouterr().out))
    assert (schedule.num_steps, schedule.depth) == (50, 28) and path.stat().st_size > 0
