"""Solver: agreement with scipy references, mass balance, batching, jumps, gradients."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from adjointhydro import CheckpointedAdjoint, Forcing, solve
from adjointhydro.models import exphydro, exphydro_m50, lotka_volterra, reservoir_cascade

from conftest import exphydro_sample_forcing, failing_flux_case, synthetic_forcing


# --------------------------------------------------------------- scipy reference
def _step(x, k=5.0):
    return 0.5 * (np.tanh(k * x) + 1.0)


def exphydro_rhs_numpy(y, P, T, PET, p):
    """EXP-HYDRO written out again, independently of the library, for the reference."""
    f, smax, qmax, df, tmax, tmin = p
    snow, soil = y[0], y[1]
    ps = _step(tmin - T) * P
    pr = _step(T - tmin) * P
    melt = _step(T - tmax) * _step(snow) * min(snow, df * (T - tmax))
    et = _step(soil) * _step(soil - smax) * PET + _step(soil) * _step(smax - soil) * PET * soil / smax
    qb = _step(soil) * _step(soil - smax) * qmax + _step(soil) * _step(smax - soil) * qmax * np.exp(-f * (smax - soil))
    qs = _step(soil - smax) * (soil - smax)
    q = qb + qs
    return np.array([ps - melt, pr + melt - et - q, et, q])


def reference_exphydro(forcing: Forcing, params, y0, rtol=1e-8, atol=1e-8):
    """Day-by-day solve_ivp (DOP853) of stores plus cumulative ET and Q; returns daily Q [T]."""
    v = forcing.values[0].numpy()
    y = np.array([y0[0], y0[1], 0.0, 0.0])
    qs = []
    for k in range(v.shape[0]):
        P, T, PET = v[k]
        sol = solve_ivp(lambda t, z: exphydro_rhs_numpy(z, P, T, PET, params), (0.0, 1.0), y,
                        method="DOP853", rtol=rtol, atol=atol)
        y1 = sol.y[:, -1]
        qs.append(y1[3] - y[3])
        y = np.array([y1[0], y1[1], y1[2], y1[3]])
    return np.array(qs)


PARAMS = [0.017, 1709.0, 18.47, 2.67, 0.176, -2.09]


def _check_against_reference(forcing, rtol_model, tol, ref_tol=1e-8):
    model = exphydro()
    model.set_parameters(dict(zip(model.parameter_names, PARAMS)))
    with torch.no_grad():
        sol = solve(model, forcing, rtol=rtol_model, atol=rtol_model)
    q = sol.discharge[0].numpy()
    ref = reference_exphydro(forcing, PARAMS, (0.0, PARAMS[1]), rtol=ref_tol, atol=ref_tol)
    rel = np.abs(q - ref) / np.maximum(np.abs(ref), 1e-3)
    assert rel.max() < tol, f"max relative error {rel.max():.2e} at day {rel.argmax()}"
    return rel


@pytest.mark.slow
def test_exphydro_matches_scipy_on_real_forcing_five_years():
    forcing = exphydro_sample_forcing(5 * 365)
    # The soil sits at the smoothed Smax threshold for days here (2008-2009): DOP853 at
    # rtol 1e-8 errs by 1% on day 1769 (21.39 mm against 21.15 at rtol 1e-10 and 1e-11,
    # where the library agrees to 1e-8), so this reference is solved at 1e-11.
    _check_against_reference(forcing, 1e-7, 1e-4, ref_tol=1e-11)


def test_exphydro_matches_scipy_on_synthetic_forcing():
    forcing = synthetic_forcing(1, 2 * 365)
    _check_against_reference(forcing, 1e-7, 1e-4)


def test_default_tolerance_is_accurate_not_coarse():
    # speed must not come from coarse steps: default rtol gives daily Q within 1e-3 (relative)
    forcing = synthetic_forcing(1, 365, seed=3)
    _check_against_reference(forcing, 1e-3, 2e-3)


def test_float32_solve_and_gradient_agree_with_float64():
    """Single precision (faster on CPUs and GPUs) at the default tolerance: daily Q and
    the gradient stay within 1e-3 of the double-precision solve."""
    torch.manual_seed(0)
    m64 = exphydro_m50(hidden=(8, 8))
    m32 = exphydro_m50(hidden=(8, 8), dtype=torch.float32)
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    f64 = synthetic_forcing(3, 200, seed=4)
    out = {}
    for m, f in ((m64, f64), (m32, f64.to(dtype=torch.float32))):
        sol = solve(m, f)
        assert sol.discharge.dtype == f.values.dtype
        (g,) = torch.autograd.grad((sol.discharge ** 2).mean(), [m.flux("Q").net[0].weight])
        out[f.values.dtype] = (sol.discharge.detach().double(), g.double())
    (q64, g64), (q32, g32) = out[torch.float64], out[torch.float32]
    assert float((q32 - q64).norm() / q64.norm()) < 1e-3
    assert float((g32 - g64).norm() / g64.norm()) < 1e-3


def test_solve_in_inference_mode_then_with_gradients():
    # the solver's cached tensors must not be inference tensors made by a first solve
    # under torch.inference_mode, or a later solve with gradients fails
    from adjointhydro import _rk
    _rk._COEF_CACHE.clear()
    model = exphydro_m50(hidden=(8, 8))
    forcing = synthetic_forcing(2, 20, seed=5)
    with torch.inference_mode():
        q0 = solve(model, forcing).discharge.clone()
    sol = solve(model, forcing)
    sol.discharge.sum().backward()
    assert model.flux("Q").net[0].weight.grad.abs().sum() > 0
    # (sequential forward there, parallel in time here: equal to far below the tolerance)
    torch.testing.assert_close(sol.discharge.detach(), q0, rtol=1e-9, atol=1e-9)


def test_parallel_forward_falls_back_period_by_period_for_one_window_only(monkeypatch):
    """A window whose Newton iterations fail is solved period by period; the windows
    after it go on in parallel, and the result equals the sequential solve."""
    import adjointhydro._rk as rk
    import sys
    solve_mod = sys.modules["adjointhydro.solve"]  # (the package's name `solve` is the function)
    model = exphydro_m50(hidden=(8, 8))
    forcing = synthetic_forcing(2, 120, seed=6)
    # max_rows 80 = 20 periods x 2 basins x 2 stores per window: 6 windows
    sens = dict(max_rows=80, warm_start=False)
    ref = solve(model, forcing, sensitivity=CheckpointedAdjoint(parallel_forward=False, **sens))
    real = solve_mod._period_fd_jacobian

    def failing(prob, y_rows, fvals, params, b_idx, k_idx, *a, **k):
        if (int(k_idx.min()), int(k_idx.max())) == (20, 39):  # the second window of the forward
            raise rk.StepFailure(0, 0.0, "simulated: a Newton guess the solver cannot integrate")
        return real(prob, y_rows, fvals, params, b_idx, k_idx, *a, **k)

    monkeypatch.setattr(solve_mod, "_period_fd_jacobian", failing)
    sol = solve(model, forcing, sensitivity=CheckpointedAdjoint(parallel_forward=True, **sens))
    assert sol.stats["parallel_forward"] and sol.stats["sequential_windows"] == 1
    # (Newton converges to well below the solver tolerance of 1e-3, not to rounding)
    torch.testing.assert_close(sol.discharge, ref.discharge, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sol.stores, ref.stores, rtol=1e-4, atol=1e-4)
    w = model.flux("Q").net[0].weight
    (g,) = torch.autograd.grad(sol.discharge.sum(), [w])
    (g_ref,) = torch.autograd.grad(ref.discharge.sum(), [w])
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-8)


def test_parallel_forward_returns_its_own_period_maps(monkeypatch):
    """The backward pass replays each period from the forward's stores with the forward's
    first steps, so the parallel forward must return those maps' results, not a Newton
    iterate that is up to its convergence threshold (5% of the tolerance) away: that error
    follows the starting guess as the parameters change, and the loss's slope then is not
    the gradient (25% apart in one calibration). Leaf River, where the coarse first guess
    is often accepted by the first dopri5 iteration (residual 3e-3 mm without the final
    replay, 2e-6 mm with it)."""
    import sys
    from adjointhydro.data import load_leaf_river
    solve_mod = sys.modules["adjointhydro.solve"]
    forcing = load_leaf_river().to_forcing(["P", "PET"]).select(steps=slice(0, 120))
    model = exphydro(snow=False)
    seen = {}
    real = solve_mod._CheckpointedSolve.forward

    def capture(ctx, prob, sens, Y, Q, DT, y0, params, fvals, *w):
        seen.update(prob=prob, Y=Y, Q=Q, DT=DT, params=params, fvals=fvals)
        return real(ctx, prob, sens, Y, Q, DT, y0, params, fvals, *w)

    monkeypatch.setattr(solve_mod._CheckpointedSolve, "forward", staticmethod(capture))
    for f, smax, qmax in [(0.0955, 790.1, 1.510), (0.0351, 356.8, 3.613)]:
        params = torch.tensor([[f, smax, qmax]], dtype=torch.float64)
        sol = solve(model, forcing, parameters=params,
                    sensitivity=CheckpointedAdjoint(parallel_forward=True, warm_start=False))
        assert sol.stats["parallel_forward"] and sol.stats["coarse_newton_iterations"] > 0
        prob, Y, Q, DT = seen["prob"], seen["Y"], seen["Q"], seen["DT"]
        B, T1, n = Y.shape
        T = T1 - 1
        rows = Y[:, :-1].transpose(0, 1).reshape(T * B, n)
        with torch.no_grad():
            y1, q, _, _ = prob.period(rows, seen["fvals"], seen["params"], torch.arange(B).repeat(T),
                                      torch.arange(T).repeat_interleave(B), DT.transpose(0, 1).reshape(-1),
                                      model.wiring_matrix)
        assert float((y1.view(T, B, n).transpose(0, 1) - Y[:, 1:]).abs().max()) < 1e-4  # mm
        assert float((q.view(T, B, -1).transpose(0, 1) - Q).abs().max()) < 1e-4


def test_later_newton_iterations_replay_only_the_periods_that_moved(monkeypatch):
    """After the first iterations only a few periods still move (the snow seasons); the
    others keep their maps. Four years of one basin: at most a third of the rows a full
    replay per iteration would take, and the same daily discharge (to the solver's
    tolerance) as the period-by-period solve, with the returned stores its own maps'."""
    import sys
    solve_mod = sys.modules["adjointhydro.solve"]
    torch.manual_seed(0)
    model = exphydro_m50(hidden=(8, 8))
    forcing = synthetic_forcing(1, 4 * 365, seed=5)
    rows = []
    real = solve_mod._period_fd_jacobian

    def counting(prob, y_rows, *a, **k):
        rows.append(y_rows.shape[0])
        return real(prob, y_rows, *a, **k)

    monkeypatch.setattr(solve_mod, "_period_fd_jacobian", counting)
    with torch.no_grad():
        par = solve(model, forcing, sensitivity=CheckpointedAdjoint(parallel_forward=True, warm_start=False))
    n_iter = par.stats["newton_iterations"] + par.stats["coarse_newton_iterations"]
    assert n_iter >= 6 and sum(rows) < n_iter * 4 * 365 / 3
    monkeypatch.setattr(solve_mod, "_period_fd_jacobian", real)
    with torch.no_grad():
        seq = solve(model, forcing, sensitivity=CheckpointedAdjoint(parallel_forward=False))
    q_par, q_seq = par.discharge, seq.discharge
    assert float(((q_par - q_seq).abs() / (1e-3 + 1e-3 * q_seq.abs())).max()) < 1.0


