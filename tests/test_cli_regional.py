"""Regional (multi-basin, dPL) runs through the command line: config, train, evaluate, resume."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from adjointhydro.cli import main
from adjointhydro.config import ConfigError, parse_config
from adjointhydro.data import write_hdf5
from adjointhydro.synthetic import make_synthetic_basins

from conftest import SHARED_DATA, write_csv_folder

# where the case config's relative path points: ../shared/data beside the checkout
CAMELS = SHARED_DATA / "camels_us"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def h5(tmp_path_factory):
    syn = make_synthetic_basins(4, years=1, seed=3, method="euler")
    path = tmp_path_factory.mktemp("regional") / "basins.h5"
    write_hdf5(syn.dataset, path)
    return path


def _config(h5: Path, regional: str = "", model: str = 'name = "exphydro"', extra: str = "") -> str:
    return f"""
[run]
name = "syn_dpl"
seed = 0

[data]
source = "hdf5"
path = "{h5}"

[periods]
warmup_start = "2000-01-01"
train_start = "2000-03-01"
train_end = "2000-09-30"
validation_start = "2000-10-01"
validation_end = "2000-11-15"
test_start = "2000-11-16"
test_end = "2000-12-30"

[model]
{model}

[solver]
method = "euler"
sensitivity = "checkpoint"

