"""Tests of the adjointhydro command line (adjointhydro.cli) and the run folders it writes.

The training runs here are tiny (a few months of Leaf River, a few iterations and
epochs) so that they finish in seconds; they check the plumbing, not the science.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from adjointhydro.cli import main
from adjointhydro.runs import load_run, read_results

TINY = """
[run]
name = "tiny"
seed = 7

[periods]
warmup_start = "1960-01-01"
train_start = "1960-04-01"
train_end = "1960-09-30"
validation_start = "1960-10-01"
validation_end = "1960-12-31"
test_start = "1961-01-01"
test_end = "1961-04-30"

[model]
name = "exphydro_m50"
snow = false
hidden = [8, 8]

[calibration]
iterations = 4
n_starts = 2
lr = 0.1

[training]
epochs = 4
lr = 0.01
pretrain_epochs = 40
patience = 10
"""

SIMULATE = """
[run]
name = "sim"

[periods]
warmup_start = "1970-01-01"
train_start = "1970-03-01"
train_end = "1970-12-31"
test_start = "1971-01-01"
test_end = "1971-06-30"

[model]
name = "exphydro"
snow = false
parameters = { f = 0.02, Smax = 900.0, Qmax = 20.0 }
"""


def write(folder: Path, text: str, name: str = "config.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(text, encoding="utf-8")
    return p


def only_run(output_dir: Path) -> Path:
    runs = sorted(p for p in output_dir.iterdir() if p.is_dir())
    assert len(runs) == 1, runs
    return runs[0]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert lines[0].startswith("adjointhydro: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------ simulate
def test_simulate_writes_results(tmp_path, capsys):
    cfg = write(tmp_path / "case", SIMULATE)
    assert main(["simulate", str(cfg), "-q"]) == 0
    out = capsys.readouterr().out
    assert "M0 NSE" in out and "test" in out
    run = only_run(tmp_path / "case" / "runs")  # output_dir defaults to runs/ next to the config
    assert run.name.startswith("sim_")
    for f in ("config.toml", "run.json", "metrics.json", "results.h5"):
        assert (run / f).is_file(), f
    assert (run / "config.toml").read_text() == SIMULATE
    assert list((run / "plots").glob("hydrograph_test_*.png"))

    with h5py.File(run / "results.h5", "r") as f:
        assert f.attrs["format"] == "adjointhydro-results" and int(f.attrs["version"]) == 1
        dates = np.datetime64("1970-01-01") + f["dates"][()]
        assert str(dates[0]) == "1970-01-01" and str(dates[-1]) == "1971-06-30"
        T = len(dates)
        assert f["dates"].attrs["units"] == "days since 1970-01-01"
        assert [b.decode() if isinstance(b, bytes) else b for b in f["basins"][()]] == ["leaf_river"]
        assert f["observed"].shape == (1, T) and f["observed"].attrs["units"] == "mm/day"
        assert set(f["periods"]) == {"train", "test"}
        assert f["periods/test"][()].sum() == 181
        g = f["models/m0"]
        assert g.attrs["name"] == "EXP-HYDRO (no snow)"
        assert set(g["stores"]) == {"soil"} and set(g["fluxes"]) == {"rainfall", "et", "Q"}
        assert g["stores/soil"].attrs["units"] == "mm"
        for k in ("rainfall", "et", "Q"):
            assert g[f"fluxes/{k}"].shape == (1, T)
            assert g[f"fluxes/{k}"].attrs["units"] == "mm/day"
        assert g["discharge"].attrs["units"] == "mm/day"
        np.testing.assert_allclose(g["discharge"][()], g["fluxes/Q"][()])
        # mass balance per day: change of soil = rainfall - et - Q
        soil = np.concatenate([g["stores/soil"].attrs["initial"][:, None], g["stores/soil"][()]], axis=1)
        net = g["fluxes/rainfall"][()] - g["fluxes/et"][()] - g["fluxes/Q"][()]
        np.testing.assert_allclose(np.diff(soil, axis=1), net, atol=1e-8)
        assert [x.decode() if isinstance(x, bytes) else x for x in g["parameters"].attrs["names"]] == ["f", "Smax", "Qmax"]
        np.testing.assert_allclose(g["parameters"][()], [[0.02, 900.0, 20.0]])
    res = read_results(run / "results.h5")
    assert res["models"]["m0"]["units"]["Q"] == "mm/day"
    # rainfall is the forcing P
    P = load_run_config_data(run)
    np.testing.assert_allclose(res["models"]["m0"]["fluxes"]["rainfall"][0], P, rtol=1e-6, atol=1e-6)

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["m0"]["model"] == "EXP-HYDRO (no snow)"
    assert set(metrics["m0"]["basins"]["leaf_river"]) == {"train", "test"}
    assert -10 < metrics["m0"]["basins"]["leaf_river"]["test"]["nse"] <= 1


def load_run_config_data(run: Path) -> np.ndarray:
    from adjointhydro.data import load_leaf_river

    return load_leaf_river().period("1970-01-01", "1971-06-30").forcing_variable("P")[0]


def test_simulate_with_param_and_output_file(tmp_path, capsys):
    cfg = write(tmp_path, SIMULATE)
    out = tmp_path / "out.h5"
    assert main(["simulate", str(cfg), "-q", "--param", "Smax=500", "-p", "Qmax=5", "--output", str(out)]) == 0
    res = read_results(out)
    np.testing.assert_allclose(res["models"]["m0"]["parameters"], [[0.02, 500.0, 5.0]])
    assert not (tmp_path / "runs").exists()
    assert main(["simulate", str(cfg), "-q", "--param", "Smax=5"]) == 2
    line = one_error_line(capsys)
    assert "Smax" in line and "outside its bounds" in line
    assert main(["simulate", str(cfg), "-q", "--param", "Smaxx=500"]) == 2
    assert "'Smaxx'" in one_error_line(capsys)


# --------------------------------------------------------------- errors
def test_bad_config_gives_one_line_and_exit_2(tmp_path, capsys):
    cfg = write(tmp_path, TINY.replace("epochs = 4", "epoch = 4"))
    assert main(["train", str(cfg)]) == 2
    line = one_error_line(capsys)
    assert "training.epoch" in line and "did you mean 'epochs'" in line
    assert not (tmp_path / "runs").exists()  # nothing was started


@pytest.mark.parametrize(
    "old,new,key",
    [
        ('test_end = "1961-04-30"', 'test_end = "1999-04-30"', "periods.test_end"),
        ('snow = false', 'snow = false\nneural_fluxes = ["ett"]', "model.neural_fluxes"),
        ('name = "exphydro_m50"', 'name = "exphydro_m500"', "model.name"),
        ("hidden = [8, 8]", "hidden = 8", "model.hidden"),
    ],
)
def test_bad_values_via_main(tmp_path, capsys, old, new, key):
    cfg = write(tmp_path, TINY.replace(old, new))
    assert main(["train", str(cfg)]) == 2
    assert key in one_error_line(capsys)


def test_missing_files_via_main(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml" in one_error_line(capsys)
    assert main(["evaluate", str(tmp_path / "no_run")]) == 2
    assert "no_run" in one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    assert "run.json" in one_error_line(capsys)


def test_bad_data_via_main(tmp_path, capsys):
    dates = np.datetime64("2000-01-01") + np.arange(30)
    rows = [f"{d},{'' if i == 12 else 1.0},2.0,1.0" for i, d in enumerate(dates)]
    (tmp_path / "b.csv").write_text("Date,P,PET,Q\n" + "\n".join(rows) + "\n")
    cfg = write(tmp_path, '[data]\nsource = "csv"\npath = "b.csv"\n[model]\nsnow = false\n')
    assert main(["simulate", str(cfg)]) == 2
    line = one_error_line(capsys)
    assert "b.csv" in line and "'P'" in line and "2000-01-13" in line


def _csv_rows(cells: dict[int, str] | None = None, header: str = "Date,P,PET,Q", n: int = 60) -> str:
    dates = np.datetime64("2000-01-01") + np.arange(n)
    rows = [f"{d},{(cells or {}).get(i, '1.0')},2.0,1.0" for i, d in enumerate(dates)]
    return header + "\n" + "\n".join(rows) + "\n"


_CSV_CFG = '[data]\nsource = "csv"\npath = "b.csv"\n[periods]\ntrain_start = "2000-01-05"\ntrain_end = "2000-02-20"\n[model]\nsnow = false\n'


@pytest.mark.parametrize(
    "content,expected",
    [
        (_csv_rows({12: "nan"}), ["b.csv", "'P'", "2000-01-13"]),                   # NaN in forcing
        (_csv_rows({30: ""}), ["b.csv", "'P'", "2000-01-31"]),                      # empty cell
        (_csv_rows({3: "abc"}), ["b.csv", "line 5", "abc"]),                       # not a number
        (_csv_rows({20: "-3.0"}), ["b.csv", "'P'", "negative"]),                   # negative precipitation
        (_csv_rows(header="Date,Prcp,PET,Q"), ["b.csv", "'P'"]),                   # missing column
        (_csv_rows(header="Day,P,PET,Q"), ["b.csv", "Date"]),                      # missing date column
        ("", ["b.csv", "empty"]),                                                  # empty file
        ("Date,P,PET,Q\n2000-01-01,1.0,2.0\n", ["b.csv", "line 2"]),              # short row
        ("Date,P,PET,Q\n2000-13-01,1.0,2.0,1.0\n", ["b.csv"]),                    # impossible date
    ],
    ids=["nan", "empty_cell", "not_a_number", "negative_P", "missing_column", "missing_date_column",
         "empty_file", "short_row", "bad_date"],
)
def test_bad_data_files_give_one_line(tmp_path, capsys, content, expected):
    (tmp_path / "b.csv").write_text(content)
    cfg = write(tmp_path, _CSV_CFG)
    for command in ("simulate", "train"):
        assert main([command, str(cfg), "-q"]) == 2
        line = one_error_line(capsys)
        for e in expected:
            assert e in line, (command, e, line)
    assert not (tmp_path / "runs").exists()


def test_bad_hdf5_file_gives_one_line(tmp_path, capsys):
    (tmp_path / "d.h5").write_bytes(b"not an hdf5 file at all")
    cfg = write(tmp_path, '[data]\nsource = "hdf5"\npath = "d.h5"\n[model]\nsnow = false\n')
    assert main(["simulate", str(cfg), "-q"]) == 2
    assert "d.h5" in one_error_line(capsys)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("forcing", data=np.ones((1, 5, 2)))
    assert main(["simulate", str(cfg), "-q"]) == 2
    assert "d.h5" in one_error_line(capsys)


@pytest.mark.parametrize(
    "old,new,key",
    [
        ("lr = 0.01", 'lr = "fast"', "training.lr"),                                # wrong type
        ("[training]", "[trainig]", "trainig"),                                     # unknown section
        ('warmup_start = "1960-01-01"', 'warmup_start = "1940-01-01"', "periods.warmup_start"),  # before the data
        ('snow = false', 'snow = false\nneural_fluxes = ["Q", "et"]\ninputs = { ett = ["soil"] }', "model.inputs"),
    ],
)
def test_more_bad_configs_via_main(tmp_path, capsys, old, new, key):
    cfg = write(tmp_path, TINY.replace(old, new))
    assert main(["train", str(cfg), "-q"]) == 2
    assert key in one_error_line(capsys)
    assert not (tmp_path / "runs").exists()


def test_debug_shows_traceback(tmp_path, capsys):
    cfg = write(tmp_path, TINY.replace("epochs = 4", "epoch = 4"))
    assert main(["train", str(cfg), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("adjointhydro: error:")


def test_usage_error_exit_code(capsys):
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out


# ----------------------------------------------------------- tiny training
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One uninterrupted tiny hybrid training run: (config path, run folder, metrics)."""
    import torch

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("tiny")
    cfg = write(folder, TINY)
    t0 = time.perf_counter()
    assert main(["train", str(cfg), "-q"]) == 0
    seconds = time.perf_counter() - t0
    run = only_run(folder / "runs")
    return cfg, run, json.loads((run / "metrics.json").read_text()), seconds


