"""Tests of adjointhydro.metrics against hand computations on tiny arrays."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from adjointhydro import metrics as M

# Tiny example used throughout: obs mean 2.5, sim mean 3.
OBS = np.array([1.0, 2.0, 3.0, 4.0])
SIM = np.array([2.0, 2.0, 3.0, 5.0])
# errors s - o            : 1, 0, 0, 1        -> SSE = 2, sum(s - o) = 2
# obs deviations (o - 2.5): -1.5 -.5 .5 1.5  -> SST = 2.25+.25+.25+2.25 = 5, var_o = 5/4
# sim deviations (s - 3)  : -1 -1 0 2        -> sum sq = 6, var_s = 6/4
# cross products          : 1.5 + .5 + 0 + 3 = 5
R_HAND = 5 / math.sqrt(5 * 6)
ALPHA_HAND = math.sqrt(1.5 / 1.25)
BETA_HAND = 3 / 2.5


def test_nse_by_hand() -> None:
    assert M.nse(OBS, SIM) == pytest.approx(1 - 2 / 5)


def test_rmse_pbias_by_hand() -> None:
    assert M.rmse(OBS, SIM) == pytest.approx(math.sqrt(2 / 4))
    assert M.pbias(OBS, SIM) == pytest.approx(100 * 2 / 10)
    assert M.pbias(SIM, OBS) == pytest.approx(100 * -2 / 12)  # sign: underestimation < 0


def test_r_alpha_beta_by_hand() -> None:
    assert M.pearson_r(OBS, SIM) == pytest.approx(R_HAND)
    assert M.alpha(OBS, SIM) == pytest.approx(ALPHA_HAND)
    assert M.alpha_nse(OBS, SIM) == pytest.approx(ALPHA_HAND)
    assert M.beta(OBS, SIM) == pytest.approx(BETA_HAND)
    assert M.beta_nse(OBS, SIM) == pytest.approx((3 - 2.5) / math.sqrt(1.25))


def test_kge_by_hand() -> None:
    expected = 1 - math.sqrt((R_HAND - 1) ** 2 + (ALPHA_HAND - 1) ** 2 + (BETA_HAND - 1) ** 2)
    assert M.kge(OBS, SIM) == pytest.approx(expected)


def test_kge_2012_by_hand() -> None:
    gamma = (math.sqrt(1.5) / 3) / (math.sqrt(1.25) / 2.5)
    expected = 1 - math.sqrt((R_HAND - 1) ** 2 + (gamma - 1) ** 2 + (BETA_HAND - 1) ** 2)
    assert M.kge_2012(OBS, SIM) == pytest.approx(expected)
    assert M.kge_2012(OBS, SIM) != pytest.approx(M.kge(OBS, SIM))


def test_log_nse_by_hand() -> None:
    eps = 0.01 * 2.5
    lo = [math.log(v + eps) for v in (1, 2, 3, 4)]
    ls = [math.log(v + eps) for v in (2, 2, 3, 5)]
    mean_lo = sum(lo) / 4
    expected = 1 - sum((s - o) ** 2 for s, o in zip(ls, lo)) / sum((o - mean_lo) ** 2 for o in lo)
    assert M.log_nse(OBS, SIM) == pytest.approx(expected)
    # explicit eps; zero flows stay finite
    lo = [math.log(v + 0.5) for v in (0, 1, 2, 3)]
    ls = [math.log(v + 0.5) for v in (0, 0, 2, 4)]
    mean_lo = sum(lo) / 4
    expected = 1 - sum((s - o) ** 2 for s, o in zip(ls, lo)) / sum((o - mean_lo) ** 2 for o in lo)
    assert M.log_nse([0, 1, 2, 3], [0, 0, 2, 4], eps=0.5) == pytest.approx(expected)


def test_fhv_by_hand() -> None:
    obs = np.arange(1.0, 101.0)  # n = 100: top 2 % = the 2 largest flows, 100 and 99
    sim = obs.copy()
    sim[[99, 98]] = [110.0, 99.0]
    sim[0] = 500.0  # now sim's top two FDC values are 500 and 110
    assert M.fhv(obs, sim) == pytest.approx(100 * ((500 + 110) - (100 + 99)) / (100 + 99))
    # short series: at least the maximum is used
    assert M.fhv([1, 2, 3, 4], [1, 2, 3, 6]) == pytest.approx(100 * (6 - 4) / 4)


def test_flv_by_hand() -> None:
    obs = np.arange(1.0, 11.0)  # n = 10: lowest 30 % = 3, 2, 1
    sim = obs**2  # lowest = 9, 4, 1
    qol = (math.log(3) - math.log(1)) + (math.log(2) - math.log(1))
    qsl = (math.log(9) - math.log(1)) + (math.log(4) - math.log(1))
    assert M.flv(obs, sim) == pytest.approx(-100 * (qsl - qol) / qol)
    assert M.flv(obs, sim) == pytest.approx(-100.0)
    # zero flows are floored at 1e-6 mm/day before the log
    obs0 = np.arange(0.0, 10.0)  # lowest 30 % = 2, 1, 0 -> 2, 1, 1e-6
    sim0 = obs0 + 1.0  # lowest = 3, 2, 1
    f = math.log(1e-6)
    qol = (math.log(2) - f) + (math.log(1) - f)
    qsl = (math.log(3) - math.log(1)) + (math.log(2) - math.log(1))
    assert M.flv(obs0, sim0) == pytest.approx(-100 * (qsl - qol) / qol)


def test_fms_by_hand() -> None:
    obs = np.arange(1.0, 11.0)  # descending FDC 10..1: index 2 (20 %) = 8, index 7 (70 %) = 3
    sim = obs**2  # 64 and 9
    slope_o = math.log(8) - math.log(3)
    slope_s = math.log(64) - math.log(9)
    assert M.fms(obs, sim) == pytest.approx(100 * (slope_s - slope_o) / slope_o)
    assert M.fms(obs, sim) == pytest.approx(100.0)
    assert M.fms(obs, np.sqrt(obs)) == pytest.approx(-50.0)
    # not a power law: the segment bounds matter (sim FDC 12..3: index 2 = 10, index 7 = 5)
    slope_s = math.log(10) - math.log(5)
    assert M.fms(obs, obs + 2) == pytest.approx(100 * (slope_s - slope_o) / slope_o)


def test_perfect_simulation() -> None:
    rng = np.random.default_rng(0)
    obs = rng.gamma(2.0, 2.0, size=200)
    res = M.calculate_metrics(obs, obs.copy())
    assert set(res) == set(M.METRICS)
    for name, value in {
        "nse": 1, "log_nse": 1, "kge": 1, "kge_2012": 1, "pearson_r": 1, "alpha": 1, "beta": 1,
        "rmse": 0, "pbias": 0, "beta_nse": 0, "fhv": 0, "flv": 0, "fms": 0,
    }.items():
        assert res[name] == pytest.approx(value, abs=1e-12), name


def test_masking_equals_removal() -> None:
    rng = np.random.default_rng(1)
    obs = rng.gamma(2.0, 2.0, size=80)
    sim = obs * rng.uniform(0.6, 1.4, size=80) + 0.3
    obs_nan, sim_nan = obs.copy(), sim.copy()
    obs_nan[[3, 10, 40, 41]] = np.nan
    sim_nan[[20, 60]] = np.nan
    keep = ~(np.isnan(obs_nan) | np.isnan(sim_nan))
    for name, fn in M.METRICS.items():
        if name == "peak_timing":
            continue
        masked, removed = fn(obs_nan, sim_nan), fn(obs[keep], sim[keep])
        assert np.isfinite(masked), name
        assert masked == pytest.approx(removed, rel=1e-12), name
        # and the NaNs really changed something (a metric ignoring masks would not match);
        # fhv only sees the 2 largest flows, which the removed steps do not touch
        assert fn(obs, sim) != pytest.approx(removed, rel=1e-12) or name in {"fhv"}, name


def test_basin_time_shape() -> None:
    rng = np.random.default_rng(2)
    obs = rng.gamma(2.0, 2.0, size=(3, 60))
    sim = obs * rng.uniform(0.5, 1.5, size=(3, 60))
    obs[1, :5] = np.nan
    res = M.calculate_metrics(obs, sim)
    for name, value in res.items():
        assert isinstance(value, np.ndarray) and value.shape == (3,), name
        for b in range(3):
            single = M.METRICS[name](obs[b], sim[b])
            assert isinstance(single, float)
            np.testing.assert_allclose(value[b], single, rtol=1e-12, err_msg=name)
    # torch input is accepted
    np.testing.assert_allclose(M.nse(torch.from_numpy(obs), torch.from_numpy(sim)), res["nse"])


def test_undefined_gives_nan_without_warning() -> None:
    obs = np.array([
        [1.0, np.nan, np.nan, np.nan],  # one valid step
        [2.0, 2.0, 2.0, 2.0],  # zero variance
        [0.1, 0.1, 0.1, np.nan],  # constant, but mean(o) - o is a 1e-17 round-off, not 0
        [1.0, 2.0, 3.0, 4.0],  # fine
    ])
    sim = np.array([[1.0, 2.0, 3.0, 4.0]] * 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = M.calculate_metrics(obs, sim)
    for name in ("nse", "log_nse", "kge", "kge_2012", "pearson_r", "alpha", "beta_nse"):
        assert np.isnan(res[name][:3]).all(), name
        assert np.isfinite(res[name][3]), name
    for name, value in res.items():
        assert np.isnan(value[0]), name  # < 2 valid steps: NaN for every metric
    assert np.isnan(M.beta([0.0, 0.0, 0.0], [1.0, 2.0, 3.0]))
    assert np.isnan(M.pbias([0.0, 0.0, 0.0], [1.0, 2.0, 3.0]))
    assert np.isnan(M.kge([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]))  # r undefined for constant sim


def test_calculate_metrics_selection_and_errors() -> None:
    res = M.calculate_metrics(OBS, SIM, metrics=["nse", "alpha_nse"])
    assert set(res) == {"nse", "alpha_nse"}
    assert res["nse"] == pytest.approx(0.6)
    assert res["alpha_nse"] == pytest.approx(ALPHA_HAND)
    with pytest.raises(ValueError, match="unknown metric"):
        M.calculate_metrics(OBS, SIM, metrics=["nse", "nope"])
    with pytest.raises(ValueError, match="same shape"):
        M.nse(OBS, SIM[:3])


def _hydrograph(n: int = 450, peaks: tuple[int, ...] = (60, 170, 280, 390)) -> np.ndarray:
    t = np.arange(n, dtype=float)
    q = 1.0 + 0.2 * np.sin(t / 7.0)
    for p in peaks:
        q += 10.0 * np.exp(-0.5 * ((t - p) / 3.0) ** 2)
    return q


def test_peak_timing_shift() -> None:
    obs = _hydrograph()
    late = np.concatenate([np.full(2, obs[0]), obs[:-2]])  # sim[t] = obs[t - 2]
    early = np.concatenate([obs[1:], np.full(1, obs[-1])])  # sim[t] = obs[t + 1]
    assert M.peak_timing(obs, obs) == 0.0
    assert M.peak_timing(obs, late) == 2.0
    assert M.peak_timing(obs, early) == 1.0
    # 2 basins, and a gap next to one peak: that peak is skipped, not mis-timed
    obs_gap = obs.copy()
    obs_gap[171] = np.nan
    late_gap = late.copy()
    late_gap[[172, 281]] = np.nan  # NaN inside the windows of the peaks at 170 and 280
    # the peak at 170 is skipped in basin 1 and, with a wrong (on-time) sim, only it
    # could lower the mean in basin 2: the others stay late by 2
    late_wrong = late.copy()
    late_wrong[160:180] = obs[160:180]
    late_wrong[172] = np.nan
    res = M.peak_timing(np.stack([obs, obs_gap, obs]), np.stack([late, late_gap, late_wrong]))
    np.testing.assert_array_equal(res, [2.0, 2.0, 2.0])
    assert np.isnan(M.peak_timing(np.ones(50), np.ones(50)))


def test_peak_timing_window_and_local_peak() -> None:
    obs = _hydrograph()
    # shifted beyond the window: the max of the window is at its edge (3 steps)
    shifted = np.concatenate([np.full(6, obs[0]), obs[:-6]])
    assert M.peak_timing(obs, shifted) == 3.0
    # mean over peaks: one peak late by 2, the others on time -> (2 + 0 + 0 + 0) / 4
    sim = obs.copy()
    sim[50:75] = np.concatenate([np.full(2, obs[50]), obs[50:73]])
    assert M.peak_timing(obs, sim) == pytest.approx(0.5)


def test_peak_timing_window_rules() -> None:
    obs = np.ones(40)
    obs[20] = 10.0  # one observed peak at t = 20; window t-3..t+3 = 17..23
    # sim has a small local peak exactly at t and a larger one at t + 2:
    # as in neuralhydrology the local peak at t counts as on time
    sim = np.ones(40)
    sim[20], sim[22] = 3.0, 8.0
    assert M.peak_timing(obs, sim, distance=5) == 0.0
    # no local peak at t: flat maximum at offsets -3, -2, -1 and +1 -> closest offset, 1
    sim = np.ones(40)
    sim[[17, 18, 19, 21]] = 5.0
    sim[20] = 4.0
    assert M.peak_timing(obs, sim, distance=5) == 1.0


# --------------------------------------------------------------------------- losses


def _loss_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    obs = torch.rand(3, 12, generator=g, dtype=torch.float64) * 4 + 0.5
    sim = (obs * (0.7 + 0.6 * torch.rand(3, 12, generator=g, dtype=torch.float64))).requires_grad_(True)
    obs[0, [2, 5]] = float("nan")
    obs[2, 7] = float("nan")
    return sim, obs


def test_nse_loss_equals_one_minus_nse() -> None:
    sim, obs = _loss_data()
    loss = M.nse_loss(sim, obs)
    expected = np.mean(1 - M.nse(obs.numpy(), sim.detach().numpy()))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # by hand on the tiny example: SSE / SST = 2 / 5
    assert M.nse_loss(torch.tensor(SIM)[None], torch.tensor(OBS)[None]).item() == pytest.approx(2 / 5)


def test_kge_and_mse_loss_values() -> None:
    sim, obs = _loss_data()
    expected = np.mean(1 - M.kge(obs.numpy(), sim.detach().numpy()))
    assert M.kge_loss(sim, obs).item() == pytest.approx(expected, rel=1e-12)
    o, s = obs.numpy(), sim.detach().numpy()
    assert M.mse_loss(sim, obs).item() == pytest.approx(np.nanmean((s - o) ** 2), rel=1e-12)
    # hand: errors 1, 0, 0, 1 -> MSE 0.5; with obs[1] missing -> (1 + 0 + 1) / 3
    obs_t = torch.tensor([[1.0, float("nan"), 3.0, 4.0]], dtype=torch.float64)
    assert M.mse_loss(torch.tensor(SIM[None]), obs_t).item() == pytest.approx(2 / 3)


def test_nse_star_by_hand() -> None:
    sim = torch.tensor(np.stack([SIM, SIM]))
    obs = torch.tensor(np.stack([OBS, [1.0, np.nan, np.nan, np.nan]]))
    std = torch.tensor([2.0, 1.0])
    # basin 0: mean sq err 2/4 / (2 + 0.1)^2; basin 1: (2 - 1)^2 / 1 / (1 + 0.1)^2
    expected = (0.5 / 2.1**2 + 1.0 / 1.1**2) / 2
    assert M.nse_loss(sim, obs, basin_std=std).item() == pytest.approx(expected)


@pytest.mark.parametrize("name", ["nse", "kge", "mse"])
def test_loss_gradients_match_finite_differences(name: str) -> None:
    sim, obs = _loss_data()
    fn = M.LOSSES[name]
    loss = fn(sim, obs)
    (grad,) = torch.autograd.grad(loss, sim)
    assert torch.isfinite(grad).all()
    # masked steps get exactly zero gradient
    assert grad[0, 2] == 0 and grad[0, 5] == 0 and grad[2, 7] == 0
    assert torch.autograd.gradcheck(lambda s: fn(s, obs), (sim,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_loss_empty_basins() -> None:
    sim, obs = _loss_data()
    obs_ext = torch.cat([obs, torch.full((1, 12), float("nan"), dtype=torch.float64)])
    for name, fn in M.LOSSES.items():
        sim_ext = torch.cat([sim, sim[:1] * 2])  # the extra basin has no observation
        loss = fn(sim_ext, obs_ext)
        assert loss.item() == pytest.approx(fn(sim, obs).item(), rel=1e-12), name
        (grad,) = torch.autograd.grad(loss, sim)
        assert torch.isfinite(grad).all(), name
    all_nan = torch.full((2, 5), float("nan"), dtype=torch.float64)
    for fn in M.LOSSES.values():
        with pytest.raises(ValueError, match="no valid"):
            fn(torch.ones(2, 5, dtype=torch.float64), all_nan)
    with pytest.raises(ValueError, match="undefined"):
        M.nse_loss(torch.ones(1, 4), torch.full((1, 4), 2.0))


def test_loss_gradient_finite_at_edge_cases() -> None:
    obs = torch.tensor([[1.0, 2.0, float("nan"), 4.0]], dtype=torch.float64)
    perfect = torch.tensor([[1.0, 2.0, 7.0, 4.0]], dtype=torch.float64, requires_grad=True)
    constant = torch.full((1, 4), 2.0, dtype=torch.float64, requires_grad=True)
    for sim in (perfect, constant):
        for fn in M.LOSSES.values():
            (grad,) = torch.autograd.grad(fn(sim, obs), sim)
            assert torch.isfinite(grad).all()
    assert M.kge_loss(perfect, obs).item() == 0.0
    assert M.nse_loss(perfect, obs).item() == 0.0