def test_a_warm_start_that_fails_is_retried_from_the_coarse_guess():
    """A training loop's warm start can be a poor guess for new parameters (an L-BFGS trial
    far from the last iterate). Where its Newton iterations fail, the window starts again
    from the coarse guess instead of being solved period by period, with the same result."""
    torch.manual_seed(0)
    model = exphydro_m50(hidden=(8, 8))
    forcing = synthetic_forcing(2, 365, seed=4)
    with torch.no_grad():
        cold = solve(model, forcing, sensitivity=CheckpointedAdjoint(parallel_forward=True, warm_start=False))
        sens = CheckpointedAdjoint(parallel_forward=True)
        sens._cache["stores"] = torch.full_like(cold.stores, float("nan"))  # a guess that cannot be integrated
        sens._cache["dt"] = torch.ones(2, 365, dtype=torch.float64)
        warm = solve(model, forcing, sensitivity=sens)
    assert warm.stats["cold_retries"] >= 1 and warm.stats["sequential_windows"] == 0
    torch.testing.assert_close(warm.discharge, cold.discharge, rtol=1e-12, atol=1e-12)


def test_a_window_that_fails_with_estimated_jacobians_is_retried_with_exact_ones(monkeypatch):
    """The first Newton updates take the coarse maps' Jacobians as estimates. Where they are
    far off (a stiff corner of the parameters), the window is solved again with
    finite-difference Jacobians before it falls back to period by period; and where the
    coarse maps themselves fail (Leaf River, f = 0.19: one midpoint step a day is
    unstable) their Jacobians are not used at all."""
    import sys
    from adjointhydro.data import load_leaf_river
    solve_mod = sys.modules["adjointhydro.solve"]
    model = exphydro_m50(hidden=(8, 8))
    forcing = synthetic_forcing(2, 120, seed=6)
    sens = dict(max_rows=160, warm_start=False)  # 40 periods a window: 3 windows
    ref = solve(model, forcing, sensitivity=CheckpointedAdjoint(parallel_forward=False, **sens))
    real = solve_mod._coarse_guess
    given = []

    def garbage(*a, **k):
        x, J = real(*a, **k)
        given.append(J is not None)
        return x, None if J is None else torch.full_like(J, float("nan"))

    monkeypatch.setattr(solve_mod, "_coarse_guess", garbage)
    sol = solve(model, forcing, sensitivity=CheckpointedAdjoint(parallel_forward=True, **sens))
    assert given == [True] * 6  # each window twice: with the estimates, then without
    assert sol.stats["sequential_windows"] == 0
    torch.testing.assert_close(sol.discharge, ref.discharge, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(solve_mod, "_coarse_guess", real)

    forcing = load_leaf_river().period("1957-01-01", "1977-12-31").to_forcing(["P", "PET"])  # one window
    coarse = []

    def recording(*a, **k):
        out = real(*a, **k)
        coarse.append(out[1] is not None)
        return out

    monkeypatch.setattr(solve_mod, "_coarse_guess", recording)
    params = torch.tensor([[0.19, 1414.0, 23.3]], dtype=torch.float64)
    sol = solve(exphydro(snow=False), forcing, parameters=params,
                sensitivity=CheckpointedAdjoint(parallel_forward=True, warm_start=False))
    assert coarse == [False] and sol.stats["sequential_windows"] == 0

def test_newton_replays_that_need_too_many_steps_fall_back(monkeypatch):
    """A Newton replay keeps every step for its Jacobians; one that would take more steps
    than the limit (here 0.9 a row, below the one step a row that any replay needs) stops,
    and its window is solved period by period: the result is the sequential solve's."""
    import sys
    solve_mod = sys.modules["adjointhydro.solve"]
    model = exphydro_m50(hidden=(8, 8))
    forcing = synthetic_forcing(2, 60, seed=3)
    sens = dict(max_rows=80, warm_start=False)  # 20 periods a window: 3 windows
    ref = solve(model, forcing, sensitivity=CheckpointedAdjoint(parallel_forward=False, **sens))
    ok = solve(model, forcing, sensitivity=CheckpointedAdjoint(parallel_forward=True, **sens))
    assert ok.stats["work_limited_windows"] == 0 and ok.stats["sequential_windows"] == 0
    monkeypatch.setattr(solve_mod, "_NEWTON_STEPS_PER_ROW", 0.9)
    sol = solve(model, forcing, sensitivity=CheckpointedAdjoint(parallel_forward=True, **sens))
    assert sol.stats["work_limited_windows"] == sol.stats["sequential_windows"] == 3
    torch.testing.assert_close(sol.discharge, ref.discharge, rtol=1e-12, atol=1e-12)
    w = model.flux("Q").net[0].weight
    (g,) = torch.autograd.grad(sol.discharge.sum(), [w])
    (g_ref,) = torch.autograd.grad(ref.discharge.sum(), [w])
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)