def test_train_writes_the_full_run_folder(tiny_run, capsys):
    cfg, run, metrics, seconds = tiny_run
    assert seconds < 120, f"tiny run took {seconds:.0f} s"
    assert (run / "config.toml").read_text() == TINY
    info = json.loads((run / "run.json").read_text())
    assert info["stage"] == "done" and info["command"] == "train"
    for f in ("m0.pt", "pretrained.pt", "model.pt", "metrics.json", "results.h5",
              "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / f).is_file(), f
    pngs = {p.name for p in (run / "plots").glob("*.png")}
    assert {"hydrograph_test_leaf_river.png", "training_curves.png", "fluxes_leaf_river.png"} <= pngs
    # metrics.json: model -> basins -> period -> metric
    for key, name in (("m0", "EXP-HYDRO (no snow)"), ("hybrid", "EXP-HYDRO M50 (no snow)")):
        assert metrics[key]["model"] == name
        periods = metrics[key]["basins"]["leaf_river"]
        assert set(periods) == {"train", "validation", "test"}
        for p in periods.values():
            assert {"nse", "kge", "rmse", "pbias", "log_nse"} <= set(p)
            assert np.isfinite(p["nse"]) and p["nse"] <= 1
    assert metrics["periods"]["test"] == ["1961-01-01", "1961-04-30"]
    assert metrics["simulation"] == ["1960-01-01", "1961-04-30"]
    # results.h5: both models, every store and flux
    res = read_results(run / "results.h5")
    assert set(res["models"]) == {"m0", "hybrid"}
    assert set(res["models"]["hybrid"]["fluxes"]) == {"rainfall", "et", "Q"}
    T = len(res["dates"])
    assert T == (np.datetime64("1961-04-30") - np.datetime64("1960-01-01")).astype(int) + 1
    assert res["models"]["hybrid"]["discharge"].shape == (1, T)
    with h5py.File(run / "results.h5") as f:
        assert bool(f["models/hybrid/fluxes/Q"].attrs["network"])
        assert not bool(f["models/hybrid/fluxes/rainfall"].attrs["network"])
        assert not bool(f["models/m0/fluxes/Q"].attrs["network"])


def test_evaluate_reproduces_metrics(tiny_run, capsys, tmp_path):
    cfg, run, metrics, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "metrics.json").unlink()
    (copy / "results.h5").unlink()
    assert main(["evaluate", str(copy), "-q"]) == 0
    out = capsys.readouterr().out
    assert "hybrid NSE" in out and "M0 KGE" in out
    again = json.loads((copy / "metrics.json").read_text())
    for key in ("m0", "hybrid"):
        for period, vals in metrics[key]["basins"]["leaf_river"].items():
            for name, v in vals.items():
                w = again[key]["basins"]["leaf_river"][period][name]
                assert (v is None and w is None) or w == pytest.approx(v, rel=1e-9, abs=1e-12), (key, period, name)
    assert (copy / "results.h5").is_file()


