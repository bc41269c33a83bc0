"""EOC γ fit: recovers a γ that is known in closed form, stores its sums in the prior, and scores variants exactly."""

import pytest
import torch

from ditcache.calibration.eoc_fit import (FitRecorder, fit_prior, fit_report, fitted_gamma, has_fit, removed_share,
                                          stored_sums)
from ditcache.calibration.prior import load_prior
from ditcache.sampling.generate import SampleConfig
from ditcache.types import Branch, Kind, Site, StepInfo

from ..correctors.conftest import run_for, save_prior


def linear_prior(tmp_path, steps=5):
    """S=5, L=2, H=2, N=3, C=4 with random means, so every trend T = P[t] - P[t-1] is non-zero."""
    g = torch.Generator().manual_seed(0)
    attn, mlp = torch.randn(steps, 2, 2, 3, 4, generator=g), torch.randn(steps, 2, 2, 3, 4, generator=g)
    return save_prior(tmp_path / "p", attn, mlp)


def feed(recorder, prior, gamma, mode, noise=0.0, rows=3, seed=1):
    """Features with F_t = C ⊙ (1 + γT) (mul) or C + γT (add), plus noise orthogonal to nothing in particular."""
    g = torch.Generator().manual_seed(seed)
    steps, depth = prior.shape[:2]
    recorder.reset(run_for(prior.key, depth=depth, tokens=3))
    for site in [Site(b, br) for b in range(depth) for br in (Branch.ATTN, Branch.MLP)]:
        feat = torch.randn(2 * rows, 3, 4, generator=g)  # (H*B, N, C), cond rows first
        recorder.observe(StepInfo(0, steps), site, Kind.COMPUTE, feat)
        for t in range(1, steps):
            trend = prior.trend(site.branch.value, site.block, t, t - 1).repeat_interleave(rows, 0)  # (H*B, N, C)
            feat = feat * (1 + gamma * trend) if mode == "mul" else feat + gamma * trend
            feat = feat + noise * torch.randn(feat.shape, generator=g)
            recorder.observe(StepInfo(t, steps), site, Kind.COMPUTE, feat)
    recorder.end_batch()


@pytest.mark.parametrize("mode,gamma", [("mul", -0.37), ("add", 0.46)])
def test_fit_recovers_a_known_gamma_and_removes_all_the_error(tmp_path, mode, gamma):
    prior = load_prior(linear_prior(tmp_path))
    recorder = FitRecorder(prior)
    feed(recorder, prior, gamma, mode)
    for level in ("branch", "block", "step"):
        fitted = fitted_gamma(recorder.sums, mode, level)
        assert fitted.shape == (2, 5, 2)
        # the features follow the model exactly: least squares returns γ up to float32 feature rounding
        torch.testing.assert_close(fitted[:, 1:], torch.full((2, 4, 2), gamma, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)
        assert removed_share(recorder.sums, mode, fitted, [1, 2, 3, 4]) == pytest.approx(1.0, abs=1e-9)
    assert recorder.count == 3


def test_fit_with_noise_is_the_least_squares_solution(tmp_path):
    """With noise, γ* = <D, T⊙C> / |T⊙C|² per site: checked against torch.linalg.lstsq on the same data."""
    prior = load_prior(linear_prior(tmp_path))
    recorder = FitRecorder(prior)
    feed(recorder, prior, 0.2, "mul", noise=0.5)
    # redo site (block 1, MLP), step 3 by hand with the same draws
    g = torch.Generator().manual_seed(1)
    feats = {}
    for site in [Site(b, br) for b in range(2) for br in (Branch.ATTN, Branch.MLP)]:
        feat = torch.randn(6, 3, 4, generator=g)
        for t in range(1, 5):
            prev = feat
            trend = prior.trend(site.branch.value, site.block, t, t - 1).repeat_interleave(3, 0)
            feat = feat * (1 + 0.2 * trend) + 0.5 * torch.randn(feat.shape, generator=g)
            feats[(site, t)] = (prev, feat, trend)
    c, f, trend = feats[(Site(1, Branch.MLP), 3)]
    x = (trend * c).double().reshape(-1, 1)
    d = (f - c).double().reshape(-1, 1)
    expected = torch.linalg.lstsq(x, d).solution.item()
    assert fitted_gamma(recorder.sums, "mul", "step")[1, 3, 1].item() == pytest.approx(expected, rel=1e-6)
    share = removed_share(recorder.sums, "mul", 0.0, [1, 2, 3, 4])
    assert share == 0.0  # γ = 0 leaves the error as it is


def test_fit_prior_stores_the_sums_and_the_corrector_uses_them(tmp_path):
    from ditcache.correctors.eoc import EocConfig, EocCorrector

    from ..correctors.conftest import CFG, STEPS, tiny_loaded
    from ditcache.calibration.prior import extract_prior

    loaded = tiny_loaded()
    config = SampleConfig(num_samples=4, batch_size=4, steps=STEPS, cfg_scale=CFG, seed=0)
    path = str(extract_prior(loaded, config, tmp_path / "prior").path)
    assert not has_fit(load_prior(path))
    with pytest.raises(ValueError, match="calibrate eoc-fit"):
        EocCorrector(EocConfig(prior=path, fit="branch")).reset(load_prior(path).run_info())
    report = fit_prior(loaded, path, SampleConfig(num_samples=3, batch_size=3, steps=STEPS, cfg_scale=CFG, seed=5))
    prior = load_prior(path)
    assert has_fit(prior) and prior.artifact.meta["fit"]["K"] == 3 and "attn" in prior.artifact.tensors
    sums = stored_sums(prior)
    eoc = EocCorrector(EocConfig(prior=path, fit="block"))
    eoc.reset(prior.run_info())
    want = fitted_gamma(sums, "mul", "block")
    assert eoc.gamma(Site(2, Branch.MLP), 3) == pytest.approx(float(want[1, 3, 2]))
    assert report["gamma_branch"]["mul"] == pytest.approx(fitted_gamma(sums, "mul", "branch")[:, 1, 0].tolist())
    assert EocCorrector(EocConfig(prior=path)).config.gamma == 0.01  # the paper's γ stays the default
    rows = {r["name"]: r for r in fit_report(sums, sums)}
    # in-sample, the per-step fit is optimal for every (branch, step, block), so it removes the most
    assert rows["fit mul per step"]["all"] >= rows["fit mul per block"]["all"] >= rows["fit mul per branch"]["all"]
    with pytest.raises(ValueError, match="eoc fit must be"):
        EocCorrector(EocConfig(prior=path, fit="site"))
