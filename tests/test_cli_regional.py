"""Regional (multi-basin, dPL) runs through the command line: config, train, evaluate, resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from adjointhydro.cli import main
from adjointhydro.config import ConfigError, parse_config
from adjointhydro.data import write_hdf5
from adjointhydro.synthetic import make_synthetic_basins

from conftest import SHARED_DATA

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