def test_load_run_rebuilds_the_trained_model(tiny_run):
    import torch

    cfg, run, metrics, _ = tiny_run
    lr = load_run(run)
    config, model, dataset = lr[:3]
    assert model is lr.hybrid and model.name == "EXP-HYDRO M50 (no snow)"
    assert dataset.basins == ["leaf_river"]
    saved = torch.load(run / "model.pt", weights_only=True)
    for k, v in saved["state_dict"].items():
        assert torch.equal(model.state_dict()[k], v), k
    m0 = torch.load(run / "m0.pt", weights_only=True)
    torch.testing.assert_close(lr.physics.physical_parameters().detach(), m0["parameters"])


def test_inspect_through_the_cli(tiny_run, tmp_path, capsys):
    """``adjointhydro inspect RUN`` on the tiny trained hybrid: report files, one expression per network flux,
    re-simulation metrics of the hybrid and the symbolic model, and a verdict on the test period."""
    _, run, metrics, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    t0 = time.perf_counter()
    assert main(["inspect", str(copy), "-q"]) == 0
    seconds = time.perf_counter() - t0
    out = capsys.readouterr().out
    for name in ("et", "Q"):
        assert any(line.startswith(f"{name} = ") for line in out.splitlines()), out
    assert "symbolic NSE" in out and "report:" in out
    d = copy / "inspect"
    for f in ("report.md", "report.json", "flux_et.png", "flux_Q.png", "pareto_Q.png"):
        assert (d / f).is_file(), f
    rep = json.loads((d / "report.json").read_text())
    assert set(rep["fluxes"]) == {"et", "Q"}
    for fl in rep["fluxes"].values():
        assert fl["chosen"]["expression"] and fl["candidates"] and fl["seconds"] < 60
    rows = rep["resimulation"]["metrics"]
    test_rows = {r["model"]: r for r in rows if r["period"] == "test"}
    assert {"hybrid", "symbolic"} <= set(test_rows)
    # the hybrid re-simulated inside inspect is the trained hybrid: same test NSE as evaluate's
    assert test_rows["hybrid"]["nse"] == pytest.approx(metrics["hybrid"]["basins"]["leaf_river"]["test"]["nse"],
                                                       abs=1e-6)
    md = (d / "report.md").read_text()
    assert "## Verdict" in md and "test period" in md
    assert seconds < 300, f"inspect took {seconds:.0f} s"


