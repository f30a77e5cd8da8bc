"""Dynamic (time-varying) parameters in regional training: dPL after Feng et al. (2022).

A dynamic parameter's value on day t comes from a network of the static attributes and
the trailing means of recent forcing; the solver takes it as a per-basin, per-day series
(piecewise constant, like forcing).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adjointhydro.model import ModelError
from adjointhydro.models import exphydro
from adjointhydro.regional import (
    AttributeParameters,
    _as_data,
    _simulate,
    cross_validate_basins,
    evaluate_regional,
    trailing_mean,
    train_regional,
)
from adjointhydro.solve import CheckpointedAdjoint, solve
from adjointhydro.synthetic import TWIN_BOUNDS, make_synthetic_basins, true_parameters

sys.path.insert(0, str(Path(__file__).parent))
from conftest import synthetic_forcing  # noqa: E402
from test_cli_regional import _config  # noqa: E402  (the regional CLI test configuration)
from test_regional import _short  # noqa: E402  (the short static training run)


@pytest.fixture(scope="module")
def small():
    """8 synthetic basins, 2 years (Euler steps: fast); the same as tests/test_regional.py."""
    return make_synthetic_basins(8, 2, seed=2, method="euler")


# ------------------------------------------------------------- (a) static unchanged
def test_static_training_is_unchanged(small, tmp_path):
    """Without dynamic parameters, training gives what it gave before the feature
    (values recorded with the code before it), and the network has no new state."""
    r = _short(small.dataset, out_dir=tmp_path / "run")
    np.testing.assert_allclose([h["train_loss"] for h in r.history], [0.23104036866743174, 0.182960911403705],
                               rtol=1e-9)
    np.testing.assert_allclose([h["val_loss"] for h in r.history], [0.23346438357447477, 0.23156910099374578],
                               rtol=1e-9)
    assert r.parameters["syn0000"]["Smax"] == pytest.approx(1706.4084260354607, rel=1e-9)
    assert r.dynamic_parameters == {} and not r.network.is_dynamic
    assert set(r.network.state_dict()) == {"low", "high", "attr_mean", "attr_std", "learned_index",
                                           "fixed_values", "net.0.weight", "net.0.bias", "net.2.weight",
                                           "net.2.bias"}
    assert not (tmp_path / "run" / "dynamic_parameters.npz").exists()
    cfg = __import__("json").loads((tmp_path / "run" / "config.json").read_text())
    assert not any(k.startswith("dynamic") for k in cfg)  # old checkpoints still resume


@pytest.mark.parametrize("method,sensitivity", [("euler", "direct"), ("euler", "checkpoint"),
                                                ("dopri5", "direct"), ("dopri5", "checkpoint"),
                                                ("dopri5", "adjoint")])
def test_constant_dynamic_series_equals_static_solve(method, sensitivity):
    """A dynamic series that holds the static value gives bit-identical discharge."""
    f = synthetic_forcing(3, 120)
    m = exphydro()
    p = m.physical_parameters().detach().expand(3, -1).clone()
    p[:, 1] = torch.tensor([300.0, 600.0, 900.0], dtype=torch.float64)  # Smax: initial state reads it
    a = solve(m, f, parameters=p, method=method, sensitivity=sensitivity)
    dyn = {"Smax": p[:, 1:2].expand(3, 120), "Df": p[0, 3].expand(120)}  # [basin, day] and [day]
    b = solve(m, f, parameters=p, dynamic_parameters=dyn, method=method, sensitivity=sensitivity)
    assert torch.equal(a.discharge, b.discharge)
    assert torch.equal(a.stores, b.stores)


# ------------------------------------------------------------------ (b) gradients
def _grad_problem():
    syn = make_synthetic_basins(3, 1, seed=5, method="euler")
    ds = syn.dataset
    m = exphydro()
    torch.manual_seed(0)
    net = AttributeParameters(m, ds.attribute_names, hidden=(6,), dynamic=("f", "Df"),
                              dynamic_inputs=("P", "T", "PET"), lookback=10, bounds=TWIN_BOUNDS)
    d = _as_data(m, ds, None, None, ds.attribute_names, network=net)
    net.fit_normalisation(d.attributes, d.basins, d.summaries)
    with torch.no_grad():  # away from the constant start, so every weight matters
        for layer in net.dynamic_net:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, 0.5)
    steps = slice(0, 45)  # winter: snow, some melt, baseflow
    obs = torch.as_tensor(d.observed[:, steps]) * 1.1

    def loss(sensitivity) -> torch.Tensor:
        q = _simulate(m, net, d, steps, method="dopri5", rtol=1e-8, atol=1e-8, sensitivity=sensitivity)
        return ((q - obs) ** 2).mean()

    return net, loss


def test_dynamic_network_gradients_agree_across_sensitivities_and_finite_differences():
    net, loss = _grad_problem()
    weights = list(net.dynamic_net.parameters())
    grads = {}
    # the checkpointed adjoint's sequential forward: its parallel-in-time Newton forward
    # (default for small batches) takes many iterations at this tight tolerance
    sensitivities = {"direct": "direct", "checkpoint": CheckpointedAdjoint(parallel_forward=False),
                     "adjoint": "adjoint"}
    for name, sens in sensitivities.items():
        net.zero_grad()
        loss(sens).backward()
        grads[name] = torch.cat([w.grad.reshape(-1) for w in weights])
    ref = grads["direct"]
    assert ref.abs().max() > 0
    for sens in ("checkpoint", "adjoint"):
        rel = float((grads[sens] - ref).norm() / ref.norm())
        assert rel < 1e-3, (sens, rel)
    # central finite difference on one first-layer weight
    W = net.dynamic_net[0].weight
    i, j = 2, 7  # a weight of a forcing summary input (attributes come first: 6 of them)
    h = 1e-5
    with torch.no_grad():
        W[i, j] += h
        lp = float(loss("direct"))
        W[i, j] -= 2 * h
        lm = float(loss("direct"))
        W[i, j] += h
    fd = (lp - lm) / (2 * h)
    ad = float(grads["direct"][i * W.shape[1] + j])
    assert abs(ad) > 1e-8
    assert fd == pytest.approx(ad, rel=1e-3)
    assert float(grads["checkpoint"][i * W.shape[1] + j]) == pytest.approx(fd, rel=1e-3)


# ------------------------------------------------------------ summaries and series
def test_trailing_mean_is_causal_and_exact():
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.normal(size=(2, 50, 3)))
    m = trailing_mean(x, 7)
    for t in (0, 3, 6, 7, 49):
        lo = max(0, t - 6)
        torch.testing.assert_close(m[:, t], x[:, lo:t + 1].mean(1), rtol=1e-12, atol=1e-12)
    y = x.clone()
    y[:, 30:] += 100.0  # a change on day 30 moves no earlier summary
    assert torch.equal(trailing_mean(y, 7)[:, :30], m[:, :30])
    assert not torch.equal(trailing_mean(y, 7)[:, 30], m[:, 30])
    torch.testing.assert_close(trailing_mean(x, 1), x)


def test_network_series_within_bounds_and_start_constant_at_default(small):
    m = exphydro()
    net = AttributeParameters(m, small.dataset.attribute_names, hidden=(8,), dynamic=("Df",))
    assert net.dynamic_inputs == ("P", "T", "PET") and net.lookback == 30  # the model's forcing by default
    summ = net.forcing_summaries(small.forcing)
    net.fit_normalisation(small.attributes, summaries=summ)
    s0 = net.dynamic_series(small.attributes, summ).detach()
    assert s0.shape == (8, 730, 1)
    torch.testing.assert_close(s0, torch.full_like(s0, 2.67), rtol=1e-6, atol=1e-6)  # Df's default
    with torch.no_grad():
        for layer in net.dynamic_net:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0, 5.0)
    s = net.dynamic_series(small.attributes, summ * 100).detach()
    assert (s >= 0.0).all() and (s <= 5.0).all() and s.std() > 0.1
    p = net(small.attributes).detach()  # every parameter, Df at mean recent forcing
    assert p.shape == (8, 6) and ((p[:, 3] >= 0) & (p[:, 3] <= 5)).all()


def test_training_with_windows_returns_the_series_and_writes_them(small, tmp_path):
    ds = small.dataset
    r = _short(ds, dynamic_parameters=["Df"], dynamic_inputs=["T"], dynamic_lookback=15, out_dir=tmp_path / "run")
    assert r.network.dynamic_names == ("Df",)
    s = r.dynamic_series("Df")
    assert s.shape == (8, 730) and np.isfinite(s).all() and s.std(axis=1).max() > 0  # varies in time
    assert list(r.dynamic_parameters) == list(ds.basins) and len(r.dates) == 730
    with np.load(tmp_path / "run" / "dynamic_parameters.npz") as z:
        np.testing.assert_array_equal(z["Df"], s)
        assert list(z["basins"]) == list(ds.basins) and z["dates"][0] == "2000-01-01"
    # evaluation re-simulates with the same series
    met, sim, dyn = evaluate_regional(exphydro(), r.network, ds, periods={"v": np.arange(730) >= 600},
                                      method="euler", return_dynamic=True)
    np.testing.assert_allclose(dyn["Df"], s, rtol=1e-12)
    assert met["syn0000"]["v"]["nse"] == pytest.approx(r.metrics["syn0000"]["validation"]["nse"], rel=1e-9)
    # resume compares the dynamic settings
    with pytest.raises(ValueError, match="written with other settings"):
        _short(ds, dynamic_parameters=["Df"], dynamic_inputs=["T"], dynamic_lookback=10, out_dir=tmp_path / "run",
               resume=True, epochs=3)


def test_cross_validation_collects_the_held_out_series(small):
    """Every basin's dynamic series in a cross-validation comes from the fold that held it out."""
    ds = small.dataset
    cv = cross_validate_basins(exphydro, ds, k=2, seed=1, train_mask=np.arange(730) >= 200, epochs=1, batch_size=4,
                               window=150, warmup=200, method="euler", sensitivity="direct", hidden=(8,),
                               parameter_bounds=TWIN_BOUNDS, patience=None, dynamic_parameters=["Df"],
                               dynamic_inputs=["T"], dynamic_lookback=15)
    assert set(cv.dynamic_parameters) == set(ds.basins)
    for f in cv.folds:
        held = ds.select_basins(f["test_basins"])
        _, _, dyn = evaluate_regional(f["model"], f["network"], held, periods={"all": np.ones(730, bool)},
                                      method="euler", return_dynamic=True)
        for j, b in enumerate(f["test_basins"]):
            s = cv.dynamic_parameters[b]["Df"]
            assert s.shape == (730,) and s.std() > 0
            np.testing.assert_allclose(s, dyn["Df"][j], rtol=1e-12)
    # the two folds' networks differ, so a basin's series is not the other fold's
    a, b = cv.folds[0], cv.folds[1]
    other = evaluate_regional(b["model"], b["network"], ds.select_basins(a["test_basins"][:1]),
                              method="euler", return_dynamic=True)[2]["Df"][0]
    assert np.abs(other - cv.dynamic_parameters[a["test_basins"][0]]["Df"]).max() > 1e-6


