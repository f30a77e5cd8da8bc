"""Gradients: the three sensitivities agree with each other and with finite differences."""
from __future__ import annotations

import pytest
import torch

from adjointhydro import CheckpointedAdjoint, solve
from adjointhydro.models import exphydro, exphydro_m50

from conftest import synthetic_forcing


def _loss(sol, obs):
    return ((sol.discharge - obs) ** 2).mean()


def _grads(model, forcing, obs, sensitivity, tol, method="dopri5", **kw):
    model.zero_grad()
    sol = solve(model, forcing, sensitivity=sensitivity, rtol=tol, atol=tol, method=method, **kw)
    _loss(sol, obs).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _observed(forcing, seed=0):
    truth = exphydro()
    truth.set_parameters({"f": 0.03, "Smax": 900.0, "Qmax": 12.0})
    with torch.no_grad():
        q = solve(truth, forcing, rtol=1e-8, atol=1e-8).discharge
    return q * (1 + 0.05 * torch.randn(q.shape, generator=torch.Generator().manual_seed(seed), dtype=q.dtype))


@pytest.mark.parametrize("factory", [exphydro, lambda: exphydro_m50(hidden=(8,))])
def test_three_sensitivities_agree(factory):
    forcing = synthetic_forcing(2, 365, seed=11)
    obs = _observed(forcing)
    model = factory()
    g_direct = _grads(model, forcing, obs, "direct", 1e-6)
    g_ckpt = _grads(model, forcing, obs, "checkpoint", 1e-6)
    g_seq = _grads(model, forcing, obs, CheckpointedAdjoint(parallel_forward=False), 1e-6)
    g_adj = _grads(model, forcing, obs, "adjoint", 1e-6)
    assert _rel(g_seq, g_direct) < 1e-9  # same discrete solution, same gradient
    assert _rel(g_ckpt, g_direct) < 1e-3  # parallel forward: same solution to tolerance
    assert _rel(g_adj, g_direct) < 1e-3  # continuous adjoint vs discrete gradient


def test_fixed_step_gradient_equals_finite_differences_exactly():
    # fixed steps: the discrete solution is a smooth function of the parameters, so the
    # discrete gradient (direct or checkpointed) must match central differences closely
    forcing = synthetic_forcing(1, 200, seed=12)
    obs = _observed(forcing)
    model = exphydro()
    base = model.physical_parameters().detach().clone()
    p = base.clone().requires_grad_(True)
    kw = dict(method="rk4", step_size=0.25)
    for sens in ("direct", "checkpoint"):
        p.grad = None
        _loss(solve(model, forcing, parameters=p, sensitivity=sens, **kw), obs).backward()
        for j in range(p.shape[1]):
            e = 1e-6 * max(abs(float(base[0, j])), 1.0)
            hi, lo = base.clone(), base.clone()
            hi[0, j] += e
            lo[0, j] -= e
            with torch.no_grad():
                fd = (_loss(solve(model, forcing, parameters=hi, **kw), obs)
                      - _loss(solve(model, forcing, parameters=lo, **kw), obs)) / (2 * e)
            assert abs(float(p.grad[0, j]) - float(fd)) <= 1e-5 * max(abs(float(fd)), 1e-3), (sens, j)


def test_network_weight_gradient_against_finite_differences():
    forcing = synthetic_forcing(1, 120, seed=13)
    obs = _observed(forcing)
    model = exphydro_m50(hidden=(6,))
    w = model.flux("Q").net[0].weight
    _loss(solve(model, forcing, rtol=1e-9, atol=1e-9), obs).backward()
    g = w.grad.clone()
    for idx in [(0, 0), (3, 1)]:
        with torch.no_grad():
            e = 1e-5
            w[idx] += e
            lp = _loss(solve(model, forcing, rtol=1e-10, atol=1e-10), obs)
            w[idx] -= 2 * e
            lm = _loss(solve(model, forcing, rtol=1e-10, atol=1e-10), obs)
            w[idx] += e
        fd = (lp - lm) / (2 * e)
        assert abs(float(g[idx] - fd)) < 1e-3 * abs(float(fd)) + 1e-7


@pytest.mark.parametrize("years", [pytest.param(4, marks=pytest.mark.slow), 1])
def test_no_gradient_drift_over_multi_year_records(years):
    """Over years, the gradient must stay that of the continuous solution.

    One RK4 step a day drifts far from it (seen: relative error 0.5 over 4 years);
    the adaptive checkpointed adjoint must match central differences of a
    tight-tolerance solution.
    """
    forcing = synthetic_forcing(1, years * 365, seed=14)
    obs = _observed(forcing)
    model = exphydro()
    base = model.physical_parameters().detach().clone()
    p = base.clone().requires_grad_(True)
    _loss(solve(model, forcing, parameters=p, rtol=1e-6, atol=1e-6), obs).backward()
    fd = torch.zeros(3, dtype=torch.float64)
    for j in range(3):  # f, Smax, Qmax: the parameters discharge is most sensitive to
        e = 1e-4 * abs(float(base[0, j]))
        hi, lo = base.clone(), base.clone()
        hi[0, j] += e
        lo[0, j] -= e
        with torch.no_grad():
            fd[j] = (_loss(solve(model, forcing, parameters=hi, rtol=1e-10, atol=1e-10, sensitivity="direct"), obs)
                     - _loss(solve(model, forcing, parameters=lo, rtol=1e-10, atol=1e-10, sensitivity="direct"), obs)) / (2 * e)
    scaled = (p.grad[0, :3] - fd).abs() * base[0, :3]  # compare on a common scale (d loss / d log p)
    assert float(scaled.norm() / (fd * base[0, :3]).norm()) < 1e-2


