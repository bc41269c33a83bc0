"""Forecast fit: the Gram sums give every forecast's squared error exactly, least squares recovers a
known weight, the fitted order and weight remove more error than the unfitted forecast on the
calibration data, and the sums are stored in (and only used with) the prior they were made for."""

import shutil

import numpy as np
import pytest
import torch

from ditcache.calibration.forecast_fit import (GramRecorder, best_order, error_left, fit_forecast_prior, fit_report,
                                               forecast_sums, increment_coefficients, pooled_sums, record_grams,
                                               stored_grams)
from ditcache.calibration.prior import load_prior
from ditcache.correctors.forecast import newton_increment
from ditcache.sampling.generate import SampleConfig
from ditcache.types import Branch, Kind, RunInfo, Site, StepInfo

from ..correctors.conftest import CFG, STEPS, loaded, prior_path  # noqa: F401 (fixtures)

A0 = Site(0, Branch.ATTN)


def feed(recorder, trajectory, rows=2):
    """Drive one site through an uncached run whose features are ``trajectory(s)`` (rows, N, C)."""
    steps = len(trajectory)
    recorder.reset(RunInfo(num_steps=steps, depth=1, num_tokens=3, cfg_scale=1.0))
    for s in range(steps):
        recorder.observe(StepInfo(s, steps), A0, Kind.COMPUTE, trajectory[s])
    recorder.end_batch()


def random_trajectory(steps=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 4, generator=g) for _ in range(steps)]


def test_gram_sums_give_the_forecast_errors_exactly():
    """err, num and den from the Gram equal the squared errors computed on the features themselves."""
    batches = [random_trajectory(seed=1), random_trajectory(seed=2)]
    recorder = GramRecorder()
    for trajectory in batches:
        feed(recorder, trajectory)
    assert recorder.count == 4
    gram = recorder.symmetric()["attn"][0].numpy()  # (S, S)
    t, steps = 7, [5, 3, 0]  # uneven points
    sums = forecast_sums(gram, t, steps, float)
    for m in (1, 2):
        for w in (1.0, 0.6):
            direct = 0.0
            for f in batches:
                at = [(float(s), f[s].double()) for s in steps[:m + 1]]
                pred = f[steps[0]].double() + w * newton_increment(at, float(t))
                direct += float(((f[t].double() - pred) ** 2).sum())
            assert error_left(sums, m, w) == pytest.approx(direct, rel=1e-10)
    plain = sum(float(((f[t].double() - f[steps[0]].double()) ** 2).sum()) for f in batches)
    assert error_left(sums, 0, 0.0) == pytest.approx(plain, rel=1e-10)


def test_coefficients_are_exact_on_a_polynomial():
    c = increment_coefficients([4.0, 2.0, 0.0], 5.0)  # quadratic through s = 4, 2, 0 evaluated at 5
    values = np.array([4.0, 2.0, 0.0]) ** 2
    assert values[0] + c @ values == pytest.approx(25.0)


def test_least_squares_recovers_a_known_weight_and_order():
    """Features on a line: order 1 with weight 1 is exact, so the fit picks order >= 1, w = 1, nothing
    left. Features whose change is 0.4 of the line's extrapolation: w = 0.4."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 3, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    recorder = GramRecorder()
    feed(recorder, [a + s * b for s in range(10)])
    gram = recorder.symmetric()["attn"][0].numpy()
    order, w, left = best_order(pooled_sums(gram, 5, [4, 2], "site", float))
    assert order == 1 and w == pytest.approx(1.0) and left == pytest.approx(0.0, abs=1e-12)
    # steps 0, 2, 4, ... on the line; odd steps move only 0.4 of the way from the even step before
    damped = [a + s * b if s % 2 == 0 else a + (s - 1 + 0.4) * b for s in range(10)]
    recorder = GramRecorder()
    feed(recorder, damped)
    gram = recorder.symmetric()["attn"][0].numpy()
    order, w, left = best_order(pooled_sums(gram, 5, [4, 2], "step", float))
    assert order == 1 and w == pytest.approx(0.4) and left == pytest.approx(0.0, abs=1e-12)


@pytest.fixture(scope="module")
def fitted_prior(loaded, prior_path, tmp_path_factory):
    """A copy of the tiny model's prior with a forecast fit on 4 uncached samples."""
    path = tmp_path_factory.mktemp("ffit") / "prior"
    shutil.copytree(prior_path, path)
    config = SampleConfig(num_samples=4, batch_size=2, steps=STEPS, cfg_scale=CFG, seed=5)
    report = fit_forecast_prior(loaded, path, config)
    assert report["K"] == 4 and report["branches"] == ["attn", "mlp"]
    return str(path), config


