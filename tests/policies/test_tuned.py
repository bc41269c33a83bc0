"""``tuned:path=DIR`` replays what `ditcache tune` chose, correctors included, and only for its settings."""

import numpy as np
import torch
import pytest

from ditcache.bench.compare import parse_cache
from ditcache.calibration.artifact import Artifact, ArtifactKey, save_artifact
from ditcache.engine import CacheEngine
from ditcache.models.loading import load_model, save_model
from ditcache.sampling.generate import SampleConfig, generate
from ditcache.tune.report import TUNED_KIND

from ..conftest import tiny_dit


@pytest.fixture
def loaded(tmp_path):
    return load_model(str(save_model(tiny_dit(depth=2, size=12, channels=1, classes=4), tmp_path / "tiny.safetensors")))


def tuned(tmp_path, loaded, spec, steps=6):
    key = ArtifactKey.for_run(loaded, "ddim", steps, 1.5)
    return str(save_artifact(Artifact(TUNED_KIND, key, {"changes": torch.zeros(steps)}, {"spec": spec}),
                             tmp_path / "tuned"))


def sample(loaded, spec, steps=6):
    policy, correctors = parse_cache(spec)
    with CacheEngine(loaded.module, policy, correctors) as engine:
        return generate(loaded, SampleConfig(num_samples=3, steps=steps), engine=engine)


def test_tuned_policy_samples_exactly_its_configuration(tmp_path, loaded):

    path = tuned(tmp_path, loaded, "rule:steps=2/4+goc")
    policy, correctors = parse_cache(f"tuned:path={path}")
    assert [c.name for c in correctors] == ["goc"]
    direct, replay = sample(loaded, "rule:steps=2/4+goc"), sample(loaded, f"tuned:path={path}")
    assert np.array_equal(direct.images, replay.images)
    assert replay.report["compute_fraction"] == direct.report["compute_fraction"] < 1
    assert [c["name"] for c in replay.report["correctors"]] == ["goc"]  # the engine ran the tuned corrector


def test_tuned_policy_refuses_another_step_count(tmp_path, loaded):
    path = tuned(tmp_path, loaded, "fora:interval=2", steps=6)
    with pytest.raises(ValueError, match="steps: artifact 6 vs run 8"):
        sample(loaded, f"tuned:path={path}", steps=8)


def test_tuned_needs_a_path_and_an_artifact(tmp_path):
    with pytest.raises(ValueError, match="needs path"):
        parse_cache("tuned")
    with pytest.raises(FileNotFoundError):
        parse_cache(f"tuned:path={tmp_path}")
