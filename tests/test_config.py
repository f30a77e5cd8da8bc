"""Tests of adjointhydro.config: TOML run configurations, validated before any work.

Every kind of bad configuration must give ONE line that names the key and what is wrong.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from adjointhydro.config import Config, ConfigError, load_config, parse_config

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CASES = Path(__file__).resolve().parents[1] / "cases"

GOOD = """
[run]
name = "leaf"
seed = 3

[periods]
warmup_start = "1957-01-01"
train_start = "1958-01-01"
train_end = "1975-12-31"
validation_start = "1976-01-01"
validation_end = "1977-12-31"
test_start = 1978-01-01          # a TOML date works too
test_end = "1987-12-31"

[model]
name = "exphydro_m50"
snow = false

[training]
epochs = 7
"""


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def error_of(tmp_path: Path, text: str, **kw) -> str:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(p, **kw)
    msg = str(ei.value)
    assert "\n" not in msg, f"not one line: {msg!r}"
    assert msg.startswith(str(p)), msg  # names the file
    return msg


def replace(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new)


# ----------------------------------------------------------------------- good
def test_good_config_is_read_with_defaults(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert isinstance(cfg, Config)
    assert cfg.run.name == "leaf" and cfg.run.seed == 3
    assert cfg.run.output_dir == tmp_path.resolve() / "runs"  # relative to the config file
    assert cfg.data.source == "leaf_river"
    assert cfg.periods.test_start == np.datetime64("1978-01-01")
    assert cfg.periods.simulation_start == np.datetime64("1957-01-01")
    assert cfg.periods.training_end == np.datetime64("1977-12-31")
    assert cfg.model.is_hybrid and cfg.model.network_fluxes == ("et", "Q")
    assert cfg.training.epochs == 7 and cfg.training.lr == 5e-3  # default kept
    assert cfg.solver.method == "dopri5" and cfg.solver.sensitivity == "checkpoint"
    ds = cfg.dataset()  # loaded and checked once
    assert ds.basins == ["leaf_river"] and cfg.dataset() is ds
    assert set(cfg.periods.defined()) == {"train", "validation", "test"}


def test_physics_only_model_and_integers_as_floats(tmp_path):
    text = replace(GOOD, 'name = "exphydro_m50"', 'name = "exphydro"') + "[solver]\nrtol = 1\natol = 0.01\n"
    cfg = load_config(write(tmp_path, text))
    assert not cfg.model.is_hybrid
    assert cfg.solver.rtol == 1.0 and isinstance(cfg.solver.rtol, float)


def test_custom_neural_fluxes_and_inputs(tmp_path):
    text = replace(GOOD, 'name = "exphydro_m50"', 'name = "exphydro"\nneural_fluxes = ["Q"]\ninputs = { Q = ["soil", "P"] }\nhidden = [8]')
    cfg = load_config(write(tmp_path, text))
    assert cfg.model.network_fluxes == ("Q",) and cfg.model.inputs == {"Q": ["soil", "P"]}
    assert cfg.model.hidden_layers == (8,)


def test_shipped_cases_are_valid():
    for name in ("leaf_river_m0", "leaf_river_m50"):
        cfg = load_config(CASES / name / "config.toml")
        assert cfg.periods.test_end == np.datetime64("1987-12-31")
    if not SHARED.exists():
        pytest.skip("../shared/data is absent (a fresh clone has no ../shared)")
    assert load_config(CASES / "au_saumon_m50" / "config.toml").model.use_snow
    assert load_config(CASES / "exphydro_sample_m100" / "config.toml").model.name == "exphydro_m100"


# ------------------------------------------------------------- unknown keys
def test_unknown_key_with_did_you_mean(tmp_path):
    msg = error_of(tmp_path, GOOD + "epoch = 3\n")  # still in [training]
    assert "training.epoch" in msg and "unknown key" in msg and "did you mean 'epochs'" in msg


def test_unknown_section(tmp_path):
    msg = error_of(tmp_path, GOOD + "[trainig]\nepochs = 3\n")
    assert "[trainig]" in msg and "unknown section" in msg and "'training'" in msg


def test_unknown_key_in_periods(tmp_path):
    msg = error_of(tmp_path, replace(GOOD, "test_end", "tset_end"))
    assert "periods.tset_end" in msg and "did you mean 'test_end'" in msg


# ------------------------------------------------------------- wrong types
@pytest.mark.parametrize(
    "old,new,key,what",
    [
        ("epochs = 7", 'epochs = "7"', "training.epochs", "integer"),
        ("epochs = 7", "epochs = 7.5", "training.epochs", "integer"),
        ("snow = false", 'snow = "no"', "model.snow", "true or false"),
        ("seed = 3", "seed = true", "run.seed", "integer"),
        ('name = "leaf"', "name = 5", "run.name", "string"),
        ("epochs = 7", "epochs = 7\nlr = [0.1]", "training.lr", "number"),
        ('snow = false', 'snow = false\nhidden = [16, "x"]', "model.hidden[1]", "integer"),
    ],
)
def test_wrong_type(tmp_path, old, new, key, what):
    msg = error_of(tmp_path, replace(GOOD, old, new))
    assert key in msg and what in msg and "expected" in msg


def test_section_that_is_not_a_table(tmp_path):
    # a top-level key named like a section (GOOD has no [training] table to clash with)
    good = GOOD.split("[training]")[0] if "[training]" in GOOD else GOOD
    msg = error_of(tmp_path, "training = 3\n" + good)
    assert "training" in msg and "section" in msg


def test_invalid_toml(tmp_path):
    msg = error_of(tmp_path, GOOD + "[model\n")
    assert "not valid TOML" in msg


# ------------------------------------------------------------------- dates
def test_bad_date(tmp_path):
    msg = error_of(tmp_path, replace(GOOD, '"1958-01-01"', '"1958-02-30"'))
    assert "periods.train_start" in msg and "1958-02-30" in msg and "YYYY-MM-DD" in msg


def test_date_outside_data(tmp_path):
    msg = error_of(tmp_path, replace(GOOD, '"1987-12-31"', '"1990-12-31"'))
    assert "periods.test_end" in msg and "outside the data" in msg and "1957-01-01..1987-12-31" in msg


def test_date_outside_data_is_only_found_with_the_data(tmp_path):
    text = replace(GOOD, '"1987-12-31"', '"1990-12-31"')
    load_config(write(tmp_path, text), check_data=False)  # statically fine


def test_empty_period(tmp_path):
    msg = error_of(tmp_path, replace(GOOD, 'train_end = "1975-12-31"', 'train_end = "1957-12-31"'))
    assert "periods.train_end" in msg and "before periods.train_start" in msg and "empty period" in msg


def test_period_without_end(tmp_path):
    msg = error_of(tmp_path, replace(GOOD, 'validation_end = "1977-12-31"\n', ""))
    assert "periods.validation_end" in msg and "missing" in msg


def test_warmup_after_training_start(tmp_path):
    msg = error_of(tmp_path, replace(GOOD, 'warmup_start = "1957-01-01"', 'warmup_start = "1959-01-01"'))
    assert "periods.warmup_start" in msg and "after periods.train_start" in msg


# ---------------------------------------------------------- unknown names
def test_unknown_flux_name(tmp_path):
    text = replace(GOOD, 'name = "exphydro_m50"', 'name = "exphydro"\nneural_fluxes = ["ett"]')
    msg = error_of(tmp_path, text)
    assert "model.neural_fluxes[0]" in msg and "'ett'" in msg and "did you mean 'et'" in msg
    assert "rainfall, et, Q" in msg  # lists the fluxes the model has


def test_neural_flux_of_the_snow_model_without_snow(tmp_path):
    text = replace(GOOD, 'name = "exphydro_m50"', 'name = "exphydro"\nneural_fluxes = ["melt"]')
    msg = error_of(tmp_path, text)
    assert "model.neural_fluxes[0]" in msg and "'melt'" in msg


@pytest.mark.parametrize(
    "old,new,key,hint",
    [
        ('name = "exphydro_m50"', 'name = "exphydro_m5O"', "model.name", "exphydro_m50"),
        ("epochs = 7", 'epochs = 7\nloss = "nse2"', "training.loss", "'nse'"),
        ("epochs = 7", 'epochs = 7\nlr_schedule = "cosin"', "training.lr_schedule", "'cosine'"),
        ("[training]", '[solver]\nmethod = "dopri"\n[training]', "solver.method", "'dopri5'"),
        ("[training]", '[solver]\nsensitivity = "adjoin"\n[training]', "solver.sensitivity", "'adjoint'"),
        ("[training]", '[calibration]\noptimizer = "adma"\n[training]', "calibration.optimizer", "'adam'"),
        ("[training]", '[data]\nsource = "leaf-river"\n[training]', "data.source", "'leaf_river'"),
        ("snow = false", "snow = false\nparameters = { Smaxx = 100.0 }", "model.parameters.Smaxx", "'Smax'"),
        ("[training]", '[solver]\ndtype = "flaot32"\n[training]', "solver.dtype", "'float32'"),
        ("[training]", '[solver]\ndevice = "gpu"\n[training]', "solver.device", "'cuda'"),
    ],
)
def test_unknown_names(tmp_path, old, new, key, hint):
    msg = error_of(tmp_path, replace(GOOD, old, new))
    assert key in msg and hint in msg


def test_parameter_outside_bounds(tmp_path):
    msg = error_of(tmp_path, replace(GOOD, "snow = false", "snow = false\nparameters = { Smax = 3.0 }"))
    assert "model.parameters.Smax" in msg and "outside its bounds" in msg


def test_checkpoint_needs_native_method(tmp_path):
    msg = error_of(tmp_path, replace(GOOD, "[training]", '[solver]\nmethod = "dopri8"\n[training]'))
    assert "solver.sensitivity" in msg and "native method" in msg


def test_negative_value(tmp_path):
    msg = error_of(tmp_path, replace(GOOD, "epochs = 7", "epochs = 7\nlr = -1.0"))
    assert "training.lr" in msg and "> 0" in msg


def test_snow_model_without_temperature(tmp_path):
    msg = error_of(tmp_path, replace(GOOD, "snow = false", "snow = true"))
    assert "model.snow" in msg and "'T'" in msg


# ------------------------------------------------------------- files
def test_missing_data_file(tmp_path):
    msg = error_of(tmp_path, GOOD + '[data]\nsource = "csv"\npath = "missing.csv"\n')
    assert "data.path" in msg and "not found" in msg and str(tmp_path.resolve() / "missing.csv") in msg


def test_missing_data_folder(tmp_path):
    msg = error_of(tmp_path, GOOD + '[data]\nsource = "holmes"\npath = "nowhere"\ncatchment = "Leaf"\n')
    assert "data.path" in msg and "not found" in msg


def test_path_needed(tmp_path):
    msg = error_of(tmp_path, GOOD + '[data]\nsource = "hdf5"\n')
    assert "data.path" in msg and "required" in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_csv_data_with_rename_and_missing_column(tmp_path):
    csv = tmp_path / "basin.csv"
    dates = np.datetime64("2000-01-01") + np.arange(60)
    rng = np.random.default_rng(0)
    lines = ["day,prcp,pet,flow"] + [
        f"{d},{p:.2f},{e:.2f},{q:.3f}" for d, p, e, q in zip(dates, rng.gamma(0.5, 5, 60), np.full(60, 2.0), rng.random(60) + 0.5)
    ]
    csv.write_text("\n".join(lines) + "\n")
    base = """