# -------------------------------------------------------------------- (d) bad input
def test_bad_dynamic_settings_give_clear_errors(small):
    ds = small.dataset
    m = exphydro()
    names = ds.attribute_names
    with pytest.raises(ValueError, match=r"dynamic parameter\(s\) \['melt_factor'\] are not parameters of "
                                         r"'EXP-HYDRO'"):
        AttributeParameters(m, names, dynamic=("melt_factor",))
    with pytest.raises(ValueError, match=r"lookback .* must be a whole number >= 1, got 0"):
        AttributeParameters(m, names, dynamic=("Df",), lookback=0)
    with pytest.raises(ValueError, match=r"lookback .* got 2\.5"):
        AttributeParameters(m, names, dynamic=("Df",), lookback=2.5)
    with pytest.raises(ValueError, match=r"\['Df'\] cannot be both fixed and dynamic"):
        AttributeParameters(m, names, dynamic=("Df",), fixed={"Df": 2.0})
    with pytest.raises(ValueError, match=r"no dynamic inputs"):
        AttributeParameters(m, names, dynamic=("Df",), dynamic_inputs=())
    with pytest.raises(ValueError, match=r"dynamic parameter\(s\) \['Dff'\]"):
        train_regional(m, ds, dynamic_parameters=["Dff"], epochs=1)
    with pytest.raises(ValueError, match=r"lookback .* got -3"):
        train_regional(m, ds, dynamic_parameters=["Df"], dynamic_lookback=-3, epochs=1)
    with pytest.raises(ValueError, match=r"dynamic input\(s\) \['srad'\] not in the forcing; available: "
                                         r"\['P', 'T', 'PET'\]"):
        train_regional(m, ds, dynamic_parameters=["Df"], dynamic_inputs=["T", "srad"], epochs=1)
    with pytest.raises(ValueError, match=r"dynamic input\(s\) \['srad'\] not in the forcing"):
        train_regional(m, ds.to_forcing(["P", "T", "PET"]), ds.observed(), ds.attributes, attribute_names=names,
                       dynamic_parameters=["Df"], dynamic_inputs=["srad"], epochs=1)
    with pytest.raises(ValueError, match=r"dynamic input\(s\) \['srad'\] not in the forcing"):
        cross_validate_basins(exphydro, ds, k=2, dynamic_parameters=["Df"], dynamic_inputs=["srad"], epochs=1)