def test_gradients_with_respect_to_forcing_and_initial_state():
    forcing = synthetic_forcing(2, 90, seed=15)
    obs = _observed(forcing)
    model = exphydro()
    out = {}
    for sens in ("direct", "checkpoint"):
        values = forcing.values.clone().requires_grad_(True)
        y0 = torch.tensor([[10.0, 500.0], [0.0, 800.0]], dtype=torch.float64, requires_grad=True)
        f = type(forcing)(values, forcing.names, forcing.units, forcing.dates)
        _loss(solve(model, f, initial_state=y0, sensitivity=sens, rtol=1e-7, atol=1e-7), obs).backward()
        out[sens] = (values.grad, y0.grad)
    assert _rel(out["checkpoint"][0], out["direct"][0]) < 1e-3
    assert _rel(out["checkpoint"][1], out["direct"][1]) < 1e-3
    assert out["direct"][0][..., 0].abs().sum() > 0  # precipitation matters


class _ReadsItemInBackward(torch.autograd.Function):
    """k * S with a backward that reads a Python number (.item()): it cannot be vectorised."""

    @staticmethod
    def forward(ctx, k, s):
        ctx.save_for_backward(k, s)
        return k * s

    @staticmethod
    def backward(ctx, g):
        k, s = ctx.saved_tensors
        if not float(g.abs().max()) < float("inf"):
            raise FloatingPointError("non-finite cotangent")
        return g * s, g * k


@pytest.mark.parametrize("parallel_forward", [True, False])
def test_checkpoint_gradient_with_a_flux_whose_backward_cannot_be_batched(parallel_forward):
    """The batched reverse pass falls back to one pass per cotangent, with the same gradients."""
    from adjointhydro import Flux, Model, Parameter, Store

    def bucket(custom):
        out = (lambda v: _ReadsItemInBackward.apply(v.k, v.S)) if custom else (lambda v: v.k * v.S)
        return Model(
            [Store("S", initial=10.0)],
            [Flux("rain", None, "S", lambda v: v.P), Flux("Q", "S", None, out)],
            forcing=["P"], parameters=[Parameter("k", 0.01, 1.0, 0.1, "1/day")], discharge=["Q"],
        )

    forcing = synthetic_forcing(2, 60, seed=3, snow=False)
    obs = forcing.values[..., 0] * 0.5
    sens = CheckpointedAdjoint(parallel_forward=parallel_forward)
    g_custom = _grads(bucket(True), forcing, obs, sens, 1e-6)
    g_plain = _grads(bucket(False), forcing, obs, CheckpointedAdjoint(parallel_forward=parallel_forward), 1e-6)
    g_direct = _grads(bucket(False), forcing, obs, "direct", 1e-6)
    assert torch.allclose(g_custom, g_plain, rtol=1e-10, atol=0)
    assert _rel(g_custom, g_direct) < 1e-6


@pytest.mark.parametrize("interpolation,method", [("constant", "dopri5"), ("linear", "bosh3"), ("constant", "rk4")])
def test_step_by_step_backward_equals_direct_backpropagation(interpolation, method):
    """The checkpointed adjoint's reverse pass (each chunk's accepted steps taken again
    with a graph, the adjoint carried step by step) gives direct backpropagation's
    gradient of the same discrete solution to rounding: across many chunks (small
    ``max_rows``), with stores and totals both scored, rates that vary within a period
    (linear forcing), adaptive and fixed-step methods; also for the forcing."""
    import dataclasses

    base = synthetic_forcing(3, 120, seed=5)
    forcing = dataclasses.replace(base, interpolation=interpolation)
    obs = _observed(forcing)
    model = exphydro_m50(hidden=(8,))
    kw = dict(method=method, rtol=1e-6, atol=1e-6) if method != "rk4" else dict(method=method, step_size=0.5)
    out = {}
    for name, sens in (("direct", "direct"), ("checkpoint", CheckpointedAdjoint(parallel_forward=False, max_rows=64))):
        model.zero_grad()
        f = forcing.values.clone().requires_grad_(True)
        sol = solve(model, dataclasses.replace(forcing, values=f), sensitivity=sens, **kw)
        (_loss(sol, obs) + 1e-4 * sol.stores.square().mean()).backward()
        out[name] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]
                              + [f.grad.flatten()])
    assert _rel(out["checkpoint"], out["direct"]) < 1e-10