[data]
source = "csv"
path = "basin.csv"
date_column = "day"
variables = ["prcp", "pet"]
observed = "flow"
rename = { prcp = "P", pet = "PET", flow = "Q" }
[periods]
train_start = "2000-01-10"
train_end = "2000-02-15"
[model]
snow = false
"""
    cfg = load_config(write(tmp_path, base))
    ds = cfg.dataset()
    assert ds.forcing_names == ["P", "PET"] and ds.observation_names == ["Q"]
    msg = error_of(tmp_path, replace(base, 'observed = "flow"', 'observed = "flwo"'))
    assert "data.observed" in msg and "'flwo'" in msg and "did you mean 'flow'" in msg


def test_holmes_unknown_catchment(tmp_path):
    if not (SHARED / "holmes").exists():
        pytest.skip("../shared/data/holmes is absent (a fresh clone has no ../shared)")
    text = GOOD + f'[data]\nsource = "holmes"\npath = "{SHARED / "holmes"}"\ncatchment = "Au Saumn"\n'
    msg = error_of(tmp_path, text)
    assert "data.catchment" in msg and "did you mean 'Au Saumon'" in msg


def test_no_observations_in_a_period(tmp_path):
    csv = tmp_path / "b.csv"
    dates = np.datetime64("2000-01-01") + np.arange(40)
    rows = [f"{d},1.0,2.0,{'' if i >= 20 else 1.0 + i / 10}" for i, d in enumerate(dates)]
    csv.write_text("Date,P,PET,Q\n" + "\n".join(rows) + "\n")
    text = """