def test_solve_rejects_bad_dynamic_series():
    f = synthetic_forcing(2, 30)
    m = exphydro()
    with pytest.raises(ModelError, match=r"unknown dynamic parameters \['k'\]"):
        solve(m, f, dynamic_parameters={"k": torch.ones(2, 30)})
    with pytest.raises(ModelError, match=r"'Df' must have shape \[2, 30\] \(basin, period\) or \[30\], got \(2, 29\)"):
        solve(m, f, dynamic_parameters={"Df": torch.ones(2, 29)})
    bad = torch.full((2, 30), 2.0)
    bad[1, 12] = 7.0
    with pytest.raises(ModelError, match=r"'Df' = 7\.0 for basin '1' at 2001-01-13 is not finite or outside its "
                                         r"bounds \[0\.0, 5\.0\]"):
        solve(m, f, dynamic_parameters={"Df": bad})


# ---------------------------------------------------------------- (c) synthetic twin
def test_twin_recovers_a_parameter_that_varies_with_recent_temperature():
    """EXP-HYDRO (no snow) whose baseflow parameter f truly varies in time,
    f_t = f_b * (0.4 + 1.1 sigmoid((T30_t - 10 degC) / 3 degC)) with T30 the 30-day trailing
    mean temperature and f_b the basin's value from its attributes; Smax and Qmax known.
    8 basins, 2 years: year 1 trains (after 30 days), year 2 is held out. One-day Euler
    steps, checkpointed adjoint, full batch, 80 Adam steps each for a static and a dynamic
    f network. Measured (2 loaded cores, ~45 s): held-out median NSE 0.21 static, 0.95
    dynamic; correlation of learned and true f over the held-out year 0.94 (pooled),
    0.97 (median over basins)."""
    syn = make_synthetic_basins(8, 2, seed=3, method="euler")
    ds = syn.dataset
    f = ds.to_forcing(["P", "T", "PET"])
    T = f.n_steps
    t30 = trailing_mean(f["T"][..., None], 30)[..., 0].numpy()
    f_true = true_parameters(ds.attributes)[:, :1] * (0.4 + 1.1 / (1.0 + np.exp(-(t30 - 10.0) / 3.0)))
    m = exphydro(snow=False)
    known = {"Smax": 400.0, "Qmax": 15.0}
    with torch.no_grad():
        q = solve(m, f, parameters={**known, "f": 0.02}, dynamic_parameters={"f": torch.as_tensor(f_true)},
                  method="euler", sensitivity="direct").discharge.numpy()
    k = np.arange(T)
    year1 = slice(0, 365)
    kw = dict(attribute_names=ds.attribute_names, fixed_parameters=known, parameter_bounds={"f": (1e-4, 0.06)},
              start="middle", train_mask=k[year1] >= 30, window=None, batch_size=8, epochs=80, lr=0.01,
              lr_schedule="cosine", patience=None, val_every=80, method="euler", sensitivity="checkpoint",
              hidden=(16,), final_metrics=False)
    periods = {"test": k >= 365}
    nse = {}
    for label, dyn in (("static", ()), ("dynamic", ("f",))):
        # T is not a forcing of the no-snow model: the summaries read it from the data
        r = train_regional(m, f.select(steps=year1), q[:, year1], ds.attributes, dynamic_parameters=dyn,
                           dynamic_inputs=("P", "T", "PET"), dynamic_lookback=30, **kw)
        met, _, series = evaluate_regional(m, r.network, f, q, ds.attributes, periods=periods, method="euler",
                                           return_dynamic=True)
        nse[label] = float(np.median([met[b]["test"]["nse"] for b in met]))
    est = series["f"][:, 365:]
    truth = f_true[:, 365:]
    corr = float(np.corrcoef(est.ravel(), truth.ravel())[0, 1])
    corr_basin = float(np.median([np.corrcoef(est[i], truth[i])[0, 1] for i in range(8)]))
    print(f"\nheld-out median NSE static {nse['static']:.3f}, dynamic {nse['dynamic']:.3f}; "
          f"corr(f) pooled {corr:.3f}, per-basin median {corr_basin:.3f}")
    assert nse["dynamic"] > 0.8, nse
    assert nse["dynamic"] > nse["static"] + 0.4, nse
    assert corr > 0.8 and corr_basin > 0.8, (corr, corr_basin)