@pytest.mark.parametrize("n", [1, 2, 3])
def test_affine_scan_equals_the_recurrence(n):
    """The parallel scan of the Newton updates and of the adjoint: every length (odd,
    even, below and above the sequential base case) gives the sequential recurrence."""
    import sys
    scan = sys.modules["adjointhydro.solve"]._affine_scan
    gen = torch.Generator().manual_seed(n)
    for C in list(range(1, 20)) + [37, 64, 365]:
        A = torch.rand(C, 3, n, n, generator=gen, dtype=torch.float64) * (1.6 / n)
        b = torch.randn(C, 3, n, generator=gen, dtype=torch.float64)
        y = torch.randn(3, n, generator=gen, dtype=torch.float64)
        out = scan(A, b, y)
        for k in range(C):
            y = (A[k] @ y[..., None])[..., 0] + b[k]
            torch.testing.assert_close(out[k], y, rtol=1e-12, atol=1e-12)


def test_newton_jacobians_by_finite_differences_match_the_exact_ones(monkeypatch):
    """The Newton iterations take each period map's Jacobian from copies of the row started
    at perturbed stores that take the base row's steps: the base rows are the plain replay
    (to rounding), and the Jacobians agree with the exact ones (one batched reverse pass
    over a replay with a graph), also on storm days solved in many steps."""
    import sys
    solve_mod = sys.modules["adjointhydro.solve"]
    torch.manual_seed(0)
    model = exphydro_m50(hidden=(8, 8))
    forcing = synthetic_forcing(3, 200, seed=2)
    seen = {}
    real = solve_mod._CheckpointedSolve.forward

    def capture(ctx, prob, sens, Y, Q, DT, y0, params, fvals, *w):
        seen.update(prob=prob, Y=Y, DT=DT, params=params, fvals=fvals)
        return real(ctx, prob, sens, Y, Q, DT, y0, params, fvals, *w)

    monkeypatch.setattr(solve_mod._CheckpointedSolve, "forward", staticmethod(capture))
    solve(model, forcing, sensitivity=CheckpointedAdjoint(parallel_forward=False))
    prob, Y, DT = seen["prob"], seen["Y"], seen["DT"]
    B, T = DT.shape
    rows = Y[:, :-1].transpose(0, 1).reshape(T * B, -1)
    b_idx, k_idx = torch.arange(B).repeat(T), torch.arange(T).repeat_interleave(B)
    dt = DT.transpose(0, 1).reshape(-1)
    args = (prob, rows, seen["fvals"], seen["params"], b_idx, k_idx, dt, model.wiring_matrix)
    it0 = prob.n_iterations
    with torch.no_grad():
        y1, q, dt_next, dt_start = prob.period(*args[1:])
    steps_plain = prob.n_iterations - it0
    it0 = prob.n_iterations
    y1_fd, q_fd, dt_start_fd, J_fd, dt_next_fd = solve_mod._period_fd_jacobian(*args)
    assert prob.n_iterations - it0 == steps_plain >= 2  # (storm days take several steps)
    for a, b in [(y1_fd, y1), (q_fd, q), (dt_start_fd, dt_start), (dt_next_fd, dt_next)]:
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)  # (to rounding: wider products)
    # exact: a replay with a graph, one reverse pass per store (step lengths not differentiated)
    with torch.enable_grad():
        y_in = rows.detach().requires_grad_(True)
        y1_g = prob.period(y_in, *args[2:])[0]
        J = torch.stack([torch.autograd.grad(y1_g[:, j].sum(), y_in, retain_graph=True)[0] for j in range(2)], 1)
    assert J_fd.shape == J.shape == (T * B, 2, 2)
    # to the accuracy of a one-sided difference: rounding of a 1,700 mm soil store over a
    # 1.5e-8 mm move of an empty snow store is 3e-5; copies that chose their own steps
    # would be off by the local error over the move, orders of magnitude more
    torch.testing.assert_close(J_fd, J, rtol=1e-5, atol=1e-4)
    assert float(J[:, 0, 0].min()) < 0.99  # (melt: the Jacobians are not all trivial)

