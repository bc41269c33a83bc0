"""Prior extraction: the mean of every site per CFG half, fp16 storage, resuming after a crash."""

import dataclasses

import pytest
import torch

import ditcache.calibration.prior as prior_module
from ditcache.calibration.artifact import ArtifactKey, artifact_bytes
from ditcache.calibration.prior import extract_prior, load_prior
from ditcache.sampling.generate import SampleConfig, generate

from ..correctors.conftest import tiny_loaded

CONFIG = SampleConfig(num_samples=5, batch_size=2, steps=4, cfg_scale=1.5, seed=0)


@pytest.fixture(scope="module")
def loaded():
    torch.set_num_threads(1)
    return tiny_loaded()


def hooked_means(loaded, config):
    """Written apart from the engine: forward hooks on every attn / mlp, averaged in float64."""
    outputs = {}
    hooks = []
    for l, block in enumerate(loaded.module.blocks):
        for branch in ("attn", "mlp"):
            store = outputs.setdefault((l, branch), [])
            hooks.append(getattr(block, branch).register_forward_hook(lambda m, i, o, s=store: s.append(o)))
    try:
        generate(loaded, config)
    finally:
        for h in hooks:
            h.remove()
    sizes = [len(range(i, min(i + config.batch_size, config.num_samples)))
             for i in range(0, config.num_samples, config.batch_size)]
    means = {}
    for branch in ("attn", "mlp"):
        per_step = []
        for t in range(config.steps):
            blocks = []
            for l in range(len(loaded.module.blocks)):
                calls = outputs[(l, branch)][t::config.steps]  # one (2b, N, C) per batch
                cond = torch.cat([o[:b] for o, b in zip(calls, sizes)]).double()  # (K, N, C)
                uncond = torch.cat([o[b:] for o, b in zip(calls, sizes)]).double()  # (K, N, C)
                blocks.append(torch.stack([cond.mean(0), uncond.mean(0)]))  # (2, N, C)
            per_step.append(torch.stack(blocks))
        means[branch] = torch.stack(per_step)  # (S, L, 2, N, C)
    return means


def test_prior_is_the_per_half_mean_of_every_site(loaded, tmp_path):
    result = extract_prior(loaded, CONFIG, tmp_path / "p")
    prior = load_prior(result.path, ArtifactKey.for_run(loaded, "ddim", 4, 1.5))
    reference = hooked_means(loaded, dataclasses.replace(CONFIG, labels=(0, 1, 2, 3, 4)))
    assert prior.shape == (4, 3, 2, 16, 32)
    for branch in ("attn", "mlp"):
        # the same float32 features summed in float64 in another order, then rounded to float32:
        # at most one float32 rounding step apart
        torch.testing.assert_close(prior.means[branch], reference[branch].float(), rtol=2 ** -23, atol=1e-30)
    meta = prior.artifact.meta
    assert meta["K"] == 5 and meta["labels"] == [0, 1, 2, 3, 4] and meta["seed"] == 0
    assert result.report["forwards"] == 5 * 4 and result.report["model_calls"] == 3 * 4
    assert result.report["bytes"] == artifact_bytes(result.path)
    assert not (result.path / "partial").exists()


def test_no_guidance_keeps_one_half(loaded, tmp_path):
    result = extract_prior(loaded, dataclasses.replace(CONFIG, cfg_scale=1.0, num_samples=2), tmp_path / "p")
    assert load_prior(result.path).shape == (4, 3, 1, 16, 32)


def test_float16_halves_the_size_and_keeps_the_trend(loaded, tmp_path):
    p32 = load_prior(extract_prior(loaded, CONFIG, tmp_path / "a").path)
    p16 = load_prior(extract_prior(loaded, CONFIG, tmp_path / "b", dtype="float16").path)
    assert p16.means["attn"].dtype == torch.float16
    assert artifact_bytes(tmp_path / "b") < 0.55 * artifact_bytes(tmp_path / "a")  # + a ~1 kB manifest
    u16 = 2.0 ** -11  # float16 unit roundoff
    for branch in ("attn", "mlp"):
        for t, s in [(1, 0), (2, 1), (3, 2), (3, 1)]:
            for l in range(3):
                t32, t16 = p32.trend(branch, l, t, s), p16.trend(branch, l, t, s)
                m = p32.means[branch]
                # each fp16 mean is the float64 mean rounded once (relative error <= 2^-11, or 2^-25
                # absolute below the normal range), the fp32 one likewise with 2^-24; the trends'
                # subtractions in float32 add at most 2^-24 |T| each
                bound = (u16 + 2 ** -24) * (m[t, l].abs() + m[s, l].abs()) * 1.001 + 2 ** -24 + 2 ** -23 * t32.abs()
                assert ((t16 - t32).abs() <= bound).all()
                assert not torch.equal(t16, t32)  # fp16 did round: the bound is what is tested


def test_a_crash_resumes_to_the_same_artifact(loaded, tmp_path, monkeypatch):
    whole = load_prior(extract_prior(loaded, CONFIG, tmp_path / "whole").path)
    calls = []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return generate(*args, **kwargs)

    monkeypatch.setattr(prior_module, "generate", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        extract_prior(loaded, CONFIG, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "partial" / "manifest.json").is_file()
    monkeypatch.setattr(prior_module, "generate", generate)
    result = extract_prior(loaded, CONFIG, tmp_path / "resumed")
    assert result.report["resumed_from"] == 2 and result.report["model_calls"] == 3 * 4
    resumed = load_prior(result.path)
    for branch in ("attn", "mlp"):
        assert torch.equal(resumed.means[branch], whole.means[branch])
    assert resumed.artifact.meta["K"] == 5
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["manifest.json", "tensors.safetensors"]


def test_resuming_with_other_settings_is_refused(loaded, tmp_path):
    extract_prior(loaded, CONFIG, tmp_path / "p", max_batches=1)
    with pytest.raises(ValueError, match="seed: partial 0 vs now 1"):
        extract_prior(loaded, dataclasses.replace(CONFIG, seed=1), tmp_path / "p")
    with pytest.raises(ValueError, match="steps"):
        extract_prior(loaded, dataclasses.replace(CONFIG, steps=5), tmp_path / "p")