[data]
source = "csv"
path = "b.csv"
[periods]
train_start = "2000-01-01"
train_end = "2000-01-20"
test_start = "2000-01-25"
test_end = "2000-02-09"
[model]
snow = false
"""
    msg = error_of(tmp_path, text)
    assert "periods.test_start" in msg and "no observed 'Q'" in msg


def test_parse_config_from_text_without_file():
    cfg = parse_config('[model]\nname = "reservoir_cascade"\nn_reservoirs = 2\n', check_data=False)
    assert cfg.model.n_reservoirs == 2 and not cfg.model.is_hybrid
    with pytest.raises(ConfigError, match=r"^config: model.n_reservoirs: must be >= 1"):
        parse_config('[model]\nname = "reservoir_cascade"\nn_reservoirs = 0\n', check_data=False)


def test_solver_parallel_forward(tmp_path):
    text = GOOD + '[solver]\nparallel_forward = true\n'
    assert load_config(write(tmp_path, text), check_data=False).solver.parallel_forward is True
    msg = error_of(tmp_path, GOOD + '[solver]\nparallel_forward = "yes"\n', check_data=False)
    assert "solver.parallel_forward" in msg and "true or false" in msg
    msg = error_of(tmp_path, GOOD + '[solver]\nsensitivity = "direct"\nparallel_forward = true\n', check_data=False)
    assert "solver.parallel_forward" in msg and "'direct'" in msg


def test_solver_compile(tmp_path):
    """solver.compile = true gives the runs a checkpointed adjoint with a compiled step."""
    from adjointhydro import CheckpointedAdjoint
    from adjointhydro.runs import _sensitivity

    cfg = load_config(write(tmp_path, GOOD + '[solver]\ncompile = true\nparallel_forward = false\n'), check_data=False)
    sens = _sensitivity(cfg)
    assert isinstance(sens, CheckpointedAdjoint) and sens.compile and sens.parallel_forward is False
    # "auto" (the default): the name, which calibration and training compile for long runs
    assert _sensitivity(load_config(write(tmp_path, GOOD), check_data=False)) == "checkpoint"
    assert _sensitivity(load_config(write(tmp_path, GOOD + '[solver]\ncompile = "auto"\n'),
                                    check_data=False)) == "checkpoint"
    # false: calibration and training get an explicit uncompiled adjoint, which they do not
    # compile; single solves the name, as with "auto"
    off = load_config(write(tmp_path, GOOD + '[solver]\ncompile = false\n'), check_data=False)
    sens = _sensitivity(off, long_run=True)
    assert isinstance(sens, CheckpointedAdjoint) and not sens.compile and sens.parallel_forward is None
    assert _sensitivity(off) == "checkpoint"
    assert _sensitivity(load_config(write(tmp_path, GOOD), check_data=False), long_run=True) == "checkpoint"
    msg = error_of(tmp_path, GOOD + '[solver]\nsensitivity = "direct"\ncompile = true\n', check_data=False)
    assert "solver.compile" in msg and "'direct'" in msg
    assert load_config(write(tmp_path, GOOD + '[solver]\nsensitivity = "direct"\n'),
                       check_data=False).solver.compile == "auto"  # (auto asks nothing of 'direct')
    msg = error_of(tmp_path, GOOD + '[solver]\ncompile = "yes"\n', check_data=False)
    assert "solver" in msg and "compile" in msg and 'true, false or "auto"' in msg and "'yes'" in msg


def test_csv_folder_for_a_single_basin_run(tmp_path):
    """source = 'csv_folder' without attributes serves single-basin runs (here: simulate)."""
    from conftest import write_csv_folder

    from adjointhydro.runs import read_results, simulate
    from adjointhydro.synthetic import make_synthetic_basins

    syn = make_synthetic_basins(3, years=1, seed=1, method="euler")
    ts, _ = write_csv_folder(tmp_path / "caravan", syn.dataset)
    text = f"""
