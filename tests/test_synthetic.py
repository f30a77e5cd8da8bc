"""Synthetic large-sample generator: shapes, determinism, mass balance, bounds, recoverability."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adjointhydro.data import hamon_pet
from adjointhydro.models import EXPHYDRO_PARAMETERS, exphydro
from adjointhydro.solve import solve
from adjointhydro.synthetic import (
    ATTRIBUTE_RANGES,
    ATTRIBUTES,
    TWIN_FIXED,
    make_synthetic_basins,
    parameter_sensitivity,
    true_parameters,
)


@pytest.fixture(scope="module")
def syn():
    return make_synthetic_basins(24, 2, seed=3, method="euler")


def test_shapes_names_units(syn):
    ds = syn.dataset
    assert ds.n_basins == 24 and ds.n_steps == 730
    assert ds.forcing.shape == (24, 730, 3)
    assert ds.forcing_names == ["P", "T", "PET"] and ds.forcing_units == ["mm/day", "degC", "mm/day"]
    assert ds.observation_names == ["Q"] and ds.observed().shape == (24, 730)
    assert ds.attribute_names == list(ATTRIBUTES) and ds.attributes.shape == (24, 6)
    assert syn.true_parameters.shape == (24, 6)
    assert syn.parameter_names == tuple(p.name for p in EXPHYDRO_PARAMETERS)
    assert str(ds.dates[0]) == "2000-01-01" and ds.basins[0] == "syn0000"
    for j, n in enumerate(ATTRIBUTES):
        lo, hi, _ = ATTRIBUTE_RANGES[n]
        assert np.all((ds.attributes[:, j] >= lo) & (ds.attributes[:, j] <= hi)), n


def test_deterministic_with_the_seed():
    a = make_synthetic_basins(5, 1, seed=11, method="euler", noise=0.1, missing_fraction=0.1)
    b = make_synthetic_basins(5, 1, seed=11, method="euler", noise=0.1, missing_fraction=0.1)
    c = make_synthetic_basins(5, 1, seed=12, method="euler", noise=0.1, missing_fraction=0.1)
    np.testing.assert_array_equal(a.dataset.forcing, b.dataset.forcing)
    np.testing.assert_array_equal(a.observed, b.observed)  # NaN at the same places too
    np.testing.assert_array_equal(a.attributes, b.attributes)
    assert not np.allclose(a.dataset.forcing, c.dataset.forcing)


def test_mass_balance_and_water_budget(syn):
    # the solver conserves water to rounding in every basin
    assert np.abs(syn.mass_balance_error).max() < 1e-8
    ds = syn.dataset
    p, pet = ds.forcing_variable("P"), ds.forcing_variable("PET")
    q = syn.discharge
    assert np.all(p >= 0) and np.all(pet >= 0) and np.all(q >= 0)
    # discharge cannot exceed precipitation plus what the initially full soil can release
    smax = syn.true_parameters[:, 1]
    assert np.all(q.sum(1) <= p.sum(1) + smax + 1e-6)
    # the weather generator hits the prescribed aridity (mean PET / mean P) exactly
    np.testing.assert_allclose(pet.mean(1) / p.mean(1), ds.attribute("aridity"), rtol=1e-9)


def test_weather_generator_statistics():
    syn = make_synthetic_basins(60, 3, seed=5, method="euler")
    ds = syn.dataset
    p, t, pet = (ds.forcing_variable(n) for n in ("P", "T", "PET"))
    wet = p > 0
    assert 0.3 < wet.mean() < 0.65
    # wet days cluster (Markov chain): P(wet | wet) > P(wet | dry)
    p11 = (wet[:, 1:] & wet[:, :-1]).sum() / wet[:, :-1].sum()
    p01 = (wet[:, 1:] & ~wet[:, :-1]).sum() / (~wet[:, :-1]).sum()
    assert p11 > p01 + 0.2
    # temperature: lapse rate ~6.5 degC/km recovered by regression on elevation and latitude
    X = np.column_stack([np.ones(60), ds.attribute("elevation") / 1000, ds.attribute("latitude")])
    coef = np.linalg.lstsq(X, t.mean(1), rcond=None)[0]
    assert coef[1] == pytest.approx(-6.5, abs=0.6) and coef[2] == pytest.approx(-0.5, abs=0.15)
    # seasonal cycle: July warmer than January by a latitude-dependent amplitude
    doy = (ds.dates - ds.dates.astype("datetime64[Y]")).astype(int)
    assert np.all(t[:, (doy > 180) & (doy < 215)].mean(1) - t[:, doy < 31].mean(1) > 10)
    # PET is Hamon's of the generated temperature
    np.testing.assert_allclose(pet[0], hamon_pet(t[0], ds.attribute("latitude")[0], doy + 1), rtol=1e-12)


def test_parameters_within_bounds_and_equal_the_known_function(syn):
    p = syn.true_parameters
    for j, spec in enumerate(EXPHYDRO_PARAMETERS):
        assert np.all((p[:, j] > spec.low) & (p[:, j] < spec.high)), spec.name
    np.testing.assert_array_equal(p, true_parameters(syn.attributes))
    # extreme attributes (corners of the ranges) also stay inside the bounds
    corners = np.array([[ATTRIBUTE_RANGES[n][k] for n in ATTRIBUTES] for k in (0, 1)])
    pc = true_parameters(corners)
    for j, spec in enumerate(EXPHYDRO_PARAMETERS):
        assert np.all((pc[:, j] > spec.low) & (pc[:, j] < spec.high)), spec.name
    # baseflow slope stays below 2/day: one-day Euler steps are stable
    assert (pc[:, 0] * pc[:, 2]).max() < 1.2


def test_discharge_is_exphydro_of_the_true_parameters(syn):
    f = syn.forcing
    with torch.no_grad():
        q = solve(exphydro(), f, parameters=torch.as_tensor(syn.true_parameters), method="euler",
                  sensitivity="direct").discharge.numpy()
    np.testing.assert_allclose(q, syn.discharge, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(syn.observed, syn.discharge)  # no noise, no gaps by default


def test_the_function_is_recoverable_from_attributes():
    # a smooth map: a quadratic regression on the attributes explains nearly all of it
    rng = np.random.default_rng(0)
    a = np.column_stack([rng.uniform(*ATTRIBUTE_RANGES[n][:2], 400) for n in ATTRIBUTES])
    p = true_parameters(a)
    z = (a - a.mean(0)) / a.std(0)
    X = np.column_stack([np.ones(400), z] + [z[:, i] * z[:, j] for i in range(6) for j in range(i, 6)])
    for j, spec in enumerate(EXPHYDRO_PARAMETERS):
        if spec.name in TWIN_FIXED:
            assert np.all(p[:, j] == TWIN_FIXED[spec.name])  # the snow thresholds are constant
            continue
        fit = X @ np.linalg.lstsq(X, p[:, j], rcond=None)[0]
        r2 = 1 - ((p[:, j] - fit) ** 2).sum() / ((p[:, j] - p[:, j].mean()) ** 2).sum()
        assert r2 > 0.97, (spec.name, r2)
        assert p[:, j].std() > 0.05 * (spec.high - spec.low) or spec.name == "f", spec.name
        assert p[:, j].std() > 0.0


def test_noise_and_gaps():
    s = make_synthetic_basins(4, 1, seed=1, method="euler", noise=0.2, missing_fraction=0.25)
    miss = np.isnan(s.observed)
    assert 0.2 < miss.mean() < 0.3
    ok = ~miss & (s.discharge > 0.1)
    ratio = np.log(s.observed[ok] / s.discharge[ok])
    assert ratio.std() == pytest.approx(0.2, rel=0.15) and abs(ratio.mean()) < 0.05


def test_parameter_sensitivity_ranks_baseflow_and_capacity_above_snow_thresholds(syn):
    sens = parameter_sensitivity(exphydro(), syn.forcing, syn.true_parameters, method="euler")
    med = {k: float(np.median(v)) for k, v in sens.items()}
    assert set(med) == {"f", "Smax", "Qmax", "Df", "Tmax", "Tmin"}
    assert med["f"] > 0.1 and med["Smax"] > 0.02
    assert med["Tmin"] < med["Smax"] and med["Tmin"] < med["f"]


def test_profile_sensitivity_exposes_the_melt_factor_threshold_tradeoff(syn):
    """Df alone moves the discharge, but Tmax can compensate it (melt = Df (T - Tmax)):
    with both free, Df is not identifiable; with the thresholds known, it is again."""
    f, p = syn.forcing, syn.true_parameters
    marg = parameter_sensitivity(exphydro(), f, p, method="euler")
    both = parameter_sensitivity(exphydro(), f, p, method="euler", kind="profile")
    known = parameter_sensitivity(exphydro(), f, p, method="euler", kind="profile", free=["f", "Smax", "Qmax", "Df"])
    assert set(known) == {"f", "Smax", "Qmax", "Df"}
    snowy = marg["Df"] >= 0.02
    assert snowy.sum() >= 5
    assert np.median(both["Df"][snowy]) < 0.1 * np.median(marg["Df"][snowy])
    assert np.median(known["Df"][snowy]) > 10 * np.median(both["Df"][snowy])
    # compensation can only lower a parameter's profile sensitivity: more free parameters, less
    for n in known:
        assert np.all(both[n] <= known[n] * (1 + 1e-6) + 1e-12), n
    assert np.all(both["f"] > 0.02)  # the baseflow decline is identifiable in every basin


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_basins must be at least 1"):
        make_synthetic_basins(0)
    with pytest.raises(ValueError, match="missing_fraction"):
        make_synthetic_basins(2, 1, missing_fraction=1.0)
    with pytest.raises(ValueError, match=r"attributes must have shape \[basin, 6\]"):
        true_parameters(np.zeros((3, 4)))