def test_single_precision_run_agrees_with_double(tiny_run, tmp_path, capsys):
    """solver.dtype = "float32": the networks train in float32 (the physics model stays
    float64: M0 is the float64 run's), the hybrid's metrics agree with the float64 run to
    rounding, and the saved run evaluates to the same metrics again."""
    import torch

    _, run64, metrics64, _ = tiny_run
    cfg = write(tmp_path, TINY + '\n[solver]\ndtype = "float32"\n')
    assert main(["train", str(cfg), "-q"]) == 0
    run = only_run(tmp_path / "runs")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["m0"] == metrics64["m0"]
    for period, vals in metrics64["hybrid"]["basins"]["leaf_river"].items():
        got = metrics["hybrid"]["basins"]["leaf_river"][period]
        # float32 rounding through pretraining, training and evaluation: ~1e-5 here
        assert got["nse"] == pytest.approx(vals["nse"], abs=1e-3), period
        assert got["kge"] == pytest.approx(vals["kge"], abs=1e-3), period
        assert got["nse"] != vals["nse"]  # it did run in float32
    state = torch.load(run / "model.pt", weights_only=True)["state_dict"]
    nets = {k: v for k, v in state.items() if ".net." in k}
    assert nets and all(v.dtype == torch.float32 for v in nets.values())
    assert state["raw"].dtype == torch.float64  # parameters and bounds stay float64
    (run / "metrics.json").unlink()
    assert main(["evaluate", str(run), "-q", "--device", "cpu"]) == 0
    assert_same_metrics(metrics, json.loads((run / "metrics.json").read_text()))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error where no GPU is visible")