# ------------------------------------------------------------- configuration and CLI
@pytest.fixture(scope="module")
def h5(tmp_path_factory):
    from adjointhydro.data import write_hdf5

    syn = make_synthetic_basins(4, years=1, seed=3, method="euler")
    path = tmp_path_factory.mktemp("dynamic") / "basins.h5"
    write_hdf5(syn.dataset, path)
    return path


@pytest.mark.parametrize("regional, key", [
    ('dynamic_parameters = ["Dff"]', "regional.dynamic_parameters[0]: 'Dff' is not a parameter of the model"),
    ('dynamic_parameters = ["Df"]\ndynamic_lookback = 0', "regional.dynamic_lookback: days of the trailing"),
    ('dynamic_parameters = ["Df"]\ndynamic_inputs = ["srad"]',
     "regional.dynamic_inputs[0]: 'srad' is not a forcing variable of the data"),
    ('dynamic_inputs = ["T"]', "regional.dynamic_inputs: only used with regional.dynamic_parameters"),
    ('dynamic_parameters = "Df"', "regional.dynamic_parameters: expected"),
])
def test_config_dynamic_keys_errors_name_the_key(tmp_path, h5, regional, key):
    from adjointhydro.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as e:
        parse_config(_config(h5, regional), path=tmp_path / "c.toml")
    assert key in str(e.value)


def test_dynamic_parameters_through_the_cli(tmp_path, h5, capsys):
    from adjointhydro.cli import main

    cfg = tmp_path / "config.toml"
    cfg.write_text(_config(h5, 'dynamic_parameters = ["f"]\ndynamic_inputs = ["P", "T"]\n'
                                        'dynamic_lookback = 10'), encoding="utf-8")
    assert main(["train", str(cfg), "-q", "-o", str(tmp_path / "runs")]) == 0
    (run,) = list((tmp_path / "runs").iterdir())
    with np.load(run / "dynamic_parameters.npz") as z:
        f1 = z["f"]
        assert f1.shape == (4, len(z["dates"])) and list(z["basins"]) == ["syn0000", "syn0001", "syn0002",
                                                                           "syn0003"]
    assert np.isfinite(f1).all() and (f1 > 0).all()
    (run / "dynamic_parameters.npz").unlink()
    assert main(["evaluate", str(run), "-q"]) == 0  # model.pt holds the dynamic network
    with np.load(run / "dynamic_parameters.npz") as z:
        np.testing.assert_allclose(z["f"], f1, rtol=1e-12)