[data]
source = "csv_folder"
path = "{ts}"
basins = ["syn0001"]
observed = "streamflow"
rename = {{ total_precipitation_sum = "P", temperature_2m_mean = "T", potential_evaporation_sum = "PET", streamflow = "Q" }}
[periods]
train_start = "2000-03-01"
train_end = "2000-12-30"
[model]
name = "exphydro"
[solver]
method = "euler"
"""
    cfg = load_config(write(tmp_path, text))
    ds = cfg.dataset()
    assert ds.basins == ["syn0001"] and ds.attribute_names == []
    assert ds.forcing_names == ["P", "T", "PET"] and ds.forcing_units == ["mm/day", "degC", "mm/day"]
    assert ds.observation_names == ["Q"] and ds.observation_units == ["mm/day"]
    np.testing.assert_array_equal(ds.forcing_variable("T")[0], syn.dataset.forcing_variable("T")[1])
    np.testing.assert_array_equal(ds.observed("Q")[0], syn.dataset.observed("Q")[1])
    res = read_results(simulate(cfg, output=tmp_path / "sim.h5", log=lambda m: None))
    assert res["basins"] == ["syn0001"] and res["models"]["m0"]["discharge"].shape == (1, 305)
    # the keys of the attribute tables are errors without source = 'csv_folder'
    msg = error_of(tmp_path, GOOD + '[data]\nid_column = "basin"\n')
    assert "data.id_column: only used with source = 'csv_folder', not 'leaf_river'" in msg
    msg = error_of(tmp_path, text.replace('source = "csv_folder"', 'source = "csv_folder"\ndate_column = ""'))
    assert "data.date_column: must not be empty" in msg
