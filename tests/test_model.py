"""Model definition, fluxes, parameters and clear errors for bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adjointhydro import (Flux, Forcing, ForcingError, Model, ModelError, NeuralFlux, NeuralFluxGroup,
                          Parameter, SolverError, Store, solve)
from adjointhydro.models import exphydro, exphydro_m50, exphydro_m100, lotka_volterra_ude

from conftest import failing_flux_case, synthetic_forcing


def bucket(**kw):
    return Model(
        [Store("S", initial=10.0)],
        [Flux("rain", None, "S", lambda v: v.P), Flux("Q", "S", None, lambda v: v.k * v.S)],
        forcing=["P"],
        parameters=[Parameter("k", 0.01, 1.0, 0.1, "1/day")],
        discharge=["Q"],
        **kw,
    )


def test_wiring_matrix_and_names():
    m = exphydro()
    assert m.store_names == ("snow", "soil")
    assert m.flux_names == ("snowfall", "rainfall", "melt", "et", "Q")
    W = m.wiring_matrix
    assert W.tolist() == [[1, 0], [0, 1], [-1, 1], [0, -1], [0, -1]]


def test_linear_reservoir_against_analytic_solution():
    m = bucket()
    forcing = Forcing(torch.zeros(1, 10, 1, dtype=torch.float64), ("P",))
    sol = solve(m, forcing, rtol=1e-10, atol=1e-10)
    t = torch.arange(11, dtype=torch.float64)
    assert torch.allclose(sol.store("S")[0], 10.0 * torch.exp(-0.1 * t), rtol=1e-8)
    # daily totals are integrals of the rate, not the rate at midnight
    assert torch.allclose(sol.flux("Q")[0], 10.0 * (torch.exp(-0.1 * t[:-1]) - torch.exp(-0.1 * t[1:])), rtol=1e-8)


def test_replace_flux_by_network_in_one_line_keeps_wiring_and_mass_balance():
    m = exphydro()
    h = m.replace_flux(NeuralFlux("et", ["soil", "PET"], limit_by="soil")).double()
    assert h.wiring == m.wiring and isinstance(h.flux("et"), NeuralFlux)
    assert not isinstance(m.flux("et"), NeuralFlux)  # the original is untouched
    forcing = synthetic_forcing(2, 200)
    with torch.no_grad():
        sol = solve(h, forcing)
    assert (sol.flux("et") >= 0).all()
    assert (sol.mass_balance_error().abs() < 1e-8).all()


def test_neural_flux_is_non_negative_and_limited_by_storage():
    nf = NeuralFlux("x", ["S"], "S", None, hidden=(8,), limit_by="S", limit_scale=1.0).double()
    with torch.no_grad():
        for layer in nf.net:
            if hasattr(layer, "weight"):
                layer.weight.normal_(0, 3.0)
    from adjointhydro import Vars

    s = torch.linspace(-5, 100, 200, dtype=torch.float64)
    out = nf(Vars(S=s))
    assert (out >= 0).all()
    assert (out[s <= 0] == 0).all()


@pytest.mark.parametrize("activation", [torch.nn.Tanh, torch.nn.SiLU, None])
def test_prepared_networks_equal_the_modules_in_value_and_gradient(activation):
    """The solver's prepared networks (normalisation and tanh folded into the weights)
    compute the module's function, and pass gradients to the module's own weights."""
    torch.manual_seed(1)
    if activation is None:  # a group with a partition and limits (M100)
        m = exphydro_m100(hidden=(8, 8))
    else:
        m = exphydro_m50(hidden=(8, 8)).replace_flux(
            NeuralFlux("et", ["snow", "soil", "T", "PET"], hidden=(8, 8), activation=activation,
                       input_loc={"soil": 500.0, "T": 5.0}, input_scale={"soil": 400.0, "T": 8.0},
                       output_scale=1.5, limit_by="soil")).replace_flux(
            # an input that is an earlier flux, read at each call
            NeuralFlux("Q", ["soil", "melt", "P"], hidden=(8, 8), activation=activation, limit_by="soil",
                       input_loc={"soil": 500.0}, input_scale={"soil": 400.0})).to(torch.float64)
    for f in m.neural_fluxes():  # make the last layers matter
        with torch.no_grad():
            f.net[-1].weight.normal_(0, 1.0)
            f.net[-1].bias.normal_(0, 0.5)
    B = 64
    gen = torch.Generator().manual_seed(0)
    y = torch.rand(B, 2, generator=gen, dtype=torch.float64) * torch.tensor([80.0, 1500.0], dtype=torch.float64)
    fv = torch.rand(B, 3, generator=gen, dtype=torch.float64) * torch.tensor([20.0, 30.0, 5.0]) + torch.tensor([0.0, -10.0, 0.0])
    from adjointhydro.fluxes import Vars
    fd = Vars(zip(("P", "T", "PET"), fv.unbind(-1)))
    pd = Vars(zip(m.parameter_names, m.physical_parameters().expand(B, -1).unbind(-1)))
    weights = [p for f in m.neural_fluxes() for p in f.parameters()]
    cot = torch.randn(B, m.n_fluxes, generator=gen, dtype=torch.float64)
    ref = m.fluxes(y, fd, pd)
    g_ref = torch.autograd.grad((ref * cot).sum(), weights)
    assert all(f._plan(m.store_names) is not None for f in m.neural_fluxes())
    assert ref.abs().max() > 0.1
    prepared = m._rate_function()
    # forcing bound as constant over the period, or passed at each call (linear forcing)
    for const, extra in ((Vars(**fd, **pd), None), (pd, fd)):
        fast = prepared.bind(const)(y.T.contiguous(), extra).T
        g_fast = torch.autograd.grad((fast * cot).sum(), weights, retain_graph=True)
        torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
        for a, b in zip(g_fast, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_feature_major_product_has_the_builtin_gradients():
    """The networks' product under autograd: first and second derivatives as ``addmm``'s,
    vectorised over cotangents, and only store gradients inside the solver's Jacobian passes."""
    from adjointhydro.fluxes import _FeatureMajorAddmm, _state_gradients_only

    gen = torch.Generator().manual_seed(3)
    for bias_cols in (1, 7):  # a bias per output (broadcast) or per output and row
        bias = torch.randn(4, bias_cols, generator=gen, dtype=torch.float64, requires_grad=True)
        w = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
        x = torch.randn(3, 7, generator=gen, dtype=torch.float64, requires_grad=True)
        torch.testing.assert_close(_FeatureMajorAddmm.apply(bias, w, x), torch.addmm(bias, w, x), rtol=0, atol=0)
        assert torch.autograd.gradcheck(_FeatureMajorAddmm.apply, (bias, w, x))
        assert torch.autograd.gradgradcheck(_FeatureMajorAddmm.apply, (bias, w, x))
        out = torch.sigmoid(_FeatureMajorAddmm.apply(bias, w, x))
        cot = torch.randn((5,) + out.shape, generator=gen, dtype=torch.float64)
        with _state_gradients_only():
            (gx,) = torch.autograd.grad(out, x, cot, is_grads_batched=True, retain_graph=True)
            g_w = torch.autograd.grad(out, w, cot[0], retain_graph=True, allow_unused=True)[0]
        ref = torch.sigmoid(torch.addmm(bias, w, x))
        for i in range(5):
            torch.testing.assert_close(gx[i], torch.autograd.grad(ref, x, cot[i], retain_graph=True)[0])
        assert g_w is None or not g_w.any()  # skipped there; computed outside
        torch.testing.assert_close(torch.autograd.grad(out, w, cot[0])[0], torch.autograd.grad(ref, w, cot[0])[0])


