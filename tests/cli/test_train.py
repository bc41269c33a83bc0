"""`ditcache train`: exported models carry their own name; an export is never replaced by another training."""

import gzip

import numpy as np
import pytest

from ditcache.cli.main import main
from ditcache.data import mnist
from ditcache.models.loading import load_model


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    images = np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8)
    header_i = np.array([2051, 8, 28, 28], ">i4").tobytes()
    header_l = np.array([2049, 8], ">i4").tobytes()
    (folder / mnist.IMAGES_FILE).write_bytes(gzip.compress(header_i + images.tobytes()))
    (folder / mnist.LABELS_FILE).write_bytes(gzip.compress(header_l + bytes(range(8))))
    return str(folder)


def train(data, out, *extra):
    return main(["train", "--data", data, "--iterations", "2", "--hidden-size", "16", "--depth", "1",
                 "--num-heads", "2", "--batch-size", "2", "--out", str(out), "--no-progress", *extra])


def test_export_is_named_after_its_file_and_not_replaced_by_another_training(tmp_path, data, capsys):
    export = tmp_path / "digits-small.safetensors"
    assert train(data, tmp_path / "run", "--export", str(export)) == 0
    assert load_model(str(export)).name == "digits-small"
    before = export.read_bytes()
    assert train(data, tmp_path / "run2", "--export", str(export), "--seed", "1") == 2
    assert capsys.readouterr().err.strip().endswith(
        "exists and was not made by this training; pass --overwrite to replace it, or export elsewhere")
    assert export.read_bytes() == before and not (tmp_path / "run2").exists()
    assert train(data, tmp_path / "run", "--export", str(export), "--name", "mnist") == 2
    assert "is the built-in model's name" in capsys.readouterr().err


def test_other_settings_in_the_run_folder_need_overwrite(tmp_path, data, capsys):
    assert train(data, tmp_path / "run") == 0
    assert train(data, tmp_path / "run", "--lr", "0.01") == 2
    assert "pass --overwrite to start again" in capsys.readouterr().err
    assert train(data, tmp_path / "run", "--lr", "0.01", "--overwrite") == 0


def test_a_non_finite_loss_stops_training_before_the_update(tmp_path, data, capsys):
    assert train(data, tmp_path / "run", "--lr", "inf") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training iteration 2: the loss is nan; stopped before the update" in err


def test_a_damaged_checkpoint_is_one_line_with_the_way_out(tmp_path, data, capsys):
    assert train(data, tmp_path / "run", "--checkpoint-every", "1") == 0
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"\x80\x04truncated")
    assert train(data, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint.pt is damaged" in err and "pass --overwrite to start again" in err