def test_cuda_device_without_gpu_is_one_clear_line(tiny_run, tmp_path, capsys):
    _, run, _, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for command in ("evaluate", "inspect", "resume"):
        assert main([command, str(copy), "-q", "--device", "cuda"]) == 2, command
        assert "no CUDA GPU" in one_error_line(capsys), command
    cfg = write(tmp_path, TINY + '\n[solver]\ndevice = "cuda"\n')
    assert main(["train", str(cfg), "-q"]) == 2
    line = one_error_line(capsys)
    assert "solver.device" in line and "no CUDA GPU" in line and "--device cpu" in line
    assert not (tmp_path / "runs").exists()
    assert main(["simulate", str(write(tmp_path, SIMULATE, "sim.toml")), "-q", "--device", "cuda:0"]) == 2
    assert "no CUDA GPU" in one_error_line(capsys)
    assert main(["simulate", str(tmp_path / "sim.toml"), "-q", "--device", "gpu"]) == 2
    assert "--device" in one_error_line(capsys)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_train_on_gpu_agrees_with_cpu(tiny_run, tmp_path, capsys):
    _, _, metrics64, _ = tiny_run
    cfg = write(tmp_path, TINY)
    assert main(["train", str(cfg), "-q", "--device", "cuda"]) == 0
    run = only_run(tmp_path / "runs")
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("m0", "hybrid"):
        for period, vals in metrics64[key]["basins"]["leaf_river"].items():
            got = metrics[key]["basins"]["leaf_river"][period]
            assert got["nse"] == pytest.approx(vals["nse"], abs=1e-6), (key, period)
    # the saved run is portable: evaluated on the CPU, the same metrics
    (run / "metrics.json").unlink()
    assert main(["evaluate", str(run), "-q", "--device", "cpu"]) == 0
    again = json.loads((run / "metrics.json").read_text())
    for key in ("m0", "hybrid"):
        for period, vals in metrics[key]["basins"]["leaf_river"].items():
            assert again[key]["basins"]["leaf_river"][period]["nse"] == pytest.approx(vals["nse"], abs=1e-8)


