"""`ditcache eval` end to end on a few real MNIST digits, and its one-line errors."""

import json

import numpy as np
import pytest

from ditcache.cli.main import main
from ditcache.data.mnist import load_mnist

KEYS = {"fid", "fid_ci_low", "fid_ci_high", "sfid", "precision", "recall", "num_samples", "num_reference",
        "is_classifier", "class_accuracy"}


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
    assert result["fid_ci_low"] < result["fid"] < result["fid_ci_high"] and result["bootstrap"] == 1000
    assert "inception_score" not in result and "is" not in result  # no logits: no number called IS
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


class StubExtractor:
    """Stands in for Inception (CLI-level test): fixed random projections of the pixels, 64-d
    "pool" and 48-d "spatial" (small, so the Fréchet distances are cheap; the layout is the same)."""

    preprocessing_key = "stub"
    device = "cpu"

    def __init__(self, device="cpu", batch_size=50):
        pass

    def features(self, images, progress=False):
        flat = np.asarray(images, np.float64).reshape(len(images), -1) / 255.0  # (N, H*W*C)
        rng = np.random.default_rng(0)
        return {"pool": flat @ rng.normal(size=(flat.shape[1], 64)),
                "spatial": flat @ rng.normal(size=(flat.shape[1], 48))}


def test_adm_reference_batch(tmp_path, monkeypatch, capsys):
    """An ADM-layout reference (arr_0 + mu/sigma/mu_s/sigma_s): FID/sFID against the stored
    statistics, precision/recall against arr_0, no Inception Score."""
    from ditcache.metrics import inception
    from ditcache.metrics.fid import features_to_stats, frechet_distance
    from ditcache.metrics.precision_recall import precision_recall

    monkeypatch.setenv("DITCACHE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(inception, "InceptionExtractor", StubExtractor)
    rng = np.random.default_rng(3)
    samples = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    ref_images = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    stored = StubExtractor().features(rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8))  # "all of ImageNet"
    mu, sigma = features_to_stats(stored["pool"])
    mu_s, sigma_s = features_to_stats(stored["spatial"])
    ref_path = tmp_path / "VIRTUAL_tiny_labeled.npz"
    np.savez(ref_path, arr_0=ref_images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    np.savez(tmp_path / "samples.npz", arr_0=samples)

    code = main(["eval", str(tmp_path / "samples.npz"), "--reference", str(ref_path), "--json", "--bootstrap", "20"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    feats = StubExtractor().features(samples)
    expected_fid = frechet_distance(*features_to_stats(feats["pool"]), mu, sigma)
    expected_sfid = frechet_distance(*features_to_stats(feats["spatial"]), mu_s, sigma_s)
    assert result["fid"] == pytest.approx(expected_fid, rel=1e-9)  # the file's statistics, not arr_0's
    assert result["sfid"] == pytest.approx(expected_sfid, rel=1e-9)
    assert result["reference_stats"] == "precomputed" and result["num_reference"] == 10
    assert (result["precision"], result["recall"]) == precision_recall(StubExtractor().features(ref_images)["pool"],
                                                                       feats["pool"])
    assert not any(k.startswith("is") or "inception_score" in k for k in result)
    assert result["fid_ci_low"] <= result["fid"] <= result["fid_ci_high"] and result["bootstrap"] == 20


def test_table_shows_the_interval_and_bad_bootstrap_fails(tmp_path, monkeypatch, capsys):
    from ditcache.metrics import inception

    monkeypatch.setenv("DITCACHE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(inception, "InceptionExtractor", StubExtractor)
    rng = np.random.default_rng(4)
    np.savez(tmp_path / "s.npz", arr_0=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    np.savez(tmp_path / "r.npz", arr_0=rng.integers(0, 256, (9, 8, 8, 3), dtype=np.uint8))
    assert main(["eval", str(tmp_path / "s.npz"), "--reference", str(tmp_path / "r.npz"), "--bootstrap", "30"]) == 0
    out = capsys.readouterr().out
    assert "95% bootstrap interval" in out and "fid_ci_low" not in out
    assert main(["eval", str(tmp_path / "s.npz"), "--bootstrap", "1"]) == 2
    assert "--bootstrap" in capsys.readouterr().err


def test_inception_score_only_with_the_logits_matrix(tmp_path, monkeypatch, capsys):
    """--inception-logits adds inception_score, the evaluator's IS of the pool features."""
    from ditcache.metrics import inception, inception_score

    monkeypatch.setenv("DITCACHE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(inception, "InceptionExtractor", StubExtractor)
    weights = np.random.default_rng(5).normal(size=(64, 10))  # stands in for (2048, 1008)
    monkeypatch.setattr(inception_score, "load_logits_weights", lambda path: weights)
    rng = np.random.default_rng(6)
    samples = rng.integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=samples)
    np.savez(tmp_path / "r.npz", arr_0=rng.integers(0, 256, (9, 8, 8, 3), dtype=np.uint8))
    args = ["eval", str(tmp_path / "s.npz"), "--reference", str(tmp_path / "r.npz"), "--json", "--bootstrap", "0"]
    assert main(args + ["--inception-logits", "w.npy"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = inception_score.evaluator_inception_score(StubExtractor().features(samples)["pool"], weights)
    assert result["inception_score"] == pytest.approx(expected, rel=1e-12)
    assert result["fid_ci_low"] is None and result["bootstrap"] == 0
    assert main(args) == 0
    assert "inception_score" not in json.loads(capsys.readouterr().out)
    monkeypatch.undo()
    assert main(args + ["--inception-logits", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth" in capsys.readouterr().err


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
