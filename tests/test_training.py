"""Tests of adjointhydro.training: calibration, DE baseline, flux pre-training, hybrid training.

Fast by default (short Leaf River records, small networks, one torch thread);
the longer science checks are marked ``slow`` and run with ``--runslow`` (or
``ADJOINTHYDRO_RUNSLOW=1``).
"""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch

from adjointhydro import training
from adjointhydro.data import load_leaf_river
from adjointhydro.fluxes import Vars
from adjointhydro.metrics import nse
from adjointhydro.models.exphydro import exphydro, exphydro_m50
from adjointhydro.solve import CheckpointedAdjoint, SolverError, solve
from adjointhydro.training import (
    CalibrationResult,
    calibrate,
    calibrate_de,
    masks_from_dates,
    pretrain_fluxes,
    train_hybrid,
)

TRUTH = (0.02, 800.0, 15.0)  # f [1/mm], Smax [mm], Qmax [mm/day] of exphydro(snow=False)


@pytest.fixture(autouse=True)
def _slow_gate(request):
    if request.node.get_closest_marker("slow") is not None:
        if not (request.config.getoption("--runslow", default=False) or os.environ.get("ADJOINTHYDRO_RUNSLOW")):
            pytest.skip("slow: run with --runslow or ADJOINTHYDRO_RUNSLOW=1")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny tensors: extra threads only add synchronisation (and oversubscribe shared CI cores)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def leaf():
    return load_leaf_river()


def _synthetic(leaf, days):
    forcing = leaf.to_forcing(["P", "PET"]).select(steps=slice(0, days))
    model = exphydro(snow=False)
    truth = torch.tensor([TRUTH], dtype=torch.float64)
    with torch.no_grad():
        sol = solve(model, forcing, parameters=truth)
    return model, forcing, truth, sol


# --------------------------------------------------------------- calibrate
def test_calibrate_recovers_parameters_fast(leaf):
    """One year of synthetic discharge; batched Adam starts, stopped at NSE 0.99."""
    model, forcing, truth, sol = _synthetic(leaf, 365)
    q = sol.discharge.numpy()
    mask = np.arange(365) >= 30
    # parallel-in-time forward: fine here (Adam's small steps stay away from stiff corners)
    sens = CheckpointedAdjoint(parallel_forward=True)
    res = calibrate(
        model, forcing, q, score_mask=mask, optimizer="adam", lr=0.1, n_starts=3, iterations=30,
        seed=0, target_loss=0.01, sensitivity=sens,
    )
    assert isinstance(res, CalibrationResult)
    assert res.stopped_at_target and len(res.history) < 30
    assert res.parameters.shape == (1, 3) and res.all_start_losses.shape == (3, 1)
    assert res.loss[0] == pytest.approx(res.all_start_losses.min())
    assert res.n_model_runs == 3 * res.n_solves == res.history[-1]["model_runs"]
    with torch.no_grad():
        sim = solve(model, forcing, parameters=res.parameters, sensitivity=sens).discharge.numpy()
    assert nse(q[0, mask], sim[0, mask]) > 0.99
    # (Newton's parallel forward converges to the solver tolerance, not to rounding)
    assert 1 - nse(q[0, mask], sim[0, mask]) == pytest.approx(res.loss[0], rel=1e-2)
    f = float(res.parameters[0, 0])
    assert abs(f - TRUTH[0]) / TRUTH[0] < 0.15  # the best-identified parameter


def test_calibrate_batched_starts_equal_separate_runs(leaf):
    """Adam is element-wise: start 0 of a 3-start batch follows the single-start run."""
    model, forcing, truth, sol = _synthetic(leaf, 60)
    q = sol.discharge.numpy()
    kw = dict(score_mask=np.arange(60) >= 10, optimizer="adam", iterations=4, lr=0.1, seed=3,
              sensitivity="direct")
    batch = calibrate(model, forcing, q, n_starts=3, **kw)
    single = calibrate(model, forcing, q, n_starts=1, **kw)
    assert batch.all_start_losses.shape == (3, 1)
    assert len(set(np.round(batch.all_start_losses[:, 0], 8))) == 3  # different starts
    assert batch.all_start_losses[0, 0] == pytest.approx(single.all_start_losses[0, 0], rel=1e-8)
    torch.testing.assert_close(batch.all_start_parameters[0], single.all_start_parameters[0], rtol=1e-8, atol=0)
    # history: best so far, cumulative model runs counted per start-row
    losses = [h["loss"] for h in batch.history]
    assert all(a >= b for a, b in zip(losses, losses[1:]))
    assert losses[-1] < losses[0]
    assert [h["model_runs"] for h in batch.history] == [3 * (i + 1) for i in range(5)]
    assert batch.n_model_runs == 15 and single.n_model_runs == 5
    low, high = model.param_low, model.param_high
    assert ((batch.all_start_parameters >= low) & (batch.all_start_parameters <= high)).all()


