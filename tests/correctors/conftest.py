"""Shared pieces of the corrector tests: a tiny loaded model, its prior, and a recorded sampling loop."""

import pytest
import torch

from ditcache.calibration.artifact import Artifact, ArtifactKey, save_artifact
from ditcache.calibration.prior import PRIOR_KIND, extract_prior
from ditcache.correctors.base import Corrector
from ditcache.models.loading import LoadedModel, fingerprint
from ditcache.sampling.generate import SampleConfig
from ditcache.sampling.loops import sample

from ..conftest import tiny_dit

STEPS = 6
CFG = 1.5


def tiny_loaded(seed=0) -> LoadedModel:
    """The conftest tiny DiT (3 blocks, 16 tokens, 32 channels, 5 classes) as a loaded pixel model."""
    module = tiny_dit(seed=seed)
    return LoadedModel(module=module, family="dit", name="tiny", image_size=8, latent_size=8, in_channels=4,
                       num_classes=5, null_class=5, learn_sigma=True, guided_channels=None, vae=None,
                       fingerprint=fingerprint(module))


@pytest.fixture(scope="module")
def loaded():
    torch.set_num_threads(1)
    return tiny_loaded()


@pytest.fixture(scope="module")
def prior_path(loaded, tmp_path_factory):
    """A real prior of the tiny model: K = 4 uncached DDIM-6 samples with CFG 1.5."""
    out = tmp_path_factory.mktemp("prior") / "prior"
    config = SampleConfig(num_samples=4, batch_size=4, steps=STEPS, cfg_scale=CFG, seed=0)
    return str(extract_prior(loaded, config, out).path)


def run_steps(loaded, engine, steps=STEPS, cfg=CFG, batch=2, seed=3):
    """DDIM with CFG through the engine; returns the model's output (2B, 8, 8, 8) at every step."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 4, 8, 8, generator=g)
    labels = torch.randint(0, 5, (batch,), generator=g)
    outs = []

    def model_fn(x, t, y):
        out = loaded.forward(x, t, y)
        outs.append(out)
        return out

    if engine is not None:
        engine.describe_model(loaded.fingerprint, loaded.image_size)
    sample(model_fn, noise, labels, sampler="ddim", num_steps=steps, cfg_scale=cfg, null_class=loaded.null_class,
           learn_sigma=True, hooks=engine)
    if engine is not None:
        engine.end_run()
    return outs


class Spy(Corrector):
    """Records what passes through it at every reuse: {(step, site): tensor}."""

    name = "spy"

    def __init__(self):
        self.seen = {}

    def correct(self, step, site, cached):
        self.seen[(step.index, site)] = cached
        return cached


KEY = ArtifactKey("f" * 16, "ddim", 5, 1.5, 8)


def save_prior(path, attn, mlp, key=KEY):
    """A hand-made prior artifact with means attn, mlp of shape (S, L, H, N, C)."""
    save_artifact(Artifact(PRIOR_KIND, key, {"attn": attn, "mlp": mlp}, {"K": 1}), path)
    return str(path)


def run_for(key=KEY, depth=1, tokens=1):
    """The RunInfo of a run that matches ``key``."""
    from ditcache.types import RunInfo

    return RunInfo(num_steps=key.steps, depth=depth, num_tokens=tokens, sampler=key.sampler,
                   cfg_scale=key.cfg_scale, fingerprint=key.model_fingerprint, resolution=key.resolution)
