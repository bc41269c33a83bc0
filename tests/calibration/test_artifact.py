"""Artifacts round-trip and refuse to be used for settings they were not made for."""

import pytest
import torch

from ditcache.calibration.artifact import Artifact, ArtifactKey, load_artifact, save_artifact

KEY = ArtifactKey("abc123", "ddim", 20, 1.5, 28)


def test_round_trip(tmp_path):
    a = Artifact("eoc-prior", KEY, {"trend": torch.arange(6.0).view(2, 3)}, {"K": 10})
    save_artifact(a, tmp_path / "prior")
    b = load_artifact(tmp_path / "prior", "eoc-prior", KEY)
    assert torch.equal(b.tensors["trend"], a.tensors["trend"]) and b.meta == {"K": 10}
    save_artifact(Artifact("eoc-prior", KEY, {"trend": torch.zeros(1)}), tmp_path / "prior")  # overwrite
    assert torch.equal(load_artifact(tmp_path / "prior").tensors["trend"], torch.zeros(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prior"]  # no temporary folders left


@pytest.mark.parametrize("field,value", [("model_fingerprint", "other"), ("sampler", "ddpm"),
                                         ("steps", 50), ("cfg_scale", 4.0), ("resolution", 32)])
def test_other_settings_are_refused_naming_the_mismatch(tmp_path, field, value):
    save_artifact(Artifact("eoc-prior", KEY, {"t": torch.zeros(1)}), tmp_path / "p")
    run = ArtifactKey(**{**KEY.__dict__, field: value})
    with pytest.raises(ValueError, match=field):
        load_artifact(tmp_path / "p", "eoc-prior", run)


def test_wrong_kind_and_missing_path(tmp_path):
    save_artifact(Artifact("l2c-router", KEY, {"t": torch.zeros(1)}), tmp_path / "r")
    with pytest.raises(ValueError, match="not a 'eoc-prior'"):
        load_artifact(tmp_path / "r", "eoc-prior", KEY)
    with pytest.raises(FileNotFoundError, match="calibrate"):
        load_artifact(tmp_path / "nothing")


def test_a_damaged_artifact_is_one_clear_error(tmp_path):
    key = ArtifactKey("abc", "ddim", 4, 1.5, 8)
    path = save_artifact(Artifact("prior", key, {"attn": torch.zeros(3)}, {}), tmp_path / "a")
    tensors = path / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:20])
    with pytest.raises(ValueError, match="tensors.safetensors is missing or damaged .*; make the artifact again"):
        load_artifact(path)