def test_calibrate_lbfgs_survives_solver_failure(leaf, monkeypatch):
    """L-BFGS: a trial point the solver cannot integrate counts as a large loss, the run goes on."""
    model, forcing, truth, sol = _synthetic(leaf, 30)
    q = sol.discharge.numpy()
    calls = []

    def flaky_solve(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise SolverError("solver failed for basin 'leaf_river' at 1957-02-01: step size underflow")
        return solve(*a, **k)

    monkeypatch.setattr(training, "solve", flaky_solve)
    res = calibrate(model, forcing, q, score_mask=np.arange(30) >= 5, optimizer="lbfgs", n_starts=2,
                    iterations=2, seed=0)
    assert res.method == "lbfgs" and res.n_failed_solves == 1
    assert res.n_solves == len(calls) and res.n_model_runs == 2 * len(calls)
    assert len(res.history) == 2
    assert res.history[-1]["loss"] < res.history[0]["loss"] or res.loss[0] < 0.05
    assert np.isfinite(res.all_start_losses).all()


def test_calibrate_lbfgs_trial_steps_stay_in_the_trust_region(leaf, monkeypatch):
    """Near a bound the sigmoid's gradient vanishes and the quasi-Newton step can leap into
    a corner of the parameter box (on Leaf River a stiff, empty bucket that cost one trial
    solve minutes); such trials are rejected without a solve, and calibration still converges."""
    model, forcing, truth, sol = _synthetic(leaf, 120)
    q = sol.discharge.numpy()
    seen = []

    def recording_solve(*a, **k):
        seen.append(model.to_unconstrained(k["parameters"].detach()).clone())
        return solve(*a, **k)

    monkeypatch.setattr(training, "solve", recording_solve)
    # (12 iterations: in this stiff start the loss is rough at the solver's tolerance, and
    # after 8 the fit was 0.006 to 0.045 depending on how the solves were made, the
    # period-by-period one included; after 12, 0.004 to 0.008)
    res = calibrate(model, forcing, q, score_mask=np.arange(120) >= 20, optimizer="lbfgs", n_starts=2,
                    iterations=12, seed=0)
    raw = torch.stack(seen)  # [solve, row, parameter]
    # every trial lies within the trust radius (4 logit units) of the iterate it was tried
    # from, so two consecutive evaluations are at most 8 apart (without it, this start's
    # second iteration tries a point 24 away)
    assert training._LBFGS_TRUST == 4.0
    assert float((raw[1:] - raw[:-1]).abs().max()) <= 8.0
    assert res.n_failed_solves == 0
    assert res.loss[0] < 0.02  # 1 - NSE against the synthetic truth


@pytest.mark.slow
def test_calibrate_recovers_parameters_two_years(leaf):
    model, forcing, truth, sol = _synthetic(leaf, 730)
    q = sol.discharge.numpy()
    mask = np.arange(730) >= 30
    res = calibrate(model, forcing, q, score_mask=mask, optimizer="lbfgs", n_starts=4, iterations=40, seed=1)
    with torch.no_grad():
        sim = solve(model, forcing, parameters=res.parameters).discharge.numpy()
    assert nse(q[0, mask], sim[0, mask]) > 0.999
    f, smax, qmax = res.parameters[0].tolist()
    assert abs(f - TRUTH[0]) / TRUTH[0] < 0.03
    assert abs(smax - TRUTH[1]) / TRUTH[1] < 0.3
    assert abs(qmax - TRUTH[2]) / TRUTH[2] < 0.5
    # Adam, batched starts, reaches the same fit level
    res_a = calibrate(model, forcing, q, score_mask=mask, optimizer="adam", n_starts=4, iterations=80, lr=0.1, seed=1)
    assert res_a.loss[0] < 0.01


# ------------------------------------------------------------ calibrate_de
def test_calibrate_de_improves_and_counts_runs(leaf):
    model, forcing, truth, sol = _synthetic(leaf, 90)
    q = sol.discharge.numpy()
    mask = np.arange(90) >= 10
    res = calibrate_de(model, forcing, q, score_mask=mask, popsize=4, maxiter=3, seed=0)
    pop = 4 * 3
    assert res.method == "de"
    assert res.n_model_runs == pop * (1 + 3) == pop * len(res.history)
    assert res.loss[0] < res.history[0]["loss"]  # better than the best initial member
    assert res.loss[0] == res.history[-1]["loss"]
    assert res.parameters.shape == (1, 3)
    with torch.no_grad():
        sim = solve(model, forcing, parameters=res.parameters, sensitivity="direct").discharge.numpy()
    assert 1 - nse(q[0, mask], sim[0, mask]) == pytest.approx(res.loss[0], rel=1e-9)
    # target_loss stops after the first generation that reaches it
    stop = calibrate_de(model, forcing, q, score_mask=mask, popsize=4, maxiter=3, seed=0,
                        target_loss=res.history[1]["loss"])
    assert stop.stopped_at_target and len(stop.history) == 2


def test_calibrate_de_splits_a_failing_population(leaf, monkeypatch):
    model, forcing, truth, sol = _synthetic(leaf, 60)
    q = sol.discharge.numpy()

    def picky_solve(m, f, *, parameters, **k):
        # members with Qmax > 45 "fail", as a stiff corner of the box might
        if bool((parameters[:, 2] > 45).any()):
            raise SolverError("step size underflow")
        return solve(m, f, parameters=parameters, **k)

    monkeypatch.setattr(training, "solve", picky_solve)
    res = calibrate_de(model, forcing, q, popsize=5, maxiter=2, seed=0)
    assert res.n_failed_solves > 0
    assert np.isfinite(res.loss[0]) and float(res.parameters[0, 2]) <= 45


# -------------------------------------------------------- pretrain_fluxes
def test_pretrain_fluxes_matches_physics(leaf):
    model, forcing, truth, sol = _synthetic(leaf, 365)
    torch.manual_seed(0)
    hybrid = exphydro_m50(snow=False, hidden=(16, 16))
    hist = pretrain_fluxes(hybrid, sol, forcing, truth, epochs=250, lr=1e-2, physics_model=model)
    assert set(hist) == {"et", "Q"}
    assert all(len(h) == 250 and h[-1] < h[0] for h in hist.values())
    soil = sol.stores[0, :-1, 0]
    P, PET = forcing["P"][0], forcing["PET"][0]
    pv = Vars(zip(model.parameter_names, truth[0].expand(365, 3).unbind(-1)))
    v = Vars(soil=soil, P=P, PET=PET, **pv)
    with torch.no_grad():
        exact = model.fluxes(soil[:, None], Vars(P=P, PET=PET), pv)
        for name in ("et", "Q"):
            target = exact[:, model.flux_names.index(name)]
            pred = hybrid.flux(name).forward(v)
            r2 = 1 - ((pred - target) ** 2).mean() / target.var(unbiased=False)
            assert r2 > 0.95, (name, float(r2))
    # normalisation set from the physics run
    et_net = hybrid.flux("et")
    i = et_net.inputs.index("soil")
    assert float(et_net.input_loc[i]) == pytest.approx(float(soil.mean()))


def test_pretrain_flux_group_and_period_totals(forcing3):
    """NeuralFluxGroup (M100) on three basins; without physics_model the targets are period means."""
    from adjointhydro.models.exphydro import exphydro_m100

    forcing = forcing3.select(steps=slice(0, 200))
    physics = exphydro(snow=True)
    params = physics.physical_parameters().detach()  # [1, P], shared by the basins
    with torch.no_grad():
        sol = solve(physics, forcing, parameters=params)
    torch.manual_seed(0)
    hybrid = exphydro_m100(hidden=(16,))
    hist = pretrain_fluxes(hybrid, sol, forcing, params, epochs=150, lr=1e-2, physics_model=physics)
    assert set(hist) == {"snowfall", "rainfall", "melt", "et", "Q"}
    for name, h in hist.items():
        assert h[-1] < 0.5 * h[0], name
    m50 = exphydro_m50(snow=True, hidden=(8,))
    hist = pretrain_fluxes(m50, sol, forcing, params[0], epochs=20, score_mask=np.arange(200) >= 50)
    assert set(hist) == {"et", "Q"} and all(h[-1] < h[0] for h in hist.values())


# ----------------------------------------------------------- train_hybrid
def _small_hybrid():
    torch.manual_seed(0)
    return exphydro_m50(snow=False, hidden=(8,))


def _hybrid_setup(leaf, days=120):
    forcing = leaf.to_forcing(["P", "PET"]).select(steps=slice(0, days))
    obs = leaf.observed("Q")[:, :days]
    t = np.arange(days)
    return forcing, obs, (t >= 20) & (t < 90), t >= 90


class _Interrupt(Exception):
    pass


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _strip(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_train_hybrid_resume_equals_uninterrupted(leaf, tmp_path):
    forcing, obs, train, val = _hybrid_setup(leaf)
    kw = dict(train_mask=train, val_mask=val, epochs=6, lr=2e-2, lr_schedule="cosine", patience=10,
              seed=0, progress=False, train_parameters=True)

    full_model = _small_hybrid()
    full = train_hybrid(full_model, forcing, obs, checkpoint_dir=tmp_path / "full", **kw)
    assert [h["epoch"] for h in full.history] == list(range(6))
    assert full.history[-1]["train_loss"] < full.history[0]["train_loss"]

    # killed after 3 epochs (on_epoch runs after last.pt is written) ...
    def stop_after_three(epoch, record):
        if epoch == 2:
            raise _Interrupt

    part_model = _small_hybrid()
    with pytest.raises(_Interrupt):
        train_hybrid(part_model, forcing, obs, checkpoint_dir=tmp_path / "run", on_epoch=stop_after_three, **kw)
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ck["epoch"] == 3 and len(ck["history"]) == 3
    # the warm start of the next epoch's Newton forward solve is saved with the checkpoint
    # (restored on resume: otherwise the resumed steps differ at the solver tolerance)
    assert ck["warm_start"]["stores"].shape == (1, forcing.n_steps + 1, 1)  # one store (no snow)
    assert ck["warm_start"]["dt"].shape == (1, forcing.n_steps)  # each period's first step
    # ... and resumed on a fresh model object
    seen = []
    res_model = _small_hybrid()
    res = train_hybrid(res_model, forcing, obs, checkpoint_dir=tmp_path / "run", resume=True,
                       on_epoch=lambda e, r: seen.append(e), **kw)
    assert seen == [3, 4, 5]
    assert _strip(res.history) == _strip(full.history)
    assert (res.best_epoch, res.best_val_loss) == (full.best_epoch, full.best_val_loss)
    wf, wr = _weights(full_model), _weights(res_model)
    assert wf.keys() == wr.keys()
    for k in wf:
        assert torch.equal(wf[k], wr[k]), k
    # the model holds the best weights, as saved in best.pt
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["epoch"] == res.best_epoch
    for k, v in best["model"].items():
        assert torch.equal(v, wr[k]), k
    assert not glob.glob(str(tmp_path / "run" / ".*tmp"))


def test_train_hybrid_extend_epochs_without_schedule(leaf, tmp_path):
    """run 2 epochs, then resume to 4 == 4 epochs at once (constant learning rate)."""
    forcing, obs, train, val = _hybrid_setup(leaf, days=90)
    train, val = np.arange(90) >= 20, None
    kw = dict(train_mask=train, val_mask=val, lr=1e-2, lr_schedule=None, progress=False, seed=1)
    a = _small_hybrid()
    ra = train_hybrid(a, forcing, obs, epochs=4, **kw)
    b = _small_hybrid()
    train_hybrid(b, forcing, obs, epochs=2, checkpoint_dir=tmp_path, **kw)
    b = _small_hybrid()
    rb = train_hybrid(b, forcing, obs, epochs=4, checkpoint_dir=tmp_path, resume=True, **kw)
    assert _strip(ra.history) == _strip(rb.history)
    for k, v in _weights(a).items():
        assert torch.equal(v, _weights(b)[k])
    assert ra.history[0]["val_loss"] == ra.history[0]["train_loss"]  # no val_mask: train loss


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    replaced = []
    real_replace = os.replace

    def spy_replace(src, dst):
        # at the moment of the rename the temporary file is complete and loadable
        replaced.append((src, dst, torch.load(src, weights_only=True)))
        real_replace(src, dst)

    monkeypatch.setattr(training.os, "replace", spy_replace)
    training._atomic_save({"epoch": 1, "w": torch.ones(3)}, str(target))
    (src, dst, content), = replaced
    assert os.path.dirname(src) == str(tmp_path) and dst == str(target)
    assert os.path.basename(src).startswith(".last.pt.") and src.endswith(".tmp")
    assert content["epoch"] == 1

    # a crash in the middle of writing leaves the previous file intact and no temp file
    real_save = torch.save

    def crash(obj, fh, *a, **k):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(training.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        training._atomic_save({"epoch": 2}, str(target))
    monkeypatch.setattr(training.torch, "save", real_save)
    assert torch.load(target, weights_only=True)["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


# -------------------------------------------------------------- bad input
def test_bad_inputs_raise_before_any_solve(leaf, monkeypatch):
    forcing = leaf.to_forcing(["P", "PET"]).select(steps=slice(0, 400))
    obs = leaf.observed("Q")[:, :400]
    model = exphydro(snow=False)

    def no_solve(*a, **k):
        raise AssertionError("solve called before input checks")

    monkeypatch.setattr(training, "solve", no_solve)
    with pytest.raises(ValueError, match=r"observed has shape \(1, 399\).*\[basin=1, time=400\]"):
        calibrate(model, forcing, obs[:, :-1])
    with pytest.raises(ValueError, match="unknown loss 'rmse'"):
        calibrate(model, forcing, obs, loss="rmse")
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        calibrate(model, forcing, obs, optimizer="sgd")
    gap = obs.copy()
    gap[:, 100:200] = np.nan
    mask = np.zeros(400, bool)
    mask[120:150] = True
    with pytest.raises(ValueError, match=r"no valid observation in the scored period 1957-05-01\.\.1957-05-30"):
        calibrate(model, forcing, gap, score_mask=mask)
    with pytest.raises(ValueError, match="score_mask must have shape"):
        calibrate(model, forcing, obs, score_mask=np.ones(10, bool))
    with pytest.raises(ValueError, match="one basin at a time"):
        calibrate_de(model, forcing.select(basins=[0, 0]), np.vstack([obs, obs]))
    with pytest.raises(ValueError, match="unknown loss"):
        calibrate_de(model, forcing, obs, loss="nope")
    hybrid = _small_hybrid()
    with pytest.raises(ValueError, match="unknown lr_schedule"):
        train_hybrid(hybrid, forcing, obs, train_mask=np.ones(400, bool), lr_schedule="linear", progress=False)
    with pytest.raises(ValueError, match=r"val_mask.*1957-05-01\.\.1957-05-30|1957-05-01\.\.1957-05-30"):
        train_hybrid(hybrid, forcing, gap, train_mask=np.ones(400, bool), val_mask=mask, progress=False)
    with pytest.raises(ValueError, match="no neural fluxes"):
        train_hybrid(model, forcing, obs, train_mask=np.ones(400, bool), progress=False)


# ----------------------------------------------------------------- masks
def test_masks_from_dates(leaf):
    d = leaf.dates
    cal = masks_from_dates(d, warmup_end="1957", start="1958", end="1977")
    test = masks_from_dates(d, warmup_end="1957", start="1978", end="1987")
    assert d[cal][0] == np.datetime64("1958-01-01") and d[cal][-1] == np.datetime64("1977-12-31")
    assert d[test][0] == np.datetime64("1978-01-01") and d[test][-1] == np.datetime64("1987-12-31")
    assert not (cal & test).any() and not cal[:365].any()
    assert masks_from_dates(d, warmup_end="1957-12-31").sum() == len(d) - 365
    assert masks_from_dates(d, start="1960-03", end="1960-03").sum() == 31
    with pytest.raises(ValueError, match="the data cover 1957-01-01..1987-12-31"):
        masks_from_dates(d, start="1990", end="1991")
    with pytest.raises(ValueError, match="end is before the start"):
        masks_from_dates(d, start="1970", end="1960")


def test_long_runs_choose_the_compiled_stepper():
    """The name "checkpoint" becomes a compiled checkpointed adjoint for a long run on a
    CPU (1-64 basins a solve, at least ``_AUTO_COMPILE_BASIN_DAYS`` basin-days in all); an
    instance, a short run, many basins, another sensitivity or a GPU keep theirs."""
    cpu = torch.device("cpu")
    n = training._AUTO_COMPILE_BASIN_DAYS
    long = training._long_run_sensitivity("checkpoint", 16, 3650, -(-n // (16 * 3650)), cpu)
    assert isinstance(long, CheckpointedAdjoint) and long.compile and long._automatic
    assert long.parallel_forward is None and long.warm_start
    assert training._long_run_sensitivity("Checkpointed", 8, n, 1, cpu).compile
    assert training._long_run_sensitivity("checkpoint", 16, 3650, n // (16 * 3650) - 1, cpu) == "checkpoint"
    assert training._long_run_sensitivity("checkpoint", 1, n, 1, cpu).compile
    assert training._long_run_sensitivity("checkpoint", 1, n - 1, 1, cpu) == "checkpoint"
    assert training._long_run_sensitivity("checkpoint", 64, n, 10, cpu).compile
    assert training._long_run_sensitivity("checkpoint", 65, n, 10, cpu) == "checkpoint"
    assert training._long_run_sensitivity("checkpoint", 64, n, 10, torch.device("cuda")) == "checkpoint"
    assert training._long_run_sensitivity("adjoint", 64, n, 10, cpu) == "adjoint"
    mine = CheckpointedAdjoint()
    assert training._long_run_sensitivity(mine, 64, n, 10, cpu) is mine


@pytest.mark.slow
def test_long_training_and_calibration_runs_compile(leaf, monkeypatch):
    """A long run given "checkpoint" solves with the compiled stepper (here made long by
    lowering the threshold): every solve compiled, no warning, and the same losses as
    the eager period-by-period solve to rounding; calibration likewise."""
    import warnings

    forcing, obs, train, val = _hybrid_setup(leaf)
    B, T = 5, forcing.n_steps
    forcing = forcing.select(basins=[0] * B)
    obs = np.repeat(np.asarray(obs), B, axis=0) * np.linspace(0.8, 1.2, B)[:, None]
    epochs = 3
    monkeypatch.setattr(training, "_AUTO_COMPILE_BASIN_DAYS", B * T * epochs)
    used = []
    real_solve = training.solve

    def spy(*args, **kw):
        used.append(kw["sensitivity"])
        return real_solve(*args, **kw)

    monkeypatch.setattr(training, "solve", spy)
    import adjointhydro._rk as rk

    stretches = []  # whether each compiled stretch asked for ran compiled
    real_stretch = rk.integrate_stretch_compiled

    def stretch(*args, **kw):
        out = real_stretch(*args, **kw)
        stretches.append(out is not None)
        return out

    monkeypatch.setattr(rk, "integrate_stretch_compiled", stretch)
    kw = dict(train_mask=train, val_mask=val, epochs=epochs, lr=2e-2, patience=None, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (a failed compilation warns)
        auto = train_hybrid(_small_hybrid(), forcing, obs, sensitivity="checkpoint", **kw)
    assert len(used) >= epochs and all(isinstance(s, CheckpointedAdjoint) and s.compile for s in used)
    assert stretches and all(stretches)
    used.clear()
    stretches.clear()
    eager = train_hybrid(_small_hybrid(), forcing, obs, sensitivity=CheckpointedAdjoint(parallel_forward=False),
                         **kw)
    assert not any(s.compile for s in used) and not stretches
    for a, e in zip(auto.history, eager.history):
        assert a["train_loss"] == pytest.approx(e["train_loss"], rel=1e-9, abs=1e-12)
    # one epoch short of the threshold: the default solver
    used.clear()
    train_hybrid(_small_hybrid(), forcing, obs, sensitivity="checkpoint", **dict(kw, epochs=epochs - 1))
    assert not any(getattr(s, "compile", False) for s in used)

    # calibration: rows = starts x basins, one solve or more an iteration
    physics = exphydro(snow=False)
    monkeypatch.setattr(training, "_AUTO_COMPILE_BASIN_DAYS", 2 * B * T * 4)
    used.clear()
    ckw = dict(iterations=4, n_starts=2, seed=3, progress=False)
    auto = calibrate(physics, forcing, obs, sensitivity="checkpoint", **ckw)
    assert used and all(s.compile for s in used) and stretches and all(stretches)
    eager = calibrate(physics, forcing, obs, sensitivity=CheckpointedAdjoint(parallel_forward=False), **ckw)
    np.testing.assert_allclose(auto.loss, eager.loss, rtol=1e-9)
    torch.testing.assert_close(auto.parameters, eager.parameters, rtol=1e-8, atol=1e-10)