def test_physics_only_train(tmp_path, capsys):
    text = TINY.replace('name = "exphydro_m50"', 'name = "exphydro"').replace("hidden = [8, 8]\n", "")
    cfg = write(tmp_path, text.replace("iterations = 4", "iterations = 2"))
    assert main(["train", str(cfg), "-q"]) == 0
    out = capsys.readouterr().out
    assert "M0 NSE" in out and "hybrid" not in out
    run = only_run(tmp_path / "runs")
    metrics = json.loads((run / "metrics.json").read_text())
    assert "m0" in metrics and "hybrid" not in metrics
    assert not (run / "model.pt").exists()
    assert (run / "plots" / "training_curves.png").is_file()
    assert main(["evaluate", str(run), "-q"]) == 0
    assert main(["inspect", str(run)]) == 2
    assert "no networks" in one_error_line(capsys)


def assert_same_metrics(a: dict, b: dict) -> None:
    for key in ("m0", "hybrid"):
        for period, vals in a[key]["basins"]["leaf_river"].items():
            for name, v in vals.items():
                w = b[key]["basins"]["leaf_river"][period][name]
                assert (v is None and w is None) or w == pytest.approx(v, rel=1e-9, abs=1e-12), (key, period, name)


def test_resume_after_interruption_matches_uninterrupted(tiny_run, tmp_path, capsys):
    """Stop after 2 of 4 epochs (as Ctrl-C would, after a checkpoint), resume, compare."""
    cfg, _, metrics, _ = tiny_run
    folder = tmp_path / "case"
    cfg2 = write(folder, TINY)
    assert main(["train", str(cfg2), "-q", "--stop-after-epochs", "2"]) == 130
    err = capsys.readouterr().err
    assert "interrupted during training" in err and "adjointhydro resume" in err and "Traceback" not in err
    run = only_run(folder / "runs")
    info = json.loads((run / "run.json").read_text())
    assert info["stage"].startswith("interrupted")
    assert (run / "checkpoints" / "last.pt").is_file() and not (run / "model.pt").exists()
    assert not (run / "metrics.json").exists()
    with pytest.raises(Exception):
        load_run(run)
    assert main(["evaluate", str(run)]) == 2
    assert "resume" in one_error_line(capsys)
    # a second interruption, then the rest
    assert main(["resume", str(run), "-q", "--stop-after-epochs", "1"]) == 130
    capsys.readouterr()
    assert main(["resume", str(run), "-q"]) == 0
    resumed = json.loads((run / "metrics.json").read_text())
    assert_same_metrics(metrics, resumed)
    import torch

    h = torch.load(run / "model.pt", weights_only=True)["history"]
    assert [r["epoch"] for r in h] == [0, 1, 2, 3]


