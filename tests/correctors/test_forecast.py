"""Forecast: exact on polynomial features at real step distances, order 0 is reuse, GOC as a special
case, composition with static and token-wise policies, and its errors."""

import pytest
import torch

from ditcache.correctors.base import CORRECTORS
from ditcache.correctors.eoc import EocConfig, EocCorrector
from ditcache.correctors.forecast import ForecastConfig, ForecastCorrector, newton_increment
from ditcache.correctors.goc import GocConfig, GocCorrector
from ditcache.engine import CacheEngine
from ditcache.policies import make_policy
from ditcache.registry import parse_spec
from ditcache.correctors.base import Corrector
from ditcache.types import Branch, Kind, RunInfo, Site, StepInfo

from .conftest import run_steps

A0 = Site(0, Branch.ATTN)
COMPUTE, REUSE = Kind.COMPUTE, Kind.REUSE


def polynomial(coefficients, s):
    """sum_k c_k s^k for tensors c_k: a site whose feature is a polynomial in the step (float64)."""
    return sum(c * float(s) ** k for k, c in enumerate(coefficients))


def replay(corrector, reused_steps, feature, num_steps=12, timesteps=()):
    """Drive one site through ``num_steps`` steps as the engine does; return {reused step: output}."""
    corrector.reset(RunInfo(num_steps=num_steps, depth=1, num_tokens=3, timesteps=timesteps))
    outs, stored = {}, None
    for s in range(num_steps):
        info = StepInfo(s, num_steps)
        if s in reused_steps:
            out = outs[s] = corrector.correct(info, A0, stored)
            corrector.observe(info, A0, REUSE, out)
        else:
            stored = feature(s)
            corrector.observe(info, A0, COMPUTE, stored)
    return outs


def coefficients(order, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, 4, generator=g, dtype=torch.float64) for _ in range(order + 1)]