def test_fit_is_stored_in_the_prior_and_beats_the_unfitted_forecast_in_sample(loaded, fitted_prior):
    path, config = fitted_prior
    prior = load_prior(path)
    assert prior.artifact.meta["forecast_fit"]["K"] == 4 and "attn" in prior.artifact.tensors  # means kept
    grams = stored_grams(prior)
    assert grams["mlp"].shape == (3, STEPS, STEPS)
    again, count = record_grams(loaded, prior, config)  # same samples: the same sums
    np.testing.assert_allclose(again["attn"].numpy(), grams["attn"], rtol=1e-12)
    for row in fit_report(grams, grams, intervals=(2, 3)):
        removed = row["removed"]
        # per step, least squares over orders 0..2 with their weights is never worse than w = 1
        assert removed["fit=step"] >= max(removed["order 1"], removed["order 2"]) - 1e-12
        assert removed["fit=step"] >= removed["fit=site"] - 1e-12
        assert removed["fit=step"] > 0.0


def test_pooled_site_fit_is_least_squares_over_its_pool(fitted_prior):
    """fit=site minimises the error summed over every step where the pattern fits."""
    grams = stored_grams(load_prior(fitted_prior[0]))
    gram = grams["attn"][1]
    pool = pooled_sums(gram, 4, [2, 0], "site", float)  # offsets (2, 4): steps 4 and 5
    np.testing.assert_allclose(pool, forecast_sums(gram, 4, [2, 0], float) + forecast_sums(gram, 5, [3, 1], float))
    order, w, _ = best_order(pool)
    for m in (0, 1):
        for other in (w - 0.1, 1.0, w + 0.1):
            assert error_left(pool, order, w) <= error_left(pool, m, other if m else 0.0) + 1e-9


def test_a_prior_without_the_fit_and_a_bad_level_are_refused(prior_path):
    with pytest.raises(ValueError, match="calibrate forecast-fit"):
        stored_grams(load_prior(prior_path))
    with pytest.raises(ValueError, match="level"):
        pooled_sums(np.eye(3), 2, [1, 0], "branch", float)


def test_mean_grams_are_the_prior_means_gram_and_need_no_recorded_fit(loaded, prior_path):
    from ditcache.calibration.forecast_fit import mean_grams
    from ditcache.correctors.forecast import ForecastConfig, ForecastCorrector

    prior = load_prior(prior_path)
    grams = mean_grams(prior)
    x = prior.means["mlp"][:, 2].double().reshape(STEPS, -1)  # block 2: (S, H*N*C)
    np.testing.assert_allclose(grams["mlp"][2], (x @ x.T).numpy(), rtol=1e-12)
    corrector = ForecastCorrector(ForecastConfig(prior=prior_path, fit="site", on="mean"))
    corrector.reset(prior.run_info())  # no forecast-fit sums in this prior: the means are enough
    order, w = corrector.fitted_choice(4, Site(2, Branch.MLP), [2, 0])
    want = best_order(pooled_sums(grams["mlp"][2], 4, [2, 0], "site", float))
    assert (order, w) == (want[0], pytest.approx(want[1]))
    with pytest.raises(ValueError, match="on must be"):
        ForecastCorrector(ForecastConfig(prior=prior_path, fit="site", on="median"))