# ------------------------------------------------------------------ mass balance
@pytest.mark.parametrize("factory", [exphydro, lambda: exphydro_m50(), reservoir_cascade])
def test_mass_balance_ten_years(factory):
    model = factory()
    snow = "T" in model.forcing_names
    forcing = synthetic_forcing(2, 3650, seed=1, snow=True)
    with torch.no_grad():
        sol = solve(model, forcing)
    p_total = forcing["P"].sum(-1)
    d_storage = (sol.stores[:, -1] - sol.stores[:, 0]).sum(-1)
    out = sum(sol.flux(n) for n, s, t in model.wiring if t is None).sum(-1)
    inflow = sum(sol.flux(n) for n, s, t in model.wiring if s is None).sum(-1)
    # all water entering is precipitation
    assert torch.allclose(inflow, p_total, rtol=1e-12, atol=1e-9) or not snow
    err = (d_storage - (p_total - out)).abs()
    assert (err < 1e-6 * p_total).all(), err
    assert (sol.mass_balance_error().abs() < 1e-6 * p_total).all()


# ----------------------------------------------------------------------- batching
@pytest.mark.parametrize("sensitivity", ["checkpoint", "adjoint"])
def test_batch_equals_separate_solves(sensitivity):
    forcing = synthetic_forcing(4, 100, seed=2)
    model = exphydro()
    params = model.physical_parameters().detach().repeat(4, 1)
    params[:, 1] = torch.tensor([300.0, 800.0, 1200.0, 1800.0], dtype=torch.float64)
    params[:, 0] = torch.tensor([0.01, 0.02, 0.05, 0.1], dtype=torch.float64)
    with torch.no_grad():
        # torchdiffeq shares one step size across the batch: compare it at a tight tolerance
        tol = 1e-6 if sensitivity == "checkpoint" else 1e-8
        batch = solve(model, forcing, parameters=params, sensitivity=sensitivity, rtol=tol, atol=tol)
        for b in range(4):
            one = solve(model, forcing.select([b]), parameters=params[b:b + 1], sensitivity=sensitivity,
                        rtol=tol, atol=tol)
            if sensitivity == "checkpoint":
                # per-basin steps: the batch takes exactly the steps of the single solve
                assert torch.allclose(batch.discharge[b], one.discharge[0], rtol=1e-9, atol=1e-9)
            else:
                assert torch.allclose(batch.discharge[b], one.discharge[0], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- discontinuities
@pytest.mark.parametrize("years", [pytest.param(3, marks=pytest.mark.slow), 1])
def test_adaptive_solves_respect_day_boundaries_over_years(years):
    """Multi-year adaptive solves: native and jump-safe torchdiffeq both stop at every day boundary."""
    forcing = synthetic_forcing(1, years * 365, seed=4)
    model = exphydro()
    with torch.no_grad():
        tight = solve(model, forcing, rtol=1e-8, atol=1e-8).discharge
        native = solve(model, forcing, rtol=1e-3, atol=1e-3).discharge
        tdq = solve(model, forcing, rtol=1e-3, atol=1e-3, sensitivity="adjoint").discharge
    for q in (native, tdq):
        rel = ((q - tight).abs() / tight.abs().clamp(min=1e-2)).max()
        assert rel < 5e-3, rel
    # late in the record too (torchdiffeq 0.2.5's own jump handling fails from the first exact landing on)
    assert ((tdq[:, -365:] - tight[:, -365:]).abs() / tight[:, -365:].clamp(min=1e-2)).max() < 5e-3


def test_unpatched_torchdiffeq_jump_bug_is_real():
    """Documents why the fix exists: torchdiffeq's own jump_t handling loses later jumps."""
    import torchdiffeq

    # dy/dt = u(t), u = 1 on even days and 0 on odd days; y(T) = number of even days
    n = 40
    u = torch.tensor([1.0 if k % 2 == 0 else 0.0 for k in range(n)], dtype=torch.float64)

    def f(t, y):
        k = torch.clamp(torch.floor(t).long(), 0, n - 1)
        return u[k].expand_as(y)

    t = torch.tensor([0.0, float(n)], dtype=torch.float64)
    jumps = torch.arange(1, n, dtype=torch.float64)
    from adjointhydro._torchdiffeq_compat import jump_safe_method

    y_fixed = torchdiffeq.odeint(f, torch.zeros(1, dtype=torch.float64), t, method=jump_safe_method("dopri5"),
                                 rtol=1e-3, atol=1e-3, options={"jump_t": jumps})[-1]
    assert abs(float(y_fixed) - n / 2) < 1e-6


# ---------------------------------------------------------- other models vs scipy
def test_lotka_volterra_matches_scipy():
    model = lotka_volterra()
    forcing = Forcing.empty(1, 30, step=0.1)
    with torch.no_grad():
        sol = solve(model, forcing, rtol=1e-9, atol=1e-9)
    a, b, c, d = 1.3, 0.9, 0.8, 1.8
    ref = solve_ivp(lambda t, u: [a * u[0] - b * u[0] * u[1], c * u[0] * u[1] - d * u[1]], (0, 3),
                    [0.44249296, 4.6280594], t_eval=np.linspace(0, 3, 31), rtol=1e-11, atol=1e-11)
    assert np.allclose(sol.stores[0].numpy().T, ref.y, rtol=1e-6, atol=1e-8)


def test_cascade_routing_against_scipy():
    model = reservoir_cascade(3)
    forcing = synthetic_forcing(1, 200, seed=5, snow=False)
    with torch.no_grad():
        sol = solve(model, forcing, rtol=1e-8, atol=1e-8)
    p = model.physical_parameters().detach()[0].numpy()
    smax, beta, kp, k = p
    v = forcing.values[0].numpy()

    def rhs(y, P, PET):
        s = max(y[0], 0.0)
        u = s / smax
        w = _step(1 - u, 50.0)
        et = PET * (w * u + (1 - w))
        rech = kp * s * u ** beta
        r = y[1:4]
        return np.array([P - et - rech, rech - k * r[0], k * r[0] - k * r[1], k * r[1] - k * r[2], k * r[2]])

    y = np.array([0.5 * smax, 0, 0, 0, 0.0])
    qs = []
    for day in range(v.shape[0]):
        z = solve_ivp(lambda t, yy: rhs(yy, *v[day]), (0, 1), y, method="DOP853", rtol=1e-10, atol=1e-10).y[:, -1]
        qs.append(z[4] - y[4])
        y = z
    assert np.allclose(sol.discharge[0].numpy(), qs, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------- linear forcing
def test_linear_forcing_integrates_the_interpolant():
    # a store that only collects P: its gain over interior day k is (P[k-1] + 6 P[k] + P[k+1]) / 8
    from adjointhydro import Flux, Model, Store

    model = Model([Store("S")], [Flux("in", None, "S", lambda v: v.P)], forcing=["P"])
    p = torch.tensor([[0.0, 4.0, 8.0, 0.0, 2.0, 2.0]], dtype=torch.float64)
    forcing = Forcing(p[..., None], ("P",), interpolation="linear")
    with torch.no_grad():
        sol = solve(model, forcing, rtol=1e-10, atol=1e-10)
    got = sol.flux("in")[0]
    for k in range(1, 5):
        want = (p[0, k - 1] + 6 * p[0, k] + p[0, k + 1]) / 8
        assert abs(float(got[k] - want)) < 1e-7
    # and piecewise constant gives exactly the daily totals
    sol_c = solve(model, Forcing(p[..., None], ("P",)), rtol=1e-10, atol=1e-10)
    assert torch.allclose(sol_c.flux("in"), p, atol=1e-12)


# ----------------------------------------------------------------- fixed steps
@pytest.mark.parametrize("method", ["euler", "midpoint", "heun", "rk4", "bosh3"])
def test_other_methods_converge(method):
    forcing = synthetic_forcing(1, 40, seed=6)
    model = exphydro()
    with torch.no_grad():
        ref = solve(model, forcing, rtol=1e-9, atol=1e-9).discharge
        kw = {"step_size": 1 / 64} if method != "bosh3" else {"rtol": 1e-6, "atol": 1e-6}
        q = solve(model, forcing, method=method, **kw).discharge
    tol = {"euler": 2e-2, "midpoint": 1e-3, "heun": 1e-3, "rk4": 1e-5, "bosh3": 1e-4}[method]
    assert ((q - ref).abs() / ref.abs().clamp(min=1e-2)).max() < tol


def test_torchdiffeq_only_method_runs():
    forcing = synthetic_forcing(1, 60, seed=6)
    model = exphydro()
    with torch.no_grad():
        ref = solve(model, forcing, rtol=1e-9, atol=1e-9).discharge
        q = solve(model, forcing, method="dopri8", rtol=1e-7, atol=1e-7, sensitivity="direct").discharge
    assert ((q - ref).abs() / ref.abs().clamp(min=1e-2)).max() < 1e-4


def test_solution_labels_and_units():
    forcing = synthetic_forcing(2, 30)
    sol = solve(exphydro(), forcing)
    assert sol.stores.shape == (2, 31, 2) and sol.fluxes.shape == (2, 30, 5)
    assert sol.store_names == ("snow", "soil") and sol.store_units == ("mm", "mm")
    assert sol.flux_units[sol.flux_names.index("Q")] == "mm"
    assert sol.dates[0] == np.datetime64("2001-01-01") and sol.basins == ("0", "1")
    assert torch.equal(sol.discharge, sol.flux("Q"))
    with pytest.raises(KeyError, match="no flux 'q'"):
        sol.flux("q")
    low = sol.to(dtype=torch.float32)
    assert low.stores.dtype == low.fluxes.dtype == torch.float32 and sol.stores.dtype == torch.float64
    assert low.flux_names == sol.flux_names and low.dates is sol.dates
    assert torch.allclose(low.discharge.double(), sol.discharge, rtol=1e-6)


# ---------------------------------------------------------------- devices
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
@pytest.mark.parametrize("sensitivity", ["checkpoint", "checkpoint-seq", "direct", "adjoint"])
def test_cuda_solve_and_gradients_match_cpu(sensitivity):
    """The same hybrid solved on the GPU gives the CPU's discharge and gradients."""
    import copy

    from adjointhydro import CheckpointedAdjoint
    from adjointhydro.model import ModelError

    forcing = synthetic_forcing(3, 150, seed=5)
    torch.manual_seed(0)
    model = exphydro_m50()
    sens = CheckpointedAdjoint(parallel_forward=False) if sensitivity == "checkpoint-seq" else sensitivity
    obs = forcing.values[..., 0] * 0.3

    def run(m, f, o):
        m.zero_grad()
        sol = solve(m, f, sensitivity=sens, rtol=1e-6, atol=1e-6)
        ((sol.discharge - o) ** 2).mean().backward()
        return sol.discharge.detach().cpu(), [p.grad.detach().cpu().clone() for p in m.parameters()]

    q_cpu, g_cpu = run(model, forcing, obs)
    gpu = copy.deepcopy(model).cuda()
    q_gpu, g_gpu = run(gpu, forcing.to(device="cuda"), obs.cuda())
    # float64 on both; kernels round differently, and adaptive steps follow at the tolerance
    assert torch.allclose(q_gpu, q_cpu, rtol=1e-6, atol=1e-8)
    for a, b in zip(g_gpu, g_cpu):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-8 * float(b.abs().max()) + 1e-12)
    with pytest.raises(ModelError, match="move both to one device"):
        solve(model, forcing.to(device="cuda"))


_MALLOC_PROBE = r"""
import os, resource, sys
import torch
from adjointhydro import _malloc
applied = _malloc.tune()
assert _malloc.tune() == applied  # once per process
def cycle():
    # a chunk's worth of activations: 24 x 4 MB, written, then all freed together
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ts = [torch.ones(1 << 19, dtype=torch.float64) for _ in range(24)]
    del ts
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
cycle()
print(applied, min(cycle() for _ in range(3)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="malloc tuning applies to glibc on Linux only")
def test_freed_chunks_stay_mapped_unless_disabled(tmp_path):
    """After tuning, a second chunk of 96 MB reuses the pages of the first (no new page faults)."""
    def probe(env_value):
        env = dict(os.environ, ADJOINTHYDRO_MALLOC_TUNING=env_value)
        out = subprocess.run([sys.executable, "-c", _MALLOC_PROBE], env=env, capture_output=True, text=True,
                             check=True, cwd=tmp_path).stdout.split()
        return out[0] == "True", int(out[1])

    applied, faults = probe("1")
    assert applied and faults < 500
    # glibc's defaults: whether the freed pages go back to the kernel then depends on what
    # else sits at the top of the heap (often they do: 20,000 faults a cycle)
    applied, _ = probe("0")
    assert not applied


@pytest.mark.slow
@pytest.mark.parametrize("device,loop", [
    ("cpu", True), ("cpu", False),
    pytest.param("cuda", False, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_compiled_step_equals_the_eager_one(device, loop, monkeypatch):
    """``CheckpointedAdjoint(compile=True)``: the period-by-period forward with a compiled
    Runge-Kutta step gives the eager solve's daily discharge, steps and gradients to
    rounding (compiles once, 10-40 s; the CI machines have a C++ compiler; on a GPU the
    step is Triton kernels). On a CPU the stretch is one compiled loop; the GPU's
    few-steps-a-call stepper is also run on the CPU (``loop=False``)."""
    import warnings

    import adjointhydro._rk as rk

    monkeypatch.setattr(rk, "_LOOP_DEVICES", (device,) if loop else ())

    forcing = synthetic_forcing(5, 60, seed=21).to(device=device)
    obs = torch.rand(5, 60, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
    model = exphydro_m50(hidden=(8,)).to(device)
    out = {}
    for compiled in (False, True):
        model.zero_grad()
        sens = CheckpointedAdjoint(parallel_forward=False, compile=compiled)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # (a failed compilation warns)
            sol = solve(model, forcing, sensitivity=sens)
        ((sol.discharge - obs) ** 2).mean().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        out[compiled] = (sol.discharge.detach(), sol.stats["iterations"], sol.stats["flux_evaluations"], grads)
    # (GPU kernels fuse differently from eager ones: rounding may differ there, not the steps)
    tol = 1e-12 if device == "cpu" else 1e-10
    torch.testing.assert_close(out[True][0], out[False][0], rtol=tol, atol=tol)
    torch.testing.assert_close(out[True][3], out[False][3], rtol=100 * tol, atol=tol)
    # each row runs through the periods at its own pace, a few steps a call: no more
    # steps than the eager solve (each period as long as its slowest row), rounded up
    assert out[True][1] <= -(-out[False][1] // rk._MICRO_STEPS) * rk._MICRO_STEPS
    # a later solve (new plans: new floats and bound methods) reuses the compiled step

    n_compiled = len(rk._COMPILED)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        again = solve(model, forcing, sensitivity=CheckpointedAdjoint(parallel_forward=False, compile=True))
    assert len(rk._COMPILED) == n_compiled
    torch.testing.assert_close(again.discharge, out[True][0], rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_stretches_equal_the_eager_solve_and_report_failures(monkeypatch):
    """Short stretches (a record's periods bound and stepped a few at a time, the last one
    shorter and padded) give the eager discharge, and a failing row names its basin and
    date as in the eager solve."""
    import importlib

    from adjointhydro import SolverError

    solve_mod = importlib.import_module("adjointhydro.solve")  # (the package's `solve` is the function)

    monkeypatch.setattr(solve_mod, "_BIND_ROWS", 4 * 13)  # 13 periods a stretch: 60 = 4 x 13 + 8
    forcing = synthetic_forcing(4, 60, seed=23)
    model = exphydro_m50(hidden=(8,))
    with torch.no_grad():
        ref = solve(model, forcing, sensitivity=CheckpointedAdjoint(parallel_forward=False))
        got = solve(model, forcing, sensitivity=CheckpointedAdjoint(parallel_forward=False, compile=True))
    torch.testing.assert_close(got.discharge, ref.discharge, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.stores, ref.stores, rtol=1e-12, atol=1e-12)

    # a flux that turns non-finite in basin 'c' on 2001-01-19 (the second stretch)
    m, bad = failing_flux_case(4, 30, 18)
    with torch.no_grad(), pytest.raises(SolverError, match=r"basin 'c' at 2001-01-19.*non-finite state"):
        solve(m, bad, sensitivity=CheckpointedAdjoint(parallel_forward=False, compile=True))


@pytest.mark.slow
def test_compiled_steppers_of_many_shapes_do_not_exhaust_dynamos_recompile_limit():
    """Each structure and shape compiles its own code object: a process that compiles
    more variants than dynamo's recompile limit (8; here 1) keeps compiling, where one
    shared code object would fail its full-graph compilation and end compiling."""
    # (dynamo's own patch: pytest's monkeypatch restores a config entry by deleting it,
    # which hides it from every later compilation of the process)
    with torch._dynamo.config.patch(recompile_limit=1):
        _compile_two_batch_sizes()


def _compile_two_batch_sizes():
    import warnings

    model = reservoir_cascade(1)
    for basins in (2, 3):
        forcing = synthetic_forcing(basins, 12, seed=basins)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # (a failed compilation warns)
            got = solve(model, forcing, sensitivity=CheckpointedAdjoint(parallel_forward=False, compile=True))
            ref = solve(model, forcing, sensitivity=CheckpointedAdjoint(parallel_forward=False))
        torch.testing.assert_close(got.discharge, ref.discharge, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["m100", "rk4"])
def test_compile_says_why_it_cannot_take_a_solve_and_solves_as_without(case):
    """``compile=True`` for a solve the compiled stepper cannot take (a partitioning
    network, a fixed-step method) warns with the reason and gives the default result."""
    from adjointhydro.models import exphydro_m100

    forcing = synthetic_forcing(6, 15, seed=24)
    torch.manual_seed(0)
    model = exphydro_m100(hidden=(8,)) if case == "m100" else exphydro_m50(hidden=(8,))
    kw = {"method": "rk4"} if case == "rk4" else {}
    with torch.no_grad():
        ref = solve(model, forcing, sensitivity=CheckpointedAdjoint(), **kw).discharge
        with pytest.warns(RuntimeWarning, match="cannot compile this solve, " + ("model" if case == "m100" else "method")):
            q = solve(model, forcing, sensitivity=CheckpointedAdjoint(compile=True), **kw).discharge
    torch.testing.assert_close(q, ref, rtol=0, atol=0)


def test_a_step_that_cannot_be_compiled_is_stepped_eagerly_with_a_warning(monkeypatch):
    """Where ``torch.compile`` fails (no C++ compiler, say), ``compile=True`` warns once and
    solves with the eager step: the same result as without it."""
    import adjointhydro._rk as rk

    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no C++ compiler found")
        return call

    monkeypatch.setattr(rk, "_COMPILED", {})
    monkeypatch.setattr(rk, "_COMPILE_FAILED", [])
    monkeypatch.setattr(torch, "compile", broken)
    forcing = synthetic_forcing(3, 20, seed=22)
    model = exphydro_m50(hidden=(8,))
    with torch.no_grad():
        ref = solve(model, forcing, sensitivity=CheckpointedAdjoint(parallel_forward=False)).discharge
        with pytest.warns(RuntimeWarning, match="compiling the Runge-Kutta step failed"):
            q = solve(model, forcing, sensitivity=CheckpointedAdjoint(parallel_forward=False, compile=True)).discharge
        again = solve(model, forcing, sensitivity=CheckpointedAdjoint(parallel_forward=False, compile=True)).discharge
    torch.testing.assert_close(q, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(again, ref, rtol=0, atol=0)  # eager from then on, no second warning


@pytest.mark.slow
def test_compiled_loop_keeps_its_buffers_on_the_stack_and_falls_back_to_inductors_wrapper(monkeypatch):
    """On a CPU the compiled loop's intermediate buffers go on the stack (a C++ wrapper of
    our own, :mod:`adjointhydro._inductor_stack`): it builds, and gives the eager solve's
    discharge to rounding. Where it cannot be built, inductor's own wrapper is used,
    without a warning, with the same result."""
    import warnings

    import torch._inductor.config as inductor_config

    import adjointhydro._inductor_stack as stack
    import adjointhydro._rk as rk

    if stack.backend({}) is None:
        pytest.skip("this torch lacks the inductor internals the stack wrapper needs")
    forcing = synthetic_forcing(2, 40, seed=31)
    model = exphydro_m50(hidden=(8,))
    with torch.no_grad():
        ref = solve(model, forcing, sensitivity=CheckpointedAdjoint(parallel_forward=False)).discharge

    def compiled_discharge():
        monkeypatch.setattr(rk, "_COMPILED", {})
        monkeypatch.setattr(rk, "_VARIANT_FAILED", [])
        with torch.no_grad(), warnings.catch_warnings(), inductor_config.patch(force_disable_caches=True):
            warnings.simplefilter("error", RuntimeWarning)  # (a failed compilation warns)
            return solve(model, forcing, sensitivity=CheckpointedAdjoint(parallel_forward=False, compile=True)).discharge

    placed = []
    real = stack._escaping

    def escaping(graph):  # (records that the wrapper ran: codegen, not a cache hit)
        placed.append(graph)
        return real(graph)

    monkeypatch.setattr(stack, "_escaping", escaping)
    q = compiled_discharge()
    assert rk._VARIANT_FAILED == [] and placed
    torch.testing.assert_close(q, ref, rtol=1e-12, atol=1e-12)

    def broken(options):
        def backend(gm, example_inputs):
            raise RuntimeError("C++ compile error")
        return backend

    monkeypatch.setattr(stack, "backend", broken)
    q = compiled_discharge()
    assert len(rk._VARIANT_FAILED) == 1 and "C++ compile error" in rk._VARIANT_FAILED[0]
    torch.testing.assert_close(q, ref, rtol=1e-12, atol=1e-12)