def test_newton_increment_is_exact_on_a_cubic_at_uneven_positions():
    c = coefficients(3)
    xs = [9.0, 5.0, 4.0, 0.0]
    points = [(x, polynomial(c, x)) for x in xs]
    for t in (10.0, 13.0, 2.5):
        got = points[0][1] + newton_increment(points, t)
        # float64 on values of size ~t^3 ~ 2e3: 1e-9 relative is ~1e4 ulps of headroom
        torch.testing.assert_close(got, polynomial(c, t), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("interval", [2, 3, 4])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_a_polynomial_site_is_forecast_exactly_by_its_order_at_any_interval(order, interval):
    c = coefficients(order, seed=order)
    reused = {s for s in range(16) if s % interval}
    outs = replay(ForecastCorrector(ForecastConfig(order=order)), reused, lambda s: polynomial(c, s), num_steps=16)
    # exact once order + 1 computed points exist: after computed step interval * order
    checked = [s for s in sorted(outs) if s > interval * order]
    assert checked
    for s in checked:
        torch.testing.assert_close(outs[s], polynomial(c, s), rtol=1e-9, atol=1e-9)
    if order >= 2:  # one order lower is not exact on the same features: the check can fail
        low = replay(ForecastCorrector(ForecastConfig(order=order - 1)), reused, lambda s: polynomial(c, s),
                     num_steps=16)
        assert max(float((low[s] - polynomial(c, s)).abs().max()) for s in checked) > 1e-3


def test_early_steps_fall_back_to_the_orders_the_history_allows():
    c = coefficients(1)
    outs = replay(ForecastCorrector(ForecastConfig(order=3)), {1, 3, 4}, lambda s: polynomial(c, s), num_steps=5)
    assert torch.equal(outs[1], polynomial(c, 0))  # one point: plain reuse
    torch.testing.assert_close(outs[3], polynomial(c, 3), rtol=1e-12, atol=1e-12)  # two points: a line
    torch.testing.assert_close(outs[4], polynomial(c, 4), rtol=1e-12, atol=1e-12)


def test_order_zero_is_the_stored_feature_itself():
    c = coefficients(2)
    corrector = ForecastCorrector(ForecastConfig(order=0))
    corrector.reset(RunInfo(num_steps=4, depth=1, num_tokens=3))
    a, b = polynomial(c, 0), polynomial(c, 1)
    corrector.observe(StepInfo(0, 4), A0, COMPUTE, a)
    corrector.observe(StepInfo(1, 4), A0, COMPUTE, b)
    assert corrector.correct(StepInfo(2, 4), A0, b) is b


def test_w_scales_the_correction_and_max_span_stops_it():
    c = coefficients(1)
    line = lambda s: polynomial(c, s)  # noqa: E731
    half = replay(ForecastCorrector(ForecastConfig(order=1, w=0.5)), {4, 5, 6}, line, num_steps=7)
    for s in (4, 5, 6):  # F_3 + 0.5 (F_s - F_3)
        torch.testing.assert_close(half[s], line(3) + 0.5 * (line(s) - line(3)), rtol=1e-12, atol=1e-12)
    capped = replay(ForecastCorrector(ForecastConfig(order=1, max_span=2)), {4, 5, 6}, line, num_steps=7)
    torch.testing.assert_close(capped[5], line(5), rtol=1e-12, atol=1e-12)
    assert torch.equal(capped[6], line(3))  # 3 steps past the newest point: plain reuse


def test_timestep_axis_is_exact_on_uneven_timesteps():
    timesteps = (999.0, 900.0, 700.0, 650.0, 400.0, 380.0, 100.0, 0.0)
    c = coefficients(2)
    feature = lambda s: polynomial(c, timesteps[s] / 1000)  # noqa: E731
    by_time = replay(ForecastCorrector(ForecastConfig(order=2, axis="timestep")), {3, 5, 7}, feature,
                     num_steps=8, timesteps=timesteps)
    for s in (5, 7):
        torch.testing.assert_close(by_time[s], feature(s), rtol=1e-9, atol=1e-9)
    by_step = replay(ForecastCorrector(ForecastConfig(order=2)), {3, 5, 7}, feature, num_steps=8)
    assert float((by_step[7] - feature(7)).abs().max()) > 1e-3  # the step axis is not exact here


def test_used_history_order_one_is_goc_bit_for_bit(loaded):
    """Where GOC's queue and a 'used' history coincide (every step allowed), order 1 with weight w
    is GOC's Q0 + w (Q0 - Q1) to the bit, through the engine on a real model."""
    for policy in (("rule", {"preset": "rm-50"}), ("fora", {"interval": 3})):
        with CacheEngine(loaded.module, make_policy(policy[0], **policy[1]), [GocCorrector(GocConfig(w=1.2))]) as e:
            goc = run_steps(loaded, e)
        spec = ForecastConfig(order=1, w=1.2, history="used")
        with CacheEngine(loaded.module, make_policy(policy[0], **policy[1]), [ForecastCorrector(spec)]) as e:
            ours = run_steps(loaded, e)
        for x, y in zip(goc, ours):
            assert torch.equal(x, y)
        with CacheEngine(loaded.module, make_policy(policy[0], **policy[1])) as e:
            assert not torch.equal(run_steps(loaded, e)[-1], ours[-1])  # and the correction does act


def test_composes_with_a_token_wise_policy(loaded):
    """ToCa's partial steps feed the history; its reuse steps are forecast."""
    toca = ("toca", {"interval": 3, "ratio": 0.5})
    with CacheEngine(loaded.module, make_policy(toca[0], **toca[1])) as engine:
        plain = run_steps(loaded, engine)
    with CacheEngine(loaded.module, make_policy(toca[0], **toca[1]),
                     [ForecastCorrector(ForecastConfig(order=1))]) as engine:
        forecast = run_steps(loaded, engine)
        assert engine.report()["compute_fraction"] < 1.0
    assert torch.equal(plain[0], forecast[0])  # nothing to forecast at the first step
    assert not torch.equal(plain[-1], forecast[-1])


def test_a_corrector_before_forecast_is_refused(loaded, prior_path):
    eoc = EocCorrector(EocConfig(prior=prior_path))
    with CacheEngine(loaded.module, make_policy("rule", preset="rm-50"),
                     [eoc, ForecastCorrector(ForecastConfig())]) as engine:
        with pytest.raises(ValueError, match="forecast must be the first corrector"):
            run_steps(loaded, engine)


def test_memory_leaves_out_the_tensor_the_engine_stores():
    c = coefficients(2)
    corrector = ForecastCorrector(ForecastConfig(order=2))
    replay(corrector, {3}, lambda s: polynomial(c, s).float(), num_steps=4)
    assert corrector.memory_bytes() == 2 * 12 * 4  # points at steps 1 and 0; step 2's is the stored one


def test_spec_and_validation():
    c = parse_spec(CORRECTORS, "forecast:order=3,w=0.8,history=used,axis=timestep,max_span=4")
    assert c.config == ForecastConfig(order=3, w=0.8, history="used", axis="timestep", max_span=4)
    for bad, message in [({"order": 5}, "order"), ({"order": -1}, "order"), ({"w": float("nan")}, "w"),
                         ({"history": "all"}, "history"), ({"axis": "sigma"}, "axis"), ({"max_span": -1}, "max_span")]:
        with pytest.raises(ValueError, match=message):
            ForecastCorrector(ForecastConfig(**bad))
    with pytest.raises(ValueError, match="distinct"):
        newton_increment([(1.0, torch.zeros(1)), (1.0, torch.ones(1))], 2.0)


# -- order and weight fitted on a prior (calibrate forecast-fit) -------------------------------------
@pytest.fixture(scope="module")
def fitted(loaded, prior_path, tmp_path_factory):
    """A copy of the tiny model's prior with a forecast fit on 4 uncached samples, and those samples' config."""
    import shutil

    from ditcache.calibration.forecast_fit import fit_forecast_prior
    from ditcache.sampling.generate import SampleConfig

    path = tmp_path_factory.mktemp("forecast-fit") / "prior"
    shutil.copytree(prior_path, path)
    config = SampleConfig(num_samples=4, batch_size=2, steps=6, cfg_scale=1.5, seed=5)
    fit_forecast_prior(loaded, path, config)
    return str(path), config


class Trajectories(Corrector):
    """Keeps every feature of uncached runs: [{(step, site): (rows, N, C)} per batch]."""

    def __init__(self):
        self.batches = [{}]

    def observe(self, step, site, kind, used):
        self.batches[-1][(step.index, site)] = used

    def end_batch(self):
        self.batches.append({})


def open_loop_error(corrector, batches, reused, sites):
    """Squared error of ``corrector``'s prediction at the ``reused`` steps, fed the true features."""
    total = 0.0
    for features in batches:
        for site in sites:
            feature = lambda s: features[(s, site)]  # noqa: E731
            run = corrector.run
            corrector.reset(run)
            stored = None
            for s in range(run.num_steps):
                info = StepInfo(s, run.num_steps)
                if s in reused:
                    out = corrector.correct(info, site, stored)
                    total += float(((out.double() - feature(s).double()) ** 2).sum())
                    corrector.observe(info, site, REUSE, out)
                else:
                    stored = feature(s)
                    corrector.observe(info, site, COMPUTE, stored)
    return total


def test_fitted_order_and_weight_reduce_the_error_on_the_calibration_data(loaded, fitted):
    from ditcache.calibration.eoc_fit import record_uncached
    from ditcache.calibration.prior import load_prior

    path, config = fitted
    recorder = Trajectories()
    record_uncached(loaded, recorder, config)
    batches = [b for b in recorder.batches if b]
    run = load_prior(path).run_info()
    sites = [Site(b, br) for b in range(3) for br in (Branch.ATTN, Branch.MLP)]
    errors = {}
    for name, spec in [("plain", ForecastConfig(order=0)), ("order 1", ForecastConfig(order=1)),
                       ("order 2", ForecastConfig(order=2)), ("site", ForecastConfig(order=2, prior=path, fit="site")),
                       ("step", ForecastConfig(order=2, prior=path, fit="step"))]:
        corrector = ForecastCorrector(spec)
        corrector.reset(run)
        errors[name] = open_loop_error(corrector, batches, {1, 3, 5}, sites)
    # per step, the least-squares order and weight are at least as good as order 0, 1 or 2 at w = 1
    assert errors["step"] <= min(errors["plain"], errors["order 1"], errors["order 2"]) * (1 + 1e-9)
    assert errors["step"] < errors["order 2"]
    # and the open-loop error through the corrector is the one the Gram sums predict
    from ditcache.calibration.forecast_fit import error_left, forecast_sums, stored_grams

    grams = stored_grams(load_prior(path))
    choice = ForecastCorrector(ForecastConfig(order=2, prior=path, fit="step"))
    choice.reset(run)
    predicted = 0.0
    for site in sites:
        for t, steps in [(1, [0]), (3, [2, 0]), (5, [4, 2, 0])]:
            m, w = choice.fitted_choice(t, site, steps) if len(steps) > 1 else (0, 0.0)
            predicted += error_left(forecast_sums(grams[site.branch.value][site.block], t, steps, float), m, w)
    assert errors["step"] == pytest.approx(predicted, rel=1e-6)


def test_fit_none_is_todays_forecast_bit_for_bit(loaded, fitted):
    path, _ = fitted
    outs = []
    for spec in (ForecastConfig(), ForecastConfig(prior=path, fit="none")):
        with CacheEngine(loaded.module, make_policy("fora", interval=3), [ForecastCorrector(spec)]) as engine:
            outs.append(run_steps(loaded, engine))
    assert all(torch.equal(x, y) for x, y in zip(*outs))
    with CacheEngine(loaded.module, make_policy("fora", interval=3),
                     [ForecastCorrector(ForecastConfig(prior=path, fit="site"))]) as engine:
        site_fit = run_steps(loaded, engine)
    assert not torch.equal(site_fit[-1], outs[0][-1])  # the fit does act


def test_fit_is_refused_for_another_setting_and_without_a_fit(fitted, prior_path):
    import dataclasses

    from ditcache.calibration.prior import load_prior

    path, _ = fitted
    run = load_prior(path).run_info()
    for other in (dataclasses.replace(run, num_steps=8), dataclasses.replace(run, cfg_scale=4.0),
                  dataclasses.replace(run, fingerprint="0" * 16)):
        with pytest.raises(ValueError, match="other settings"):
            ForecastCorrector(ForecastConfig(prior=path, fit="site")).reset(other)
    with pytest.raises(ValueError, match="calibrate forecast-fit"):
        ForecastCorrector(ForecastConfig(prior=prior_path, fit="site")).reset(load_prior(prior_path).run_info())
    for bad, message in [({"fit": "branch", "prior": path}, "fit must be"), ({"fit": "site"}, "prior=PATH"),
                         ({"fit": "site", "prior": path, "history": "used"}, "history=computed")]:
        with pytest.raises(ValueError, match=message):
            ForecastCorrector(ForecastConfig(**bad))
    parsed = parse_spec(CORRECTORS, f"forecast:prior={path},fit=site,order=3")
    assert parsed.config == ForecastConfig(order=3, prior=path, fit="site")
