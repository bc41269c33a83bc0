"""`ditcache eval` end to end on a few real MNIST digits, and its one-line errors."""

import json

import numpy as np
import pytest

from ditcache.cli.main import main
from ditcache.data.mnist import load_mnist

KEYS = {"fid", "sfid", "precision", "recall", "num_samples", "num_reference", "is_classifier", "class_accuracy"}


def test_round_trip_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DITCACHE_CACHE", str(tmp_path / "cache"))
    images, labels = load_mnist()
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=np.repeat(images[-8:, ..., None], 3, axis=-1), labels=labels[-8:])
    code = main(["eval", str(samples), "--json", "--reference-limit", "12", "--batch-size", "10"])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out)  # exactly one JSON object
    assert KEYS <= set(result)
    assert result["num_samples"] == 8 and result["num_reference"] == 12
    assert result["fid"] > 0 and 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert result["class_accuracy"] >= 0.875  # real digits, so the classifier knows them
    assert 1.0 <= result["is_classifier"] <= 10.0
    assert list((tmp_path / "cache" / "reference").glob("mnist_28px_*_first12.npz"))


def test_missing_path_exits_2_with_a_message(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing.npz")]) == 2
    err = capsys.readouterr().err
    assert "ditcache eval: error:" in err and "nothing.npz" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["empty_folder", "wrong_keys"])
def test_bad_input_exits_2(tmp_path, capsys, kind):
    if kind == "empty_folder":
        path = tmp_path / "empty"
        path.mkdir()
    else:
        path = tmp_path / "wrong.npz"
        np.savez(path, images=np.zeros((4, 8, 8, 3), np.uint8))
    assert main(["eval", str(path)]) == 2
    assert "error:" in capsys.readouterr().err


def test_help_lists_eval(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "--reference" in capsys.readouterr().out
