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


def test_a_negative_reference_limit_is_refused(tmp_path, capsys):
    path = tmp_path / "s.npz"
    np.savez(path, arr_0=np.zeros((4, 28, 28), np.uint8))
    assert main(["eval", str(path), "--reference-limit", "-5"]) == 2
    assert capsys.readouterr().err == "ditcache eval: error: --reference-limit must be at least 1, got -5\n"


@pytest.mark.parametrize("write,message", [
    (lambda p: p.write_bytes(b"not a zip"), "is not a .npz: not a zip archive"),
    (lambda p: (np.savez(p, arr_0=np.zeros((4, 28, 28), np.uint8)), p.write_bytes(p.read_bytes()[:300])),
     "is not a .npz: not a zip archive"),
    (lambda p: np.savez(p, arr_0=np.zeros((4, 64, 64, 3), np.uint8)),
     "samples are 64x64, the reference mnist is 28x28: evaluate against a reference of the samples' own size"),
    (lambda p: np.savez(p, arr_0=np.zeros((4, 28, 28), np.uint8), labels=np.array([0, 3, 10, 12])),
     "labels [10, 12] are outside the reference's classes 0..9"),
])
def test_unusable_samples_are_one_line_before_any_feature_is_computed(tmp_path, capsys, monkeypatch, write, message):
    monkeypatch.setenv("DITCACHE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "s.npz"
    write(path)
    assert main(["eval", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "cache").exists()