[regional]
attributes = ["aridity", "soil_depth", "forest_frac"]
hidden = [8]
epochs = 2
lr = 0.02
batch_basins = 2
window = 60
warmup = 30
{regional}
{extra}
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_regional_train_and_evaluate_through_the_cli(tmp_path, h5, capsys):
    cfg = _write(tmp_path, _config(h5))
    assert main(["train", str(cfg), "-q", "-o", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "median" in out and "q25" in out and "q75" in out
    (run,) = list((tmp_path / "runs").iterdir())
    for name in ("config.toml", "run.json", "config.json", "history.json", "model.pt", "metrics.json",
                 "summary.json", "parameters.csv", "checkpoints/last.pt", "checkpoints/best.pt",
                 "plots/nse_cdf.png", "plots/kge_cdf.png"):
        assert (run / name).is_file(), name
    assert json.loads((run / "run.json").read_text())["mode"] == "regional"
    assert json.loads((run / "run.json").read_text())["stage"] == "done"
    metrics = json.loads((run / "metrics.json").read_text())
    assert sorted(metrics) == ["syn0000", "syn0001", "syn0002", "syn0003"]
    for per in metrics.values():
        assert set(per) == {"train", "validation", "test"}
        for vals in per.values():
            assert {"nse", "kge", "rmse", "pbias"} <= set(vals)
    summary = json.loads((run / "summary.json").read_text())
    assert {"median", "q25", "q75"} <= set(summary["test"]["nse"])
    assert len(json.loads((run / "history.json").read_text())) == 2
    # evaluate re-simulates from model.pt and gives the same metrics
    (run / "metrics.json").unlink()
    assert main(["evaluate", str(run), "-q"]) == 0
    assert "median" in capsys.readouterr().out
    again = json.loads((run / "metrics.json").read_text())
    assert again["syn0000"]["test"]["nse"] == pytest.approx(metrics["syn0000"]["test"]["nse"])
    # inspect is for single-basin hybrids
    assert main(["inspect", str(run)]) == 2
    assert "regional run" in capsys.readouterr().err


def test_regional_hybrid_and_resume(tmp_path, h5, capsys):
    cfg = _write(tmp_path, _config(h5, regional="",
                                   model='name = "exphydro_m50"\nhidden = [4]'))
    assert main(["train", str(cfg), "-q", "-o", str(tmp_path / "runs"), "--stop-after-epochs", "1"]) == 130
    (run,) = list((tmp_path / "runs").iterdir())
    assert not (run / "metrics.json").exists()
    capsys.readouterr()
    assert main(["resume", str(run), "-q"]) == 0
    assert len(json.loads((run / "history.json").read_text())) == 2
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics) == 4 and "test" in metrics["syn0001"]


@pytest.mark.parametrize("regional, model, extra, key", [
    ("colour = 1", 'name = "exphydro"', "", "regional.colour: unknown key"),
    ("epoch = 3", 'name = "exphydro"', "", "did you mean 'epochs'"),
    ('patience = "2"', 'name = "exphydro"', "", "regional.patience: expected an integer"),
    ('grad_clip = "big"', 'name = "exphydro"', "", "regional.grad_clip: expected a number"),
    ('loss = "nash"', 'name = "exphydro"', "", "regional.loss: unknown value 'nash'"),
    ("val_every = 0", 'name = "exphydro"', "", "regional.val_every: must be > 0"),
    ('lr_schedule = "linear"', 'name = "exphydro"', "", "regional.lr_schedule: unknown value 'linear'"),
    ("", 'name = "exphydro_m100"', "", "model.name: a regional run trains"),
    ("", 'name = "exphydro"', "[training]\nepochs = 3", "[training]: not used in a regional run"),
])
def test_regional_config_errors_name_the_key(tmp_path, h5, regional, model, extra, key):
    with pytest.raises(ConfigError) as e:
        parse_config(_config(h5, regional, model, extra), path=tmp_path / "c.toml")
    assert key in str(e.value)
    assert "\n" not in str(e.value)


def test_regional_runs_are_on_the_cpu(tmp_path, h5):
    text = _config(h5).replace('method = "euler"', 'method = "euler"\ndevice = "cuda"')
    with pytest.raises(ConfigError) as e:
        parse_config(text, path=tmp_path / "c.toml")
    assert "solver.device: 'cuda': a regional run" in str(e.value)


@pytest.mark.parametrize("model", ['name = "exphydro"', 'name = "exphydro_m50"\nhidden = [4]'])
def test_regional_single_precision_agrees_with_double(tmp_path, h5, model, capsys):
    """solver.dtype = "float32" in a regional run: the solves (and a hybrid's networks) in
    float32, the parameter network float64; metrics as the float64 run's to rounding."""
    import torch

    runs = {}
    for name, line in (("f64", ""), ("f32", '\ndtype = "float32"')):
        text = _config(h5, model=model).replace('method = "euler"', 'method = "euler"' + line)
        (tmp_path / name).mkdir()
        cfg = _write(tmp_path / name, text)
        assert main(["train", str(cfg), "-q", "-o", str(tmp_path / name / "runs")]) == 0
        (runs[name],) = list((tmp_path / name / "runs").iterdir())
    m64, m32 = (json.loads((runs[k] / "metrics.json").read_text()) for k in ("f64", "f32"))
    for b, per in m64.items():
        for period, vals in per.items():
            assert m32[b][period]["nse"] == pytest.approx(vals["nse"], abs=1e-3), (b, period)
    assert m32 != m64  # it did run in single precision
    state = torch.load(runs["f32"] / "model.pt", weights_only=True)
    assert all(v.dtype == torch.float64 for v in state["network"].values() if v.is_floating_point())
    nets = [v for k, v in state["model"].items() if ".net." in k]
    assert all(v.dtype == torch.float32 for v in nets) and (len(nets) > 0) == ("m50" in model)
    (runs["f32"] / "metrics.json").unlink()
    assert main(["evaluate", str(runs["f32"]), "-q"]) == 0
    assert json.loads((runs["f32"] / "metrics.json").read_text()) == m32


def test_regional_device_option_is_refused(tmp_path, h5, capsys):
    cfg = _write(tmp_path, _config(h5))
    assert main(["train", str(cfg), "-q", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device cuda: a regional run" in err
    assert not (tmp_path / "runs").exists()


def test_unknown_attribute_names_the_key(tmp_path, h5, capsys):
    text = _config(h5).replace('"aridity", "soil_depth"', '"aridty", "soil_depth"')
    cfg = _write(tmp_path, text)
    assert main(["train", str(cfg), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "regional.attributes[0]" in err and "'aridty'" in err and "did you mean 'aridity'" in err
    assert not (tmp_path / "runs").exists()


def test_window_of_one_day(tmp_path, h5):
    with pytest.raises(ConfigError, match=r"regional.window: must be at least 2"):
        parse_config(_config(h5).replace("window = 60", "window = 1"), path=tmp_path / "c.toml")


def test_window_longer_than_the_record(tmp_path, h5, capsys):
    cfg = _write(tmp_path, _config(h5).replace("window = 60", "window = 400"))
    assert main(["train", str(cfg), "-q"]) == 2
    err = capsys.readouterr().err
    assert "regional.window: 400 days do not fit" in err
    assert not (tmp_path / "runs").exists()


def test_missing_attributes_key(tmp_path, h5):
    text = _config(h5).replace('attributes = ["aridity", "soil_depth", "forest_frac"]', "")
    with pytest.raises(ConfigError, match=r"regional.attributes: required"):
        parse_config(text, path=tmp_path / "c.toml")


def test_regional_needs_data_with_attributes(tmp_path, h5):
    text = _config(h5).replace(f'source = "hdf5"\npath = "{h5}"', 'source = "leaf_river"')
    with pytest.raises(ConfigError, match=r"data.source: a regional run needs"):
        parse_config(text, path=tmp_path / "c.toml")


@pytest.mark.skipif(not CAMELS.is_dir(), reason=f"CAMELS-US sample not found at {CAMELS}")
def test_camels_us_case_config_is_valid():
    cfg = parse_config((REPO / "cases/camels_us_dpl/config.toml").read_text(),
                       path=REPO / "cases/camels_us_dpl/config.toml")
    assert cfg.regional is not None and cfg.data.source == "camels_us"
    assert len(cfg.dataset().basins) == 2


@pytest.mark.skipif(not CAMELS.is_dir(), reason=f"CAMELS-US sample not found at {CAMELS}")
def test_camels_us_train_through_the_cli(tmp_path, capsys):
    src = (REPO / "cases/camels_us_dpl/config.toml").read_text()
    text = src.replace('path = "../../../shared/data/camels_us"', f'path = "{CAMELS}"')
    text = text.replace("epochs = 10", "epochs = 1")
    cfg = _write(tmp_path, text)
    assert main(["train", str(cfg), "-q", "-o", str(tmp_path / "runs")]) == 0
    (run,) = list((tmp_path / "runs").iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    assert sorted(metrics) == ["01022500", "01547700"]
    assert (run / "plots/nse_cdf.png").is_file()


# ------------------------------------------------------- CSV folder (Caravan layout)
GAP = ("syn0002", 400, 430)  # days without observed streamflow (empty cells)


@pytest.fixture(scope="module")
def caravan(tmp_path_factory):
    """5 synthetic basins x 2 years written as a Caravan-style CSV folder; (syn, timeseries, attributes)."""
    syn = make_synthetic_basins(5, years=2, seed=5, method="euler", missing_fraction=0.02)
    ts, att = write_csv_folder(tmp_path_factory.mktemp("caravan"), syn.dataset, gap=GAP)
    return syn, ts, att


def _csv_config(ts: Path, att: Path, regional: str = "", data: str = "") -> str:
    return f"""
[run]
name = "caravan_dpl"
seed = 0

[data]
source = "csv_folder"
path = "{ts}"
attribute_files = "{att}"
observed = "streamflow"
rename = {{ total_precipitation_sum = "P", temperature_2m_mean = "T", potential_evaporation_sum = "PET" }}
{data}

[periods]
warmup_start = "2000-01-01"
train_start = "2000-04-01"
train_end = "2000-12-31"
validation_start = "2001-01-01"
validation_end = "2001-06-30"
test_start = "2001-07-01"
test_end = "2001-12-30"

[model]
name = "exphydro"

[solver]
method = "euler"
sensitivity = "checkpoint"

[regional]
attributes = ["aridity", "soil_depth", "forest_frac"]
hidden = [8]
epochs = 2
lr = 0.02
batch_basins = 3
window = 90
warmup = 60
{regional}
"""


def _resimulate(cfg, model_pt: Path, basins):
    """Discharge [basin, day] of ``basins`` from evaluate_regional with the saved networks."""
    from adjointhydro.regional import evaluate_regional
    from adjointhydro.regional_runs import _load_models
    from adjointhydro.runs import _dataset_part, period_masks

    model, network, _ = _load_models(cfg, model_pt)
    part = _dataset_part(cfg).select_basins(list(basins))
    _, sim = evaluate_regional(model, network, part, part.observed("streamflow"),
                               periods=period_masks(cfg, part.dates), method="euler")
    return sim


def test_csv_folder_regional_run_writes_results_h5(tmp_path, caravan, capsys):
    from adjointhydro.runs import load_run_config, read_results

    syn, ts, att = caravan
    cfg_path = _write(tmp_path, _csv_config(ts, att))
    assert main(["train", str(cfg_path), "-q", "-o", str(tmp_path / "runs")]) == 0
    assert "median" in capsys.readouterr().out
    (run,) = list((tmp_path / "runs").iterdir())
    res = read_results(run / "results.h5")
    basins = ["syn0000", "syn0001", "syn0002", "syn0003", "syn0004"]
    assert res["basins"] == basins
    T = 730
    assert res["dates"].shape == (T,) and str(res["dates"][0]) == "2000-01-01" and str(res["dates"][-1]) == "2001-12-30"
    assert set(res["periods"]) == {"train", "validation", "test"}
    assert res["periods"]["train"].shape == (T,) and res["periods"]["train"].sum() == 275
    assert res["periods"]["test"].sum() == 183 and not (res["periods"]["train"] & res["periods"]["test"]).any()
    # observed: the CSV values exactly, NaN for empty cells (the gap and the random gaps)
    obs = syn.dataset.observed("Q").copy()
    b = basins.index(GAP[0])
    obs[b, GAP[1]:GAP[2]] = np.nan
    assert res["observed"].shape == (5, T)
    np.testing.assert_array_equal(res["observed"], obs)
    assert np.isnan(res["observed"][b, GAP[1]:GAP[2]]).all()
    assert np.isnan(res["observed"]).sum() > GAP[2] - GAP[1]  # random gaps too
    # simulated: every basin, every day (also where nothing was observed), as evaluate_regional gives it
    block = res["models"]["regional"]
    q = block["discharge"]
    assert q.shape == (5, T) and np.isfinite(q).all() and (q >= 0).all()
    cfg = load_run_config(run)
    np.testing.assert_allclose(q, _resimulate(cfg, run / "model.pt", basins), rtol=1e-12, atol=0)
    assert block["parameter_names"] == ["f", "Smax", "Qmax", "Df", "Tmax", "Tmin"]
    assert block["parameters"].shape == (5, 6)
    assert block["stores"] == {} and block["fluxes"] == {}  # discharge only
    assert not list(run.rglob(".*.tmp"))
    assert sorted(json.loads((run / "metrics.json").read_text())) == basins
    # evaluate writes it again, the same
    (run / "results.h5").unlink()
    assert main(["evaluate", str(run), "-q"]) == 0
    np.testing.assert_array_equal(read_results(run / "results.h5")["models"]["regional"]["discharge"], q)


def test_results_h5_write_is_atomic(tmp_path, caravan):
    """A write that fails half-way leaves the previous results.h5 intact and no temporary file."""
    from adjointhydro.models import exphydro
    from adjointhydro.runs import read_results, write_results

    dates = np.datetime64("2000-01-01") + np.arange(3)
    model = exphydro()
    kw = dict(dates=dates, basins=["a", "b"], observed=np.ones((2, 3)), observed_name="Q", observed_units="mm/day",
              masks={"all": np.ones(3, bool)})
    path = tmp_path / "results.h5"
    write_results(path, models={"regional": {"model": model, "discharge": np.full((2, 3), 2.0),
                                             "parameters": np.ones((2, 6)), "method": "euler"}}, **kw)
    before = path.read_bytes()
    with pytest.raises(KeyError):  # a block without parameters fails after the file was begun
        write_results(path, models={"regional": {"model": model, "discharge": np.zeros((2, 3))}}, **kw)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.h5"]
    assert (read_results(path)["models"]["regional"]["discharge"] == 2.0).all()


@pytest.mark.parametrize("data, regional, key", [
    ("", "", None),  # the valid configuration
    ("id_column = \"basin_id\"", "", "data.id_column: 'basin_id' is not a column of the attribute table"),
    ("date_column = \"Date\"", "", "data.date_column: column 'Date' is not in syn0000.csv; did you mean 'date'?"),
    ("basins = [\"syn0001\", \"syn0009\"]", "", "data.basins[1]: no file syn0009.csv in"),
    ("variables = [\"total_precipitation\"]", "", "data.variables: column 'total_precipitation' is not in"),
    ("forcing_source = \"nldas\"", "", "data.forcing_source: only used with source = 'camels_us'"),
    ("", "cv_folds = 1", "regional.cv_folds: must be 0 (off) or at least 2 folds, got 1"),
    ("", "cv_folds = 6", "regional.cv_folds: 6 folds need at least 6 basins; the data have 5"),
    ("", 'attributes = ["aridity", "soil_dept"]', "regional.attributes[1]: 'soil_dept' is not an attribute"),
])
def test_csv_folder_config_errors_name_the_key(tmp_path, caravan, data, regional, key):
    _, ts, att = caravan
    text = _csv_config(ts, att, regional=regional, data=data)
    if regional.startswith("attributes"):
        text = text.replace('attributes = ["aridity", "soil_depth", "forest_frac"]\n', "")
    if key is None:
        cfg = parse_config(text, path=tmp_path / "c.toml")
        ds = cfg.dataset()
        assert ds.basins == ["syn0000", "syn0001", "syn0002", "syn0003", "syn0004"]
        assert ds.forcing_names == ["P", "T", "PET"] and ds.observation_names == ["streamflow"]
        assert set(ds.attribute_names) == {"latitude", "elevation", "aridity", "slope", "soil_depth", "forest_frac"}
        return
    with pytest.raises(ConfigError) as e:
        parse_config(text, path=tmp_path / "c.toml")
    assert key in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("change, key", [
    (('attribute_files = "{att}"\n', ""), "data.attribute_files: required for a regional run with source = 'csv_folder'"),
    (('attribute_files = "{att}"', 'attribute_files = "{att}/nowhere"'), "data.attribute_files: file or folder not found"),
    (('attribute_files = "{att}"', 'attribute_files = ["{att}/attributes_a.csv", 3]'),
     "data.attribute_files: expected a path or a list of paths"),
    (('attribute_files = "{att}"', 'attribute_files = ["{att}/attributes_a.csv", "{att}/none.csv"]'),
     "data.attribute_files[1]: file or folder not found"),
    (('path = "{ts}"', 'path = "{ts}/syn0000.csv"'), "data.path: source = 'csv_folder' needs a folder"),
    (('path = "{ts}"', 'path = "{att}/.."'), "data.path: no per-basin files <basin>.csv in the folder"),
    (('source = "csv_folder"\npath = "{ts}"', 'source = "csv"\npath = "{ts}/syn0000.csv"'),
     "data.attribute_files: only used with source = 'csv_folder', not 'csv'"),
])
def test_csv_folder_bad_paths(tmp_path, caravan, change, key):
    _, ts, att = caravan
    old, new = (c.replace("{att}", str(att)).replace("{ts}", str(ts)) for c in change)
    text = _csv_config(ts, att)
    assert old in text
    with pytest.raises(ConfigError) as e:
        parse_config(text.replace(old, new), path=tmp_path / "c.toml")
    assert key in str(e.value) and "\n" not in str(e.value)


def test_cross_validation_through_the_cli(tmp_path, caravan, capsys):
    """cv_folds = 2: every basin is held out by exactly one fold, whose network never saw it."""
    from adjointhydro.runs import load_run_config, read_results

    _, ts, att = caravan
    basins = ["syn0000", "syn0001", "syn0002", "syn0003", "syn0004"]
    cfg_path = _write(tmp_path, _csv_config(ts, att, regional="cv_folds = 2"))
    # interrupted in the second fold (2 epochs per fold), then resumed
    assert main(["train", str(cfg_path), "-q", "-o", str(tmp_path / "runs"), "--stop-after-epochs", "3"]) == 130
    (run,) = list((tmp_path / "runs").iterdir())
    assert (run / "fold0" / "checkpoints" / "last.pt").is_file() and not (run / "folds.json").exists()
    capsys.readouterr()
    assert main(["resume", str(run), "-q"]) == 0
    out = capsys.readouterr().out
    assert "2-fold cross-validation over basins" in out and "pooled held-out metrics (5 basins" in out
    info = json.loads((run / "run.json").read_text())
    assert info["mode"] == "regional" and info["cv_folds"] == 2 and info["stage"] == "done"

    folds = json.loads((run / "folds.json").read_text())
    assert [f["fold"] for f in folds] == [0, 1]
    held = [b for f in folds for b in f["test_basins"]]
    assert sorted(held) == basins and len(held) == len(set(held))  # each basin held out exactly once
    pooled = json.loads((run / "metrics.json").read_text())
    assert sorted(pooled) == basins
    cfg = load_run_config(run)
    res = read_results(run / "results.h5")
    assert res["basins"] == basins and res["attrs"]["cv_folds"] == 2
    q = res["models"]["regional"]["discharge"]
    assert q.shape == (5, 730) and np.isfinite(q).all()
    for f in folds:
        i, test = f["fold"], f["test_basins"]
        assert sorted(f["train_basins"] + test) == basins and not set(f["train_basins"]) & set(test)
        # the fold's network was trained on the other basins only
        assert json.loads((run / f"fold{i}" / "config.json").read_text())["basins"] == f["train_basins"]
        assert len(json.loads((run / f"fold{i}" / "history.json").read_text())) == 2
        per_fold = json.loads((run / f"fold{i}" / "heldout_metrics.json").read_text())
        assert sorted(per_fold) == sorted(test)
        for b in test:
            assert per_fold[b] == pooled[b]
            assert set(pooled[b]) == {"train", "validation", "test"}
        for period in ("train", "validation", "test"):
            s = f["summary"][period]["nse"]
            assert s["n"] + s["n_nan"] == len(test)
            assert s["median"] == pytest.approx(np.median([per_fold[b][period]["nse"] for b in test]))
        # results.h5 holds each basin's simulation by the fold that held it out
        rows = [basins.index(b) for b in test]
        np.testing.assert_allclose(q[rows], _resimulate(cfg, run / f"fold{i}" / "model.pt", test), rtol=1e-12)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test"]["nse"]["n"] + summary["test"]["nse"]["n_nan"] == 5
    assert summary["test"]["nse"]["median"] == pytest.approx(np.median([pooled[b]["test"]["nse"] for b in basins]))
    assert (run / "plots" / "nse_cdf.png").is_file()
    # evaluate re-simulates from fold<i>/model.pt and prints per fold and pooled
    (run / "metrics.json").unlink()
    assert main(["evaluate", str(run), "-q"]) == 0
    out = capsys.readouterr().out
    assert "fold" in out and "NSE median" in out and "pooled" in out
    assert json.loads((run / "metrics.json").read_text()) == pooled


def test_cross_validation_with_dynamic_parameters_writes_the_held_out_series(tmp_path, caravan, capsys):
    """A CV run with dynamic parameters writes every basin's daily series, each from the fold
    network that held the basin out (as a run without CV writes its own)."""
    from adjointhydro.regional import evaluate_regional
    from adjointhydro.regional_runs import _load_models
    from adjointhydro.runs import _dataset_part, load_run_config

    _, ts, att = caravan
    text = _csv_config(ts, att, regional='cv_folds = 2\ndynamic_parameters = ["Df"]\ndynamic_lookback = 10')
    cfg_path = _write(tmp_path, text.replace("epochs = 2", "epochs = 1"))
    assert main(["train", str(cfg_path), "-q", "-o", str(tmp_path / "runs")]) == 0
    (run,) = list((tmp_path / "runs").iterdir())
    with np.load(run / "dynamic_parameters.npz") as z:
        basins = list(z["basins"])
        df = z["Df"]
    assert sorted(basins) == [f"syn000{i}" for i in range(5)] and df.shape == (5, 730)
    cfg = load_run_config(run)
    part = _dataset_part(cfg)
    for f in json.loads((run / "folds.json").read_text()):
        model, network, _ = _load_models(cfg, run / f"fold{f['fold']}" / "model.pt")
        held = part.select_basins(f["test_basins"])
        _, _, dyn = evaluate_regional(model, network, held, held.observed("streamflow"), method="euler",
                                      return_dynamic=True)
        for j, b in enumerate(f["test_basins"]):
            np.testing.assert_allclose(df[basins.index(b)], dyn["Df"][j], rtol=1e-12)


def test_csv_folder_attribute_problems(tmp_path, caravan, capsys):
    """A basin missing from an attribute table is a one-line error naming the table; a NaN in an
    attribute the run reads names regional.attributes (and NaN in unused ones is no warning)."""
    import shutil
    import warnings

    _, ts, att = caravan
    mine = tmp_path / "attributes"
    shutil.copytree(att, mine)
    b_table = mine / "attributes_b.csv"
    lines = b_table.read_text().splitlines()
    head = lines[0].split(",")
    assert head[0] == "gauge_id" and "soil_depth" in head and "slope" in head
    # syn0003: soil_depth (read) and slope (not read) missing
    cells = lines[4].split(",")
    assert cells[0] == "syn0003"
    cells[head.index("soil_depth")] = cells[head.index("slope")] = ""
    lines[4] = ",".join(cells)
    b_table.write_text("\n".join(lines) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ConfigError, match=r"regional\.attributes\[1\]: 'soil_depth' is missing \(NaN\) for "
                                              r"basin\(s\) \['syn0003'\]"):
            parse_config(_csv_config(ts, mine), path=tmp_path / "c.toml")
        cfg = parse_config(_csv_config(ts, mine).replace('"soil_depth", ', ""), path=tmp_path / "c.toml")
    assert np.isnan(cfg.dataset().attribute("slope")[3])

    b_table.write_text("\n".join(lines[:4]) + "\n")  # syn0003 and syn0004 absent
    cfg_path = _write(tmp_path, _csv_config(ts, mine))
    assert main(["train", str(cfg_path), "-q", "-o", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "attributes_b.csv: attribute table lacks basin(s) ['syn0003', 'syn0004']" in err
    assert not (tmp_path / "runs").exists()


def test_torchrun_two_processes_train_one_run_like_one_process(tmp_path, caravan, capsys):
    """``torchrun -m adjointhydro train``: two gloo processes, one run folder written by rank 0,
    the same loss trajectory as one process (each step sums the shards' gradients)."""
    import subprocess
    import sys

    syn, ts, att = caravan
    cfg_path = _write(tmp_path, _csv_config(ts, att))
    assert main(["train", str(cfg_path), "-q", "-o", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "adjointhydro", "train", str(cfg_path), "-q", "-o", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("run folder:") == 1  # only rank 0 prints
    (one,) = list((tmp_path / "one").iterdir())
    (two,) = list((tmp_path / "two").iterdir())  # one folder, not one per process
    info = json.loads((two / "run.json").read_text())
    assert info["world_size"] == 2 and info["stage"] == "done"
    h1 = json.loads((one / "history.json").read_text())
    h2 = json.loads((two / "history.json").read_text())
    assert len(h1) == len(h2) == 2
    for a, b in zip(h1, h2):
        np.testing.assert_allclose([b["train_loss"], b["val_loss"]], [a["train_loss"], a["val_loss"]], rtol=1e-8)
    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((two / "metrics.json").read_text())
    assert sorted(m2) == sorted(m1) == sorted(syn.dataset.basins)
    for basin in m1:
        np.testing.assert_allclose(m2[basin]["test"]["nse"], m1[basin]["test"]["nse"], rtol=1e-6)
    assert (two / "results.h5").is_file() and not list(two.rglob(".*.tmp"))


def test_torchrun_refuses_single_basin_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = tmp_path / "single.toml"
    cfg.write_text('[run]\nname = "lr"\n[data]\nsource = "leaf_river"\n[model]\nsnow = false\n')
    assert main(["train", str(cfg), "-q", "-o", str(tmp_path / "runs")]) == 2
    assert "torchrun with several processes is for regional training" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