def _assert_run_files_readable(run: Path) -> None:
    """Every checkpoint, model and JSON file of a run folder loads (atomic writes: never a partial file)."""
    import torch

    for p in sorted(run.rglob("*.pt")):
        if p.name.startswith("."):
            continue  # a temporary file of an interrupted write (never read)
        state = torch.load(p, map_location="cpu", weights_only=True)
        assert isinstance(state, dict) and state, p
    for p in sorted(run.rglob("*.json")):
        json.loads(p.read_text())


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "adjointhydro.cli", *args]


def _wait_for(predicate, proc, timeout: float = 300.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.mark.slow
def test_resume_after_killed_process_matches_uninterrupted(tmp_path):
    """``python -m adjointhydro.cli train`` killed (SIGKILL) mid-training, twice; resume; same metrics.

    The first kill comes a moment after the first checkpoint appears (inside the next
    epoch, possibly inside a checkpoint write), the second one inside a resumed run.
    After each kill every file of the run folder must still load (atomic writes).
    """
    import torch

    # 30 epochs, not the tiny run's 4: an epoch of this run takes a few tens of ms, and
    # 4 were over before the kill
    long = TINY.replace("\nepochs = 4\n", "\nepochs = 30\n").replace("patience = 10", "patience = 100")
    assert long != TINY
    torch.set_num_threads(1)
    assert main(["train", str(write(tmp_path / "ref", long)), "-q"]) == 0
    ref = only_run(tmp_path / "ref" / "runs")
    metrics = json.loads((ref / "metrics.json").read_text())
    epochs = [r["epoch"] for r in torch.load(ref / "model.pt", weights_only=True)["history"]]
    assert epochs == list(range(30))
    folder = tmp_path / "case"
    cfg = write(folder, long)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")

    def last_epoch(run: Path) -> int:
        p = run / "checkpoints" / "last.pt"
        return int(torch.load(p, weights_only=True)["epoch"]) if p.is_file() else 0

    def kill(proc) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL

    # 1. train, killed a moment after its first checkpoint
    proc = subprocess.Popen(_cli("train", str(cfg), "-q", "--threads", "1"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        found = _wait_for(lambda: bool(list(folder.glob("runs/tiny_*/checkpoints/last.pt"))), proc)
        assert found and proc.poll() is None, f"no checkpoint before exit {proc.poll()}: {proc.stderr.read().decode()[-2000:]}"
        time.sleep(0.15)  # into the next epoch
        kill(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run = only_run(folder / "runs")
    assert not (run / "model.pt").exists(), "the process finished training before it was killed"
    _assert_run_files_readable(run)
    e1 = last_epoch(run)
    assert 1 <= e1 < 30

    # 2. resume, killed again once it has written a further checkpoint (if it gets there)
    proc = subprocess.Popen(_cli("resume", str(run), "-q", "--threads", "1"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def advanced() -> bool:
            try:
                return last_epoch(run) > e1
            except Exception:  # noqa: BLE001 - a partial file would fail the assertion below
                return False

        if _wait_for(advanced, proc) and proc.poll() is None and not (run / "model.pt").exists():
            time.sleep(0.05)
            kill(proc)
        else:
            proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _assert_run_files_readable(run)

    # 3. resume to the end (through the CLI's entry point, as a user would)
    done = subprocess.run(_cli("resume", str(run), "-q", "--threads", "1"), env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    _assert_run_files_readable(run)
    assert_same_metrics(metrics, json.loads((run / "metrics.json").read_text()))
    h = torch.load(run / "model.pt", weights_only=True)["history"]
    assert [r["epoch"] for r in h] == epochs
    assert json.loads((run / "run.json").read_text())["stage"] == "done"
    assert not list(run.rglob(".*.tmp")), "resume leaves no temporary files of killed writes behind"