def test_fluxes_of_constants_only_are_evaluated_once_a_period():
    """Physics fluxes that read only parameters and piecewise-constant forcing (EXP-HYDRO's
    snowfall and rainfall) are evaluated when a period is bound, not at every stage; a flux
    that reads a store (here only on wet days) is evaluated at each call from then on."""
    from adjointhydro.fluxes import Vars

    def leak(v):  # reads the soil store only when some row has over 20 mm of rain
        return 0.01 * v.soil if bool((v.P > 20.0).any()) else 0.0 * v.P

    base = exphydro()
    m = Model(base.stores, list(base.flux_modules) + [Flux("leak", "soil", None, leak)], base.forcing_names,
              base.parameters_spec, base.discharge_fluxes)
    pd = Vars(zip(m.parameter_names, m.physical_parameters().expand(3, -1).unbind(-1)))
    y = torch.tensor([[10.0, 800.0], [0.0, 300.0], [50.0, 1200.0]], dtype=torch.float64)
    prepared = m._rate_function()
    for p in ([1.0, 0.0, 5.0], [1.0, 30.0, 5.0], [2.0, 3.0, 0.0]):  # dry, wet, dry periods
        fd = Vars(P=torch.tensor(p, dtype=torch.float64), T=torch.tensor([-5.0, 2.0, 10.0], dtype=torch.float64),
                  PET=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        fast = prepared.bind(Vars(**fd, **pd))(y.T.contiguous()).T
        torch.testing.assert_close(fast, m.fluxes(y, fd, pd), rtol=1e-14, atol=1e-14)
    assert m.flux_names == ("snowfall", "rainfall", "melt", "et", "Q", "leak")
    # leak cannot be traced (Python control flow on values): tried with the constants
    # alone at the first (dry) period, and the wet one showed that it reads a store
    assert prepared._folded == [True, True, True, True, True, False]
    const, folded, split = prepared._split(Vars(**fd, **pd))
    assert folded == (True, True, False, False, False, False)
    # melt = step(T - Tmax) * step(snow) * min(snow, Df*(T - Tmax)): the parts of T alone once a period
    rate, inputs, hoisted = split[2]
    assert inputs == ("snow",) and len(hoisted) == 2
    assert split[5] is None  # leak: run as written


@pytest.mark.parametrize("smoothing", [5.0, None])
def test_traced_physics_fluxes_equal_their_functions(smoothing):
    """Each physics flux split into its constant and varying parts (:mod:`adjointhydro._trace`)
    gives the rates of the function as written, for piecewise-constant forcing and for
    forcing that varies within the period (then T is read at every stage), with hard steps,
    and for a function reading a tensor from outside (not traced: run as written)."""
    from adjointhydro.fluxes import Vars

    scale = torch.tensor(0.02, dtype=torch.float64)
    base = exphydro(smoothing=smoothing)
    m = Model(base.stores, list(base.flux_modules) + [Flux("drain", "snow", None, lambda v: scale * v.snow)],
              base.forcing_names, base.parameters_spec, base.discharge_fluxes)
    gen = torch.Generator().manual_seed(3)
    R = 50
    pd = Vars(zip(m.parameter_names, m.physical_parameters().expand(R, -1).unbind(-1)))
    fd = Vars(P=torch.rand(R, generator=gen, dtype=torch.float64) * 30,
              T=torch.randn(R, generator=gen, dtype=torch.float64) * 5,
              PET=torch.rand(R, generator=gen, dtype=torch.float64) * 4)
    y = torch.rand(R, 2, generator=gen, dtype=torch.float64) * torch.tensor([40.0, 2000.0], dtype=torch.float64)
    ref = m.fluxes(y, fd, pd)
    prepared = m._rate_function()
    torch.testing.assert_close(prepared.bind(Vars(**fd, **pd))(y.T.contiguous()).T, ref, rtol=1e-14, atol=1e-14)
    # T varying within the period: melt's step(T - Tmax) is evaluated at each call
    varying = prepared.bind(Vars(**pd, P=fd.P, PET=fd.PET))
    torch.testing.assert_close(varying(y.T.contiguous(), Vars(T=fd.T)).T, ref, rtol=1e-14, atol=1e-14)
    _, _, split = prepared._split(Vars(**pd, P=fd.P, PET=fd.PET))
    assert set(split[2][1]) == {"snow", "T"}
    assert split[5] is None or torch.equal(split[5][0](*[y[:, 0]], *split[5][2]), scale * y[:, 0])


def test_network_that_is_not_linear_and_activation_layers_runs_as_is():
    m = exphydro_m50(hidden=(8,))
    f = m.flux("Q")
    f.net = torch.nn.Sequential(f.net[0], torch.nn.Tanh(), torch.nn.Tanh(), f.net[2]).double()
    assert f._plan() is None
    from adjointhydro.fluxes import Vars
    y = torch.tensor([[10.0, 800.0]], dtype=torch.float64)
    fd = Vars(P=torch.tensor([3.0], dtype=torch.float64), T=torch.tensor([5.0], dtype=torch.float64),
              PET=torch.tensor([2.0], dtype=torch.float64))
    pd = Vars(zip(m.parameter_names, m.physical_parameters().unbind(-1)))
    fast = m._rate_function().bind(Vars(**fd, **pd))(y.T.contiguous()).T
    torch.testing.assert_close(fast, m.fluxes(y, fd, pd), rtol=0, atol=0)


def test_hybrids_structure():
    m50, m100 = exphydro_m50(), exphydro_m100()
    assert {type(f).__name__ for f in m50.neural_fluxes()} == {"NeuralFlux"}
    assert sorted(n for f in m50.neural_fluxes() for n in f.names) == ["Q", "et"]
    assert isinstance(m100.neural_fluxes()[0], NeuralFluxGroup) and len(m100.neural_fluxes()) == 1
    assert m100.flux_names == exphydro().flux_names
    forcing = synthetic_forcing(1, 100)
    with torch.no_grad():
        sol = solve(m100, forcing)
    assert abs(float(sol.mass_balance_error()[0])) < 1e-8
    ude = lotka_volterra_ude()
    assert sorted(n for f in ude.neural_fluxes() for n in f.names) == ["growth", "predation"]


def test_per_basin_parameters():
    m = bucket()
    forcing = Forcing(torch.zeros(3, 5, 1, dtype=torch.float64), ("P",))
    sol = solve(m, forcing, parameters={"k": [0.1, 0.2, 0.5]}, rtol=1e-10, atol=1e-10)
    assert torch.allclose(sol.store("S")[:, -1], 10 * torch.exp(-5 * torch.tensor([0.1, 0.2, 0.5], dtype=torch.float64)))
    m.set_parameters({"k": [0.1, 0.3, 0.5]})
    assert m.physical_parameters().shape == (3, 1)


# ------------------------------------------------------------------------- errors
def test_unknown_store_in_wiring():
    with pytest.raises(ModelError, match="enters store 'sol', which the model does not have"):
        Model([Store("soil")], [Flux("rain", None, "sol", lambda v: v.P)], forcing=["P"])


def test_unknown_flux_name_replaced():
    with pytest.raises(ModelError, match="no flux 'evap' to replace"):
        exphydro().replace_flux(NeuralFlux("evap", ["soil"]))


def test_neural_input_unknown():
    with pytest.raises(ModelError, match="reads 'moisture'"):
        exphydro().replace_flux(NeuralFlux("et", ["moisture"]))


def test_duplicate_names():
    with pytest.raises(ModelError, match="already used"):
        Model([Store("S")], [Flux("S", None, "S", lambda v: v.P)], forcing=["P"])


def test_parameters_outside_bounds():
    m = bucket()
    forcing = Forcing(torch.ones(2, 5, 1, dtype=torch.float64), ("P",))
    with pytest.raises(ModelError, match=r"parameter 'k' = 2.0 for basin 1 is outside its bounds \[0.01, 1.0\]"):
        solve(m, forcing, parameters={"k": [0.5, 2.0]})
    with pytest.raises(ModelError, match="outside its bounds"):
        m.set_parameters({"k": -1.0})


def test_forcing_errors_name_variable_basin_and_date():
    v = np.ones((2, 10, 2))
    dates = np.datetime64("2001-01-01") + np.arange(10)
    v[1, 3, 0] = np.nan
    with pytest.raises(ForcingError, match=r"non-finite value .* 'P' for basin 'b' at 2001-01-04"):
        Forcing(v, ("P", "PET"), dates=dates, basins=("a", "b"), source="f.csv")
    v[1, 3, 0] = -1.0
    with pytest.raises(ForcingError, match=r"f.csv: negative 'P' .* basin 'b' at 2001-01-04"):
        Forcing(v, ("P", "PET"), dates=dates, basins=("a", "b"), source="f.csv")
    with pytest.raises(ForcingError, match="shape"):
        Forcing(np.ones(10), ("P",))
    with pytest.raises(ForcingError, match="2 forcing variables but 1 names"):
        Forcing(np.ones((1, 10, 2)), ("P",))
    with pytest.raises(ForcingError, match="empty period"):
        Forcing(np.ones((1, 0, 1)), ("P",))


def test_missing_forcing_variable_for_model():
    with pytest.raises(ForcingError, match=r"needs forcing \['P', 'T', 'PET'\], missing \['T'\]"):
        solve(exphydro(), synthetic_forcing(1, 10, snow=False))


def test_wrong_initial_state_shape():
    with pytest.raises(ModelError, match=r"initial_state must have shape \[3, 2\]"):
        solve(exphydro(), synthetic_forcing(3, 10), initial_state=torch.zeros(2, 2))


def test_dtype_mismatch_is_explained():
    m = exphydro().replace_flux(NeuralFlux("et", ["soil", "PET"]))  # float32 network
    with pytest.raises(ModelError, match="call model.to"):
        solve(m, synthetic_forcing(1, 10), dtype=torch.float64)


@pytest.mark.parametrize("sensitivity", ["checkpoint", "direct"])
def test_solver_failure_names_basin_and_date(sensitivity):
    # a flux that blows up in basin 'c' from 2001-01-06 on
    m, forcing = failing_flux_case(3, 10, 5)
    with pytest.raises(SolverError, match=r"basin 'c' at 2001-01-06"):
        solve(m, forcing, sensitivity=sensitivity)


def test_unknown_method_and_sensitivity():
    f = synthetic_forcing(1, 5)
    with pytest.raises(ValueError, match="unknown method 'rk45'"):
        solve(exphydro(), f, method="rk45")
    with pytest.raises(ValueError, match="unknown sensitivity"):
        solve(exphydro(), f, sensitivity="backsolve")


# ------------------------------------------------------------- M100 partition of P
def _randomise(module, std=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def test_m100_group_partition_conserves_precipitation():
    """snowfall + rainfall == P exactly for random inputs and random weights (M100)."""
    from adjointhydro import Vars

    m100 = exphydro_m100(hidden=(16, 16))
    group = m100.neural_fluxes()[0]
    assert group.partition == {"P": ("snowfall", "rainfall")}
    g = torch.Generator().manual_seed(1)
    n = 2000
    for seed in range(5):
        _randomise(group, std=3.0, seed=seed)
        v = Vars(snow=torch.rand(n, generator=g, dtype=torch.float64) * 1000 - 10,
                 soil=torch.rand(n, generator=g, dtype=torch.float64) * 2000 - 10,
                 P=torch.rand(n, generator=g, dtype=torch.float64) * 80 * (torch.rand(n, generator=g) > 0.3),
                 T=torch.randn(n, generator=g, dtype=torch.float64) * 15,
                 PET=torch.rand(n, generator=g, dtype=torch.float64) * 8)
        out = group(v)
        snowfall, rainfall, melt, et, q = out.unbind(-1)
        assert torch.allclose(snowfall + rainfall, v.P, rtol=0, atol=1e-12)
        assert (out >= 0).all()
        assert (out[v.P == 0][:, :2] == 0).all()
        # melt limited by snow, et and Q by soil, as before
        assert (melt[v.snow <= 0] == 0).all() and (et[v.soil <= 0] == 0).all() and (q[v.soil <= 0] == 0).all()


def test_group_partition_general_and_backward_compatible():
    from adjointhydro import Vars

    wiring = [("a", None, "S"), ("b", None, "S"), ("c", None, "S"), ("d", "S", None)]
    kw = dict(hidden=(8,), input_loc={"x": 1.0}, input_scale={"x": 2.0}, output_scale=[1.0, 2.0, 3.0, 4.0],
              limit_by=[None, None, None, "S"], name="net")
    torch.manual_seed(0)
    plain = NeuralFluxGroup(wiring, ["x", "S"], **kw).double()
    torch.manual_seed(0)
    part = NeuralFluxGroup(wiring, ["x", "S"], partition={"R": ["a", "b", "c"]}, **kw).double()
    assert plain.partition == {}
    _randomise(plain)
    part.load_state_dict(plain.state_dict())  # same parameters and buffers
    v = Vars(x=torch.randn(50, dtype=torch.float64), S=torch.rand(50, dtype=torch.float64) * 10,
             R=torch.rand(50, dtype=torch.float64) * 5)
    p, q = plain(v), part(v)
    assert torch.allclose(q[:, :3].sum(-1), v.R, rtol=0, atol=1e-12)
    assert torch.equal(p[:, 3], q[:, 3])  # outputs outside the partition are unchanged
    # an untrained network (zero last layer) splits equally
    fresh = NeuralFluxGroup(wiring, ["x", "S"], partition={"R": ["a", "b", "c"]}, **kw).double()
    with torch.no_grad():
        fresh.net[-1].weight.zero_()
    assert torch.allclose(fresh(v)[:, :3], v.R[:, None].expand(-1, 3) / 3)
    with pytest.raises(ValueError, match="not an output"):
        NeuralFluxGroup(wiring, ["x"], partition={"R": ["a", "zz"]})
    with pytest.raises(ValueError, match="more than one group"):
        NeuralFluxGroup(wiring, ["x"], partition={"R": ["a", "b"], "Q": ["b", "c"]})
    with pytest.raises(ValueError, match="limit_by"):
        NeuralFluxGroup(wiring, ["x"], partition={"R": ["c", "d"]}, limit_by=[None, None, None, "S"])
    with pytest.raises(KeyError, match="partition variable 'R'"):
        part(Vars(x=v.x, S=v.S))


def test_m100_partition_mass_balance_and_gradients():
    """An M100 solve keeps the mass balance, its inflow is P, and gradients reach the group's weights."""
    torch.manual_seed(0)
    m100 = exphydro_m100(hidden=(8, 8))
    group = m100.neural_fluxes()[0]
    _randomise(group, std=0.5, seed=3)
    forcing = synthetic_forcing(2, 120)
    sol = solve(m100, forcing, sensitivity="checkpoint")
    assert float(sol.mass_balance_error().detach().abs().max()) < 1e-8
    inflow = (sol.flux("snowfall") + sol.flux("rainfall")).detach()
    assert torch.allclose(inflow, forcing["P"] * forcing.step, rtol=1e-6, atol=1e-9)
    loss = sol.stores[..., -1].sum() + sol.stores.pow(2).mean()
    loss.backward()
    grads = [p.grad for p in group.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert sum(float(gr.abs().sum()) for gr in grads) > 0
    # the first layer's weights on P and T (which decide the split) get gradient too
    assert float(group.net[0].weight.grad.abs().sum()) > 0


def test_network_subclass_with_its_own_forward_is_used_by_fluxes_and_solver():
    """A user's NeuralFlux subclass that overrides forward is run as written, not through
    the solver's prepared network path."""
    from adjointhydro.fluxes import Vars

    class Doubled(NeuralFlux):
        def forward(self, v):
            return 2.0 * super().forward(v)

    base = exphydro_m50(hidden=(8,))
    plain = base.flux("Q")
    doubled = Doubled("Q", list(plain.inputs), hidden=(8,), limit_by="soil")
    doubled.load_state_dict(plain.state_dict())
    m = base.replace_flux(doubled.double())
    y = torch.tensor([[10.0, 800.0], [0.0, 300.0]], dtype=torch.float64)
    fd = Vars(P=torch.tensor([3.0, 0.0], dtype=torch.float64), T=torch.tensor([5.0, -2.0], dtype=torch.float64),
              PET=torch.tensor([2.0, 1.0], dtype=torch.float64))
    pd = Vars(zip(m.parameter_names, m.physical_parameters().expand(2, -1).unbind(-1)))
    j = m.flux_names.index("Q")
    ref = base.fluxes(y, fd, pd)[:, j]
    torch.testing.assert_close(m.fluxes(y, fd, pd)[:, j], 2.0 * ref)
    fast = m._rate_function().bind(Vars(**fd, **pd))(y.T.contiguous())
    torch.testing.assert_close(fast[j], 2.0 * ref)


def test_periods_bound_together_equal_periods_bound_one_by_one():
    """The period-by-period solve binds a stretch of periods at once (:meth:`bind_rows`): each
    period's rate function equals the one bound for that period alone, for the M50 hybrid
    (networks with constant inputs folded in) and the physics model (split fluxes)."""
    from adjointhydro.fluxes import Vars

    gen = torch.Generator().manual_seed(5)
    B, c = 3, 4
    for m in (exphydro_m50(), exphydro()):
        prepared = m._rate_function()
        p = m.physical_parameters().expand(B, -1)
        f = {"P": torch.rand(c, B, generator=gen, dtype=torch.float64) * 20,
             "T": torch.randn(c, B, generator=gen, dtype=torch.float64) * 5,
             "PET": torch.rand(c, B, generator=gen, dtype=torch.float64) * 4}
        rows = Vars(zip(m.parameter_names, p.repeat(c, 1).unbind(-1)))
        rows.update({k: v.reshape(-1) for k, v in f.items()})
        at = prepared.bind_rows(rows, B)
        for k in range(c):
            one = Vars(zip(m.parameter_names, p.unbind(-1)))
            one.update({n: v[k] for n, v in f.items()})
            y = torch.rand(2, B, generator=gen, dtype=torch.float64) * torch.tensor([[30.0], [1500.0]], dtype=torch.float64)
            torch.testing.assert_close(at(k)(y), prepared.bind(one)(y), rtol=1e-15, atol=1e-15)


def _forcing_rows(m, R, gen):
    from adjointhydro.fluxes import Vars

    const = Vars(zip(m.parameter_names, m.physical_parameters().expand(R, -1).to(torch.float64).unbind(-1)))
    for name in m.forcing_names:
        const[name] = torch.rand(R, generator=gen, dtype=torch.float64) * 10 - (5 if name == "T" else 0)
    return const


def test_generated_rates_equal_the_general_evaluation():
    """Without autograd, a model whose fluxes are constant, split physics or plain networks is
    evaluated by one generated function (:meth:`_PreparedRates._straight`): the same rates,
    to the last bit, as the general evaluation, for every built-in model, for a network
    with several outputs (a group without partition) and for one reading an earlier flux.
    A group that partitions precipitation (M100) keeps the general evaluation."""
    from adjointhydro.fluxes import NeuralFluxGroup

    from adjointhydro.models import exphydro_m100, lotka_volterra_ude, reservoir_cascade

    gen = torch.Generator().manual_seed(11)
    base = exphydro()
    group = NeuralFluxGroup([("et", "soil", None), ("Q", "soil", None)], ["soil", "rainfall", "PET"],
                            hidden=(8,), limit_by=["soil", None]).double()
    grouped = Model(base.stores, list(base.flux_modules)[:3] + [group], base.forcing_names,
                    base.parameters_spec, ("Q",))
    models = [exphydro_m50(), exphydro(), exphydro(snow=False), reservoir_cascade(), lotka_volterra_ude(), grouped]
    for m in models:
        R = 7
        y = torch.rand(m.n_stores, R, generator=gen, dtype=torch.float64) * 100
        prepared = m._rate_function()
        with torch.no_grad():
            parts = prepared._bind_parts(_forcing_rows(m, R, gen))
            assert prepared._straight(parts) is not None, m.name
            fast = prepared._function(parts)(y)
            general = prepared._function(parts, straight=None)(y)
        assert torch.equal(fast, general), m.name
        with torch.enable_grad():  # under autograd: the general evaluation (custom reverse passes)
            assert torch.equal(prepared._function(parts)(y), general)
    m = exphydro_m100()
    prepared = m._rate_function()
    assert prepared._straight(prepared._bind_parts(_forcing_rows(m, 3, gen))) is None


def test_flux_functions_that_look_at_their_variables_are_traced_as_they_run():
    """``name in v`` answers as at run time while a flux is traced; a function that iterates
    over all variables is not traced (run as written). Both give the rates of the function."""
    from adjointhydro._trace import split_flux
    from adjointhydro.fluxes import Vars

    def leak(v):
        return 0.01 * v.soil * (v.P if "P" in v else 1.0)

    def drain(v):
        return 0.001 * v.soil * len(v)

    def noisy(v):  # a random draw per call: not traced (hoisting would draw once a period)
        return 0.001 * v.soil * (1.0 + 0.0 * torch.rand_like(v.P))

    for fn, traced in ((leak, True), (drain, False), (noisy, False)):
        base = exphydro()
        m = Model(base.stores, list(base.flux_modules) + [Flux("leak", "soil", None, fn)], base.forcing_names,
                  base.parameters_spec, base.discharge_fluxes)
        R = 4
        pd = Vars(zip(m.parameter_names, m.physical_parameters().expand(R, -1).unbind(-1)))
        fd = Vars(P=torch.full((R,), 3.0, dtype=torch.float64), T=torch.full((R,), 5.0, dtype=torch.float64),
                  PET=torch.full((R,), 2.0, dtype=torch.float64))
        y = torch.full((R, 2), 500.0, dtype=torch.float64)
        prepared = m._rate_function()
        fast = prepared.bind(Vars(**fd, **pd))(y.T.contiguous()).T
        torch.testing.assert_close(fast, m.fluxes(y, fd, pd), rtol=1e-14, atol=1e-14)
        f = m.flux_modules[-1]
        assert (split_flux(f, f.fn, tuple(pd) + tuple(fd), prepared._known[-1]) is not None) == traced
