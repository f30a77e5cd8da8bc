"""Run configurations: TOML files, validated before any work.

A configuration is a TOML file (read with the standard library's :mod:`tomllib`)
with these sections; every key is optional unless marked, and paths are relative
to the configuration file::

    [run]
    name = "leaf_river_m50"        # run folders are <output_dir>/<name>_<timestamp>/
    seed = 0
    output_dir = "runs"

    [data]
    source = "leaf_river"          # leaf_river (embedded) | holmes | exphydro_sample | csv | csv_folder
                                   # | hdf5 | camels_us
    path = "../../shared/data/holmes"   # file or folder (all sources but leaf_river); csv_folder:
                                   # the folder of per-basin files <basin>.csv
    catchment = "Au Saumon"        # holmes only
    basins = ["01022500"]          # camels_us, hdf5, csv_folder: basin ids to use (default: all;
                                   # csv_folder: the file names without .csv)
    variables = ["P", "PET"]       # forcing variables (csv, csv_folder: the columns to read;
                                   # default: the model's forcing, through rename)
    observed = "Q"                 # observed discharge variable (csv, csv_folder: its column)
    date_column = "Date"           # csv ("Date" by default) and csv_folder ("date" by default)
    rename = { E0 = "PET", Qo = "Q" }   # csv, csv_folder: column -> variable name
    attribute_files = "attributes/camels"  # csv_folder: attribute table(s) joined on id_column:
                                   # a .csv file, a folder of them (searched recursively) or a
                                   # list of files/folders; numeric columns become attributes
                                   # (required for a regional run)
    id_column = "gauge_id"         # csv_folder: the basin id column of the attribute tables
    forcing_source = "daymet"      # camels_us only

    [periods]                      # dates 'YYYY-MM-DD' (a TOML date works too); ends inclusive
    warmup_start = "1957-01-01"    # the simulation starts here (default: train_start)
    train_start = "1958-01-01"     # required to train
    train_end = "1983-12-31"
    validation_start = "1984-01-01"  # optional, for early stopping of the hybrid
    validation_end = "1987-12-31"
    test_start = "1988-01-01"      # optional
    test_end = "1993-12-31"

    [model]
    name = "exphydro_m50"          # exphydro | exphydro_m50 | exphydro_m100 | reservoir_cascade
    snow = false                   # EXP-HYDRO with or without the snow store
    smoothing = 5.0                # sharpness of the smooth thresholds (0: hard steps)
    hidden = [16, 16]              # widths of the networks' hidden layers
    neural_fluxes = ["Q"]          # fluxes replaced by networks (exphydro, reservoir_cascade)
    inputs = { Q = ["soil", "P"] } # inputs of those networks (default: all stores and forcing)
    n_reservoirs = 3               # reservoir_cascade only
    parameters = { Smax = 1200.0 } # physical parameters (simulate; default: the model's)

    [solver]
    method = "dopri5"              # native: euler midpoint heun rk4 bosh3 dopri5; or a torchdiffeq method
    rtol = 1e-3
    atol = 1e-3
    sensitivity = "checkpoint"     # checkpoint | adjoint | direct
    parallel_forward = true        # checkpoint: calibration's forward pass parallel in time for a few
                                   # rows (default; false: period by period, 10-20x slower there)
    compile = "auto"               # checkpoint: compile the period-by-period steps: 10-30 s once,
                                   # then 2-4x faster forward passes from 4 basins on a CPU; "auto":
                                   # for calibration and training runs long enough to repay it
    dtype = "float64"              # float64 | float32: the hybrid's networks (training ~1.6x faster on
                                   # CPU); the physics model stays float64, except in a regional
                                   # run, whose solves all take this type (parameters stay float64)
    device = "cpu"                 # cpu | cuda | cuda:N | auto (cuda where a GPU is visible)

    [calibration]                  # of the physics model M0
    optimizer = "adam"             # adam | lbfgs | de (differential evolution, one basin at a time)
    iterations = 100               # (de: generations)
    lr = 0.05                      # default 0.05 for adam, 1.0 for lbfgs
    n_starts = 4
    loss = "nse"                   # nse | kge | mse

    [training]                     # of the hybrid
    epochs = 50
    lr = 5e-3
    lr_schedule = "cosine"         # cosine | step | constant
    patience = 10
    loss = "nse"
    pretrain_epochs = 300          # fit the networks to M0's fluxes first (0: skip)
    pretrain_lr = 1e-2
    train_parameters = false       # also train the physical parameters left in the hybrid
    grad_clip = 1.0

    [regional]                     # multi-basin training (dPL): its presence makes `train` regional;
    attributes = ["p_mean", "aridity"]   # (required) static attributes the parameter network reads
    hidden = [32, 32]              # hidden layers of the parameter network (model.hidden: the hybrid's)
    epochs = 50
    lr = 1e-2
    lr_schedule = "cosine"         # cosine | constant
    patience = 10                  # epochs without a better validation loss
    loss = "nse"                   # nse (NSE*) | kge | mse
    batch_basins = 32              # basins per mini-batch
    window = 365                   # scored days per training window (0: the whole training period)
    warmup = 365                   # days simulated before each window, not scored
    grad_clip = 1.0
    val_every = 1                  # validate every this many epochs
    cv_folds = 0                   # k >= 2: k-fold cross-validation over basins instead of one
                                   # model (prediction in ungauged basins); 0: off
    dynamic_parameters = []        # parameters that vary in time, e.g. ["Df"], from the attributes
                                   # and the trailing means of recent forcing (default: none)
    dynamic_inputs = ["P", "T"]    # forcing variables of those means (default: the model's forcing)
    dynamic_lookback = 30          # days of the trailing means

A regional run takes model.name = "exphydro" (parameters from attributes, dPL) or
"exphydro_m50" (whose networks also read the attributes), data with attributes
(camels_us, hdf5, csv_folder with attribute_files) and no [calibration] or [training]
section.

A Caravan download (``timeseries/csv/<source>/<basin>.csv`` and
``attributes/<source>/*.csv``) is read with source = "csv_folder"::

    [data]
    source = "csv_folder"
    path = "Caravan/timeseries/csv/camels"
    attribute_files = "Caravan/attributes/camels"
    observed = "streamflow"
    rename = { total_precipitation_sum = "P", temperature_2m_mean = "T",
               potential_evaporation_sum = "PET", streamflow = "Q" }

:func:`load_config` checks everything it can before any solve: unknown keys (with
a did-you-mean), wrong types, unknown names (model, loss, method, sensitivity,
optimizer, flux), missing files, empty or misordered periods and, by loading the
data, dates outside the data and forcing the model needs but the data lack. Every
problem is a :class:`ConfigError` whose message is one line naming the file, the
key and what is wrong.
"""
from __future__ import annotations

import datetime as _dt
import difflib
import math
import re
import sys
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: reading a configuration needs none
    import torch

__all__ = [
    "Config",
    "ConfigError",
    "RunConfig",
    "DataConfig",
    "PeriodsConfig",
    "ModelConfig",
    "SolverConfig",
    "CalibrationConfig",
    "TrainingConfig",
    "RegionalConfig",
    "load_config",
    "parse_config",
    "load_dataset",
    "build_physics_model",
    "MODELS",
    "SOURCES",
    "SENSITIVITIES",
    "OPTIMIZERS",
    "LR_SCHEDULES",
    "PERIODS",
]

MODELS = ("exphydro", "exphydro_m50", "exphydro_m100", "reservoir_cascade")
SOURCES = ("leaf_river", "holmes", "exphydro_sample", "csv", "csv_folder", "hdf5", "camels_us")
#: Sources read from CSV columns: data.variables and data.observed name columns, data.rename maps them.
CSV_SOURCES = ("csv", "csv_folder")
#: Default date column per CSV source (Caravan files call it "date").
_DATE_COLUMN = {"csv": "Date", "csv_folder": "date"}
SENSITIVITIES = ("checkpoint", "adjoint", "direct")
OPTIMIZERS = ("adam", "lbfgs", "de")
LR_SCHEDULES = ("cosine", "step", "constant")
#: Scored periods, in report order.
PERIODS = ("train", "validation", "test")
#: Networks of the built-in hybrids: which fluxes they replace.
_BUILTIN_NEURAL = {"exphydro_m50": ("et", "Q"), "exphydro_m100": ("snowfall", "rainfall", "melt", "et", "Q")}


class ConfigError(ValueError):
    """A configuration problem; ``str()`` is one line naming the key and what is wrong."""


# ------------------------------------------------------------------ dataclasses
@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    output_dir: Path = Path("runs")


@dataclass
class DataConfig:
    source: str = "leaf_river"
    path: Path | None = None
    catchment: str | None = None
    basins: list[str] | None = None
    variables: list[str] | None = None
    observed: str = "Q"
    date_column: str | None = None  # default per source: _DATE_COLUMN
    rename: dict[str, str] = field(default_factory=dict)
    attribute_files: list[Path] | None = None
    id_column: str = "gauge_id"
    forcing_source: str = "daymet"

    @property
    def date_column_name(self) -> str:
        """The date column of a CSV source (the configured one or the source's default)."""
        return self.date_column if self.date_column is not None else _DATE_COLUMN.get(self.source, "Date")


@dataclass
class PeriodsConfig:
    warmup_start: np.datetime64 | None = None
    train_start: np.datetime64 | None = None
    train_end: np.datetime64 | None = None
    validation_start: np.datetime64 | None = None
    validation_end: np.datetime64 | None = None
    test_start: np.datetime64 | None = None
    test_end: np.datetime64 | None = None

    def period(self, name: str) -> tuple[np.datetime64, np.datetime64] | None:
        """``(start, end)`` of ``train``, ``validation`` or ``test`` (inclusive), or None."""
        s, e = getattr(self, f"{name}_start"), getattr(self, f"{name}_end")
        return None if s is None else (s, e)

    def defined(self) -> dict[str, tuple[np.datetime64, np.datetime64]]:
        """The scored periods that are set, ``name -> (start, end)``."""
        return {n: self.period(n) for n in PERIODS if self.period(n) is not None}

    @property
    def simulation_start(self) -> np.datetime64 | None:
        starts = [d for d in (self.warmup_start, self.train_start, self.validation_start, self.test_start)
                  if d is not None]
        return min(starts) if starts else None

    @property
    def simulation_end(self) -> np.datetime64 | None:
        ends = [d for d in (self.train_end, self.validation_end, self.test_end) if d is not None]
        return max(ends) if ends else None

    @property
    def training_end(self) -> np.datetime64 | None:
        """Last day a training run needs (end of training or validation)."""
        ends = [d for d in (self.train_end, self.validation_end) if d is not None]
        return max(ends) if ends else None


@dataclass
class ModelConfig:
    name: str = "exphydro"
    snow: bool | None = None
    smoothing: float = 5.0
    hidden: list[int] | None = None
    neural_fluxes: list[str] | None = None
    inputs: dict[str, list[str]] = field(default_factory=dict)
    n_reservoirs: int = 3
    parameters: dict[str, float] = field(default_factory=dict)

    @property
    def use_snow(self) -> bool:
        if self.name == "exphydro_m100":
            return True
        return True if self.snow is None else bool(self.snow)

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        if self.hidden is not None:
            return tuple(self.hidden)
        return (32, 32) if self.name == "exphydro_m100" else (16, 16)

    @property
    def network_fluxes(self) -> tuple[str, ...]:
        """Names of the fluxes the hybrid computes with networks (empty: physics only)."""
        if self.neural_fluxes is not None:
            return tuple(self.neural_fluxes)
        return _BUILTIN_NEURAL.get(self.name, ())

    @property
    def is_hybrid(self) -> bool:
        return bool(self.network_fluxes)


@dataclass
class SolverConfig:
    method: str = "dopri5"
    rtol: float = 1e-3
    atol: float = 1e-3
    sensitivity: str = "checkpoint"
    parallel_forward: bool | None = None  # None: the automatic rule (parallel for a few rows)
    # checkpoint: the period-by-period forward's step compiled (torch.compile); "auto": where
    # a calibration or training run is long enough to repay it (adjointhydro.training)
    compile: bool | str = "auto"
    dtype: str = "float64"
    device: str = "cpu"

    @property
    def torch_dtype(self) -> "torch.dtype":
        import torch

        return torch.float32 if self.dtype == "float32" else torch.float64



@dataclass
class CalibrationConfig:
    optimizer: str = "adam"
    iterations: int = 100
    lr: float | None = None  # default: 0.05 for adam, 1.0 (the quasi-Newton step) for lbfgs
    n_starts: int = 1
    loss: str = "nse"
    popsize: int = 15
    target_loss: float | None = None


@dataclass
class TrainingConfig:
    epochs: int = 50
    lr: float = 5e-3
    lr_schedule: str = "cosine"
    patience: int = 10
    loss: str = "nse"
    pretrain_epochs: int = 300
    pretrain_lr: float = 1e-2
    train_parameters: bool = False
    grad_clip: float = 1.0


@dataclass
class RegionalConfig:
    attributes: list[str] | None = None
    hidden: list[int] = field(default_factory=lambda: [32, 32])
    epochs: int = 50
    lr: float = 1e-2
    lr_schedule: str = "cosine"
    patience: int = 10
    loss: str = "nse"
    batch_basins: int = 32
    window: int = 365
    warmup: int = 365
    grad_clip: float = 1.0
    val_every: int = 1
    cv_folds: int = 0
    dynamic_parameters: list[str] = field(default_factory=list)
    dynamic_inputs: list[str] | None = None
    dynamic_lookback: int = 30


#: Models a regional run can train.
REGIONAL_MODELS = ("exphydro", "exphydro_m50")


@dataclass
class Config:
    """A validated run configuration (see the module docstring for the keys)."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    periods: PeriodsConfig = field(default_factory=PeriodsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    #: set when the configuration has a [regional] section (multi-basin training)
    regional: RegionalConfig | None = None
    #: the file it was read from (None for a config made in code)
    path: Path | None = None
    #: the text of that file (copied into run folders)
    text: str = ""
    _dataset: Any = field(default=None, repr=False, compare=False)

    @property
    def where(self) -> str:
        return str(self.path) if self.path is not None else "config"

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.where}: {key}: {problem}")

    def checked_device(self, value: str, key: str = "solver.device") -> str:
        """``value`` normalised if it names a device (``cpu``, ``cuda``, ``cuda:N``, ``auto``), else a ConfigError."""
        d = str(value).strip().lower()
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", d):
            raise self.error(key, f"unknown device {value!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'")
        return d

    def torch_device(self) -> "torch.device":
        """The device of ``solver.device``; ``auto`` is CUDA where a GPU is visible, else the CPU.

        Raises:
            ConfigError: CUDA asked for but not available here (names the torch build).
        """
        import torch

        d = self.solver.device
        if d == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(d)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
                raise self.error(
                    "solver.device",
                    f"{d!r} but no CUDA GPU is visible (torch {torch.__version__}, {build}); "
                    f"use 'cpu' or 'auto', or --device cpu on the command line",
                )
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise self.error("solver.device", f"{d!r} but only {torch.cuda.device_count()} GPU(s) are visible")
        return dev

    def dataset(self):
        """The data set (loaded and checked once, then cached)."""
        if self._dataset is None:
            self._dataset = load_dataset(self)
        return self._dataset


# ---------------------------------------------------------------- type checking
_SECTIONS = {
    "run": RunConfig,
    "data": DataConfig,
    "periods": PeriodsConfig,
    "model": ModelConfig,
    "solver": SolverConfig,
    "calibration": CalibrationConfig,
    "training": TrainingConfig,
    "regional": RegionalConfig,
}

# kinds: str, int, float, bool, date, path, str_list, int_list, str_map, str_list_map, float_map
_KINDS: dict[str, dict[str, str]] = {
    "run": {"name": "str", "seed": "int", "output_dir": "path"},
    "data": {
        "source": "str", "path": "path", "catchment": "str", "basins": "str_list",
        "variables": "str_list", "observed": "str", "date_column": "str", "rename": "str_map",
        "attribute_files": "path_list", "id_column": "str", "forcing_source": "str",
    },
    "periods": {k.name: "date" for k in fields(PeriodsConfig)},
    "model": {
        "name": "str", "snow": "bool", "smoothing": "float", "hidden": "int_list",
        "neural_fluxes": "str_list", "inputs": "str_list_map", "n_reservoirs": "int",
        "parameters": "float_map",
    },
    "solver": {"method": "str", "rtol": "float", "atol": "float", "sensitivity": "str",
               "parallel_forward": "bool", "compile": "bool_auto", "dtype": "str", "device": "str"},
    "calibration": {
        "optimizer": "str", "iterations": "int", "lr": "float", "n_starts": "int", "loss": "str",
        "popsize": "int", "target_loss": "float",
    },
    "training": {
        "epochs": "int", "lr": "float", "lr_schedule": "str", "patience": "int", "loss": "str",
        "pretrain_epochs": "int", "pretrain_lr": "float", "train_parameters": "bool",
        "grad_clip": "float",
    },
    "regional": {
        "attributes": "str_list", "hidden": "int_list", "epochs": "int", "lr": "float",
        "lr_schedule": "str", "patience": "int", "loss": "str", "batch_basins": "int",
        "window": "int", "warmup": "int", "grad_clip": "float", "val_every": "int", "cv_folds": "int",
        "dynamic_parameters": "str_list", "dynamic_inputs": "str_list", "dynamic_lookback": "int",
    },
}

_KIND_TEXT = {
    "str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
    "bool_auto": 'true, false or "auto"',
    "date": "a date 'YYYY-MM-DD'", "path": "a path (string)", "path_list": "a path or a list of paths",
    "str_list": "a list of strings",
    "int_list": "a list of integers", "str_map": "a table of strings",
    "str_list_map": "a table of lists of strings", "float_map": "a table of numbers",
}


def _type_name(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, (_dt.date, _dt.datetime, _dt.time)):
        return "a date/time"
    return type(v).__name__


def _show(v: Any) -> str:
    if isinstance(v, (_dt.date, _dt.datetime)):
        return str(v)
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _did_you_mean(word: str, options: list[str] | tuple[str, ...], limit: int | None = None) -> str:
    """``"; did you mean 'x'?"``, else the known options (at most ``limit`` of them: a data set
    may have thousands of basins or hundreds of attribute columns)."""
    scored = [(difflib.SequenceMatcher(None, word, o).ratio(), -i, o) for i, o in enumerate(options)]
    best = max(scored, default=None)
    close = [best[2]] if best is not None and best[0] >= 0.6 else []
    if not close:
        close = [o for o in options if o.lower() == word.lower()]
    if close:
        return f"; did you mean {close[0]!r}?"
    if limit is not None and len(options) > limit:
        return f"; known: {', '.join(list(options)[:limit])} ... ({len(options)} in all)"
    return f"; known: {', '.join(options)}"


def _parse_date(value: Any) -> np.datetime64 | None:
    if isinstance(value, _dt.datetime):
        return None  # a date-time: reject, a day is wanted
    if isinstance(value, _dt.date):
        return np.datetime64(value.isoformat(), "D")
    if isinstance(value, str):
        import re

        m = re.fullmatch(r"\s*(\d{4})-(\d{2})-(\d{2})\s*", value)
        if m is None:
            return None
        try:
            _dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
        except ValueError:
            return None
        return np.datetime64(value.strip(), "D")
    return None


def _coerce(where: str, key: str, kind: str, v: Any, base: Path) -> Any:
    """Check the TOML value ``v`` of ``key`` against ``kind``; return the typed value."""
    def bad(extra: str = "") -> ConfigError:
        return ConfigError(f"{where}: {key}: expected {_KIND_TEXT[kind]}, got {_type_name(v)} {_show(v)}{extra}")

    if kind == "str":
        if not isinstance(v, str):
            raise bad()
        if not v.strip():
            raise ConfigError(f"{where}: {key}: must not be empty")
        return v
    if kind == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad()
        return int(v)
    if kind == "float":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad()
        if not math.isfinite(float(v)):
            raise ConfigError(f"{where}: {key}: must be a finite number, got {v}")
        return float(v)
    if kind == "bool":
        if not isinstance(v, bool):
            raise bad()
        return v
    if kind == "bool_auto":
        if not (isinstance(v, bool) or v == "auto"):
            raise bad()
        return v
    if kind == "date":
        d = _parse_date(v)
        if d is None:
            if isinstance(v, str):
                raise ConfigError(f"{where}: {key}: {v!r} is not a valid date of the form YYYY-MM-DD")
            raise bad()
        return d
    if kind == "path":
        if not isinstance(v, str) or not v.strip():
            raise bad()
        p = Path(v).expanduser()
        return p if p.is_absolute() else (base / p)
    if kind == "path_list":  # one path or a list of them
        items = v if isinstance(v, list) else [v]
        if not items:
            raise ConfigError(f"{where}: {key}: is empty; give a path or leave it out")
        if not all(isinstance(x, str) and x.strip() for x in items):
            raise bad()
        return [_coerce(where, key, "path", x, base) for x in items]
    if kind in ("str_list", "int_list"):
        if not isinstance(v, list):
            raise bad()
        want = str if kind == "str_list" else int
        for i, x in enumerate(v):
            if isinstance(x, bool) or not isinstance(x, want):
                raise ConfigError(
                    f"{where}: {key}[{i}]: expected {'a string' if want is str else 'an integer'}, "
                    f"got {_type_name(x)} {_show(x)}"
                )
        if kind == "str_list" and len(set(v)) != len(v):
            dup = sorted({str(x) for x in v if v.count(x) > 1})
            raise ConfigError(f"{where}: {key}: repeated entries {dup}")
        return list(v)
    if kind in ("str_map", "float_map", "str_list_map"):
        if not isinstance(v, dict):
            raise bad()
        out = {}
        for k, x in v.items():
            sub = f"{key}.{k}"
            if kind == "str_map":
                out[k] = _coerce(where, sub, "str", x, base)
            elif kind == "float_map":
                out[k] = _coerce(where, sub, "float", x, base)
            else:
                out[k] = _coerce(where, sub, "str_list", x, base)
        return out
    raise AssertionError(kind)


# -------------------------------------------------------------------- parsing
def load_config(path: str | Path, *, check_data: bool = True) -> Config:
    """Read and validate a TOML configuration.

    Args:
        path: the ``.toml`` file; relative paths inside it are relative to its folder.
        check_data: also load the data and check dates, variables and observations
            against them (the data set is then cached: :meth:`Config.dataset`).

    Raises:
        ConfigError: one line naming the file, the key and the problem.
        FileNotFoundError: the configuration file does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: configuration file not found")
    if path.is_dir():
        cand = path / "config.toml"
        if cand.is_file():
            path = cand
        else:
            raise ConfigError(f"{path}: is a folder, not a configuration file (no config.toml in it)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    return parse_config(text, path=path, check_data=check_data)


def parse_config(
    text: str,
    *,
    path: str | Path | None = None,
    base_dir: str | Path | None = None,
    check_data: bool = True,
) -> Config:
    """Validate configuration ``text`` (TOML).

    ``path`` names the file in messages; relative paths in the configuration start
    from ``base_dir`` (default: the folder of ``path``, else the working directory).
    """
    where = str(path) if path is not None else "config"
    if base_dir is not None:
        base = Path(base_dir).resolve()
    else:
        base = Path(path).resolve().parent if path is not None else Path.cwd()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e).splitlines()[0] if str(e) else "invalid TOML"
        raise ConfigError(f"{where}: not valid TOML: {msg}") from None
    cfg = Config(path=Path(path) if path is not None else None, text=text)
    for sec, value in raw.items():
        if sec not in _SECTIONS:
            raise ConfigError(f"{where}: [{sec}]: unknown section{_did_you_mean(sec, list(_SECTIONS))}")
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {sec}: expected a section [{sec}], got {_type_name(value)} {_show(value)}")
        obj = getattr(cfg, sec)
        if obj is None:  # [regional]
            obj = _SECTIONS[sec]()
            setattr(cfg, sec, obj)
        kinds = _KINDS[sec]
        for key, v in value.items():
            if key not in kinds:
                raise ConfigError(f"{where}: {sec}.{key}: unknown key{_did_you_mean(key, list(kinds))}")
            setattr(obj, key, _coerce(where, f"{sec}.{key}", kinds[key], v, base))
    if cfg.run.output_dir == Path("runs"):
        cfg.run.output_dir = base / "runs"
    if cfg.regional is not None:
        for sec in ("calibration", "training"):
            if sec in raw:
                raise ConfigError(f"{where}: [{sec}]: not used in a regional run ([regional] is set); "
                                  f"put the training settings in [regional]")
    _check_static(cfg)
    if check_data:
        cfg.dataset()
    return cfg


# ------------------------------------------------------------ static checks
def _one_of(cfg: Config, key: str, value: str, options: tuple[str, ...] | list[str]) -> None:
    if value not in options:
        raise cfg.error(key, f"unknown value {value!r}{_did_you_mean(value, list(options))}")


def _positive(cfg: Config, key: str, value: float | int, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise cfg.error(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _torchdiffeq_methods() -> list[str]:
    try:
        import torchdiffeq  # noqa: F401

        mod = sys.modules["torchdiffeq._impl.odeint"]
        return sorted(k for k in mod.SOLVERS if not k.startswith("_") and k != "scipy_solver")
    except Exception:  # pragma: no cover - torchdiffeq is a dependency
        return []


def _check_static(cfg: Config) -> None:
    import re

    from .solve import NATIVE_METHODS
    from .metrics import LOSSES

    r, d, p, m, s, c, t = cfg.run, cfg.data, cfg.periods, cfg.model, cfg.solver, cfg.calibration, cfg.training
    # [run]
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", r.name):
        raise cfg.error("run.name", f"{r.name!r} may only contain letters, digits and . _ + - (it names folders)")
    if r.seed < 0:
        raise cfg.error("run.seed", f"must be >= 0, got {r.seed}")
    if r.output_dir.exists() and not r.output_dir.is_dir():
        raise cfg.error("run.output_dir", f"{r.output_dir} exists and is not a folder")

    # [data]
    _one_of(cfg, "data.source", d.source, SOURCES)
    needs_path = d.source != "leaf_river"
    if needs_path and d.path is None:
        kind = {"csv": "CSV file", "hdf5": "HDF5 file",
                "csv_folder": "folder of per-basin <basin>.csv files"}.get(d.source, "folder")
        raise cfg.error("data.path", f"required for source = {d.source!r} (the {kind})")
    if not needs_path and d.path is not None:
        raise cfg.error("data.path", "not used with source = 'leaf_river' (embedded data); remove it")
    if d.path is not None:
        if not d.path.exists():
            raise cfg.error("data.path", f"file or folder not found: {d.path}")
        want_dir = d.source in ("holmes", "exphydro_sample", "camels_us", "csv_folder")
        if want_dir and not d.path.is_dir():
            raise cfg.error("data.path", f"source = {d.source!r} needs a folder, {d.path} is a file")
        if not want_dir and not d.path.is_file():
            raise cfg.error("data.path", f"source = {d.source!r} needs a file, {d.path} is a folder")
    if d.source == "holmes" and d.catchment is None:
        found = sorted(x.name[: -len("_Observations.csv")] for x in d.path.glob("*_Observations.csv"))
        raise cfg.error("data.catchment", f"required for source = 'holmes'; catchments in {d.path}: {found}")
    if d.source == "holmes" and not (d.path / f"{d.catchment}_Observations.csv").is_file():
        found = sorted(x.name[: -len("_Observations.csv")] for x in d.path.glob("*_Observations.csv"))
        raise cfg.error("data.catchment", f"no catchment {d.catchment!r} in {d.path}{_did_you_mean(d.catchment, found)}")
    if d.source != "holmes" and d.catchment is not None:
        raise cfg.error("data.catchment", f"only used with source = 'holmes', not {d.source!r}")
    if d.basins is not None and d.source not in ("camels_us", "hdf5", "csv_folder"):
        raise cfg.error("data.basins", f"only used with source = 'camels_us', 'hdf5' or 'csv_folder', "
                        f"not {d.source!r}")
    if d.basins is not None and not d.basins:
        raise cfg.error("data.basins", "is empty; leave it out to use every basin")
    if d.source not in CSV_SOURCES:
        for key, default in (("date_column", None), ("rename", {})):
            if getattr(d, key) != default:
                raise cfg.error(f"data.{key}", f"only used with source = 'csv' or 'csv_folder', not {d.source!r}")
    if d.source != "csv_folder":
        for key, default in (("attribute_files", None), ("id_column", "gauge_id")):
            if getattr(d, key) != default:
                raise cfg.error(f"data.{key}", f"only used with source = 'csv_folder', not {d.source!r}")
    for i, a in enumerate(d.attribute_files or []):
        if not a.exists():
            raise cfg.error(f"data.attribute_files[{i}]" if len(d.attribute_files) > 1 else "data.attribute_files",
                            f"file or folder not found: {a}")
    if d.forcing_source != "daymet" and d.source != "camels_us":
        raise cfg.error("data.forcing_source", f"only used with source = 'camels_us', not {d.source!r}")
    if d.variables is not None and not d.variables:
        raise cfg.error("data.variables", "is empty; list the forcing variables or leave it out")

    # [periods]
    if p.train_start is None and p.train_end is not None:
        raise cfg.error("periods.train_start", "missing (periods.train_end is set)")
    for name in PERIODS:
        st, en = getattr(p, f"{name}_start"), getattr(p, f"{name}_end")
        if (st is None) != (en is None):
            missing = f"{name}_end" if en is None else f"{name}_start"
            given = f"{name}_start" if en is None else f"{name}_end"
            raise cfg.error(f"periods.{missing}", f"missing (periods.{given} is set)")
        if st is not None and en < st:
            raise cfg.error(f"periods.{name}_end", f"{en} is before periods.{name}_start {st}: empty period")
    if p.warmup_start is not None:
        if p.train_start is None:
            raise cfg.error("periods.warmup_start", "needs periods.train_start (the warm-up ends where training starts)")
        if p.warmup_start > p.train_start:
            raise cfg.error("periods.warmup_start", f"{p.warmup_start} is after periods.train_start {p.train_start}")
    if p.train_start is None and (p.validation_start is not None):
        raise cfg.error("periods.validation_start", "a validation period needs a training period (periods.train_start/train_end)")

    # [model]
    _one_of(cfg, "model.name", m.name, MODELS)
    if m.name == "exphydro_m100" and m.snow is False:
        raise cfg.error("model.snow", "exphydro_m100 always has the snow store; remove snow = false")
    if m.name == "reservoir_cascade" and m.snow is not None:
        raise cfg.error("model.snow", "reservoir_cascade has no snow store; remove it")
    if m.name != "reservoir_cascade" and m.n_reservoirs != 3:
        raise cfg.error("model.n_reservoirs", f"only used with name = 'reservoir_cascade', not {m.name!r}")
    if m.n_reservoirs < 1:
        raise cfg.error("model.n_reservoirs", f"must be >= 1, got {m.n_reservoirs}")
    _positive(cfg, "model.smoothing", m.smoothing, allow_zero=True)
    if m.hidden is not None:
        if not m.hidden:
            raise cfg.error("model.hidden", "needs at least one hidden layer width, e.g. [16, 16]")
        for i, w in enumerate(m.hidden):
            if w < 1:
                raise cfg.error(f"model.hidden[{i}]", f"layer width must be >= 1, got {w}")
    physics = build_physics_model(m)
    if m.name in _BUILTIN_NEURAL and m.neural_fluxes is not None:
        if sorted(m.neural_fluxes) != sorted(_BUILTIN_NEURAL[m.name]):
            raise cfg.error(
                "model.neural_fluxes",
                f"{m.name} replaces {list(_BUILTIN_NEURAL[m.name])}; to choose other fluxes use "
                f"name = 'exphydro' with neural_fluxes = [...]",
            )
    for i, fl in enumerate(m.neural_fluxes or []):
        if fl not in physics.flux_names:
            raise cfg.error(
                f"model.neural_fluxes[{i}]",
                f"model {physics.name!r} has no flux {fl!r}{_did_you_mean(fl, list(physics.flux_names))} "
                f"(fluxes: {', '.join(physics.flux_names)})",
            )
    if m.neural_fluxes is not None and not m.neural_fluxes:
        raise cfg.error("model.neural_fluxes", "is empty; leave it out for the physics-only model")
    if m.inputs:
        if m.name in _BUILTIN_NEURAL:
            raise cfg.error("model.inputs", f"the networks of {m.name} have fixed inputs; use name = 'exphydro' to choose")
        known = list(physics.store_names) + list(physics.forcing_names)
        for fl, ins in m.inputs.items():
            if fl not in m.network_fluxes:
                raise cfg.error(
                    f"model.inputs.{fl}",
                    f"{fl!r} is not one of model.neural_fluxes {list(m.network_fluxes)}",
                )
            if not ins:
                raise cfg.error(f"model.inputs.{fl}", "a network needs at least one input")
            for j, x in enumerate(ins):
                if x not in known:
                    raise cfg.error(f"model.inputs.{fl}[{j}]", f"unknown input {x!r}{_did_you_mean(x, known)} (stores and forcing: {', '.join(known)})")
    if m.hidden is not None and not m.is_hybrid:
        raise cfg.error("model.hidden", f"{m.name} has no networks; set model.neural_fluxes or leave hidden out")
    for k, v in m.parameters.items():
        if k not in physics.parameter_names:
            raise cfg.error(
                f"model.parameters.{k}",
                f"model {physics.name!r} has no parameter {k!r}{_did_you_mean(k, list(physics.parameter_names))}",
            )
        spec = physics.parameters_spec[physics.parameter_names.index(k)]
        if not spec.low <= v <= spec.high:
            raise cfg.error(f"model.parameters.{k}", f"{v} is outside its bounds [{spec.low}, {spec.high}] {spec.units}")

    # [solver]
    methods = list(NATIVE_METHODS) + [x for x in _torchdiffeq_methods() if x not in NATIVE_METHODS]
    _one_of(cfg, "solver.method", s.method, methods)
    sens = s.sensitivity.lower().replace("-", "_")
    aliases = {"checkpointed": "checkpoint", "checkpointed_adjoint": "checkpoint", "backprop": "direct"}
    sens = aliases.get(sens, sens)
    _one_of(cfg, "solver.sensitivity", sens, SENSITIVITIES)
    s.sensitivity = sens
    if sens == "checkpoint" and s.method not in NATIVE_METHODS:
        raise cfg.error(
            "solver.sensitivity",
            f"'checkpoint' needs a native method ({', '.join(NATIVE_METHODS)}); "
            f"use 'adjoint' or 'direct' with solver.method = {s.method!r}",
        )
    if s.parallel_forward and sens != "checkpoint":
        raise cfg.error("solver.parallel_forward", f"only used with sensitivity = 'checkpoint', not {sens!r}")
    if s.compile is True and sens != "checkpoint":
        raise cfg.error("solver.compile", f"only used with sensitivity = 'checkpoint', not {sens!r}")
    _positive(cfg, "solver.rtol", s.rtol)
    _positive(cfg, "solver.atol", s.atol)
    s.dtype = {"double": "float64", "float": "float32", "single": "float32"}.get(s.dtype.lower(), s.dtype.lower())
    _one_of(cfg, "solver.dtype", s.dtype, ("float64", "float32"))
    s.device = cfg.checked_device(s.device)

    # [calibration] / [training]
    losses = list(LOSSES)
    _one_of(cfg, "calibration.optimizer", c.optimizer, OPTIMIZERS)
    _one_of(cfg, "calibration.loss", c.loss, losses)
    _positive(cfg, "calibration.iterations", c.iterations, allow_zero=True)
    if c.lr is not None:
        _positive(cfg, "calibration.lr", c.lr)
    _positive(cfg, "calibration.n_starts", c.n_starts)
    if c.popsize < 4:
        raise cfg.error("calibration.popsize", f"must be >= 4, got {c.popsize}")
    _one_of(cfg, "training.loss", t.loss, losses)
    _one_of(cfg, "training.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    _positive(cfg, "training.epochs", t.epochs, allow_zero=True)
    _positive(cfg, "training.lr", t.lr)
    _positive(cfg, "training.patience", t.patience)
    _positive(cfg, "training.pretrain_epochs", t.pretrain_epochs, allow_zero=True)
    _positive(cfg, "training.pretrain_lr", t.pretrain_lr)
    _positive(cfg, "training.grad_clip", t.grad_clip)
    if cfg.regional is not None:
        _check_regional(cfg)


def _check_regional(cfg: Config) -> None:
    from .regional import REGIONAL_LOSSES

    g, m, d = cfg.regional, cfg.model, cfg.data
    if cfg.solver.device not in ("cpu", "auto"):
        raise cfg.error("solver.device", f"{cfg.solver.device!r}: a regional run ([regional]) runs on the CPU in "
                                         f"this version; remove solver.device (it applies to runs without [regional])")
    if g.attributes is None:
        raise cfg.error("regional.attributes", "required: the static attributes the parameter network reads, "
                        "e.g. attributes = [\"p_mean\", \"aridity\"]")
    if not g.attributes:
        raise cfg.error("regional.attributes", "is empty; list at least one attribute")
    if m.name not in REGIONAL_MODELS:
        raise cfg.error("model.name", f"a regional run trains {' or '.join(repr(x) for x in REGIONAL_MODELS)}, "
                        f"not {m.name!r}")
    if m.neural_fluxes is not None and m.name == "exphydro":
        raise cfg.error("model.neural_fluxes", "not used in a regional run; use name = 'exphydro_m50' for the "
                        "regional hybrid")
    if m.parameters:
        raise cfg.error("model.parameters", "not used in a regional run (the parameters come from the attributes)")
    if d.source in ("leaf_river", "holmes", "exphydro_sample", "csv"):
        raise cfg.error("data.source", f"a regional run needs many basins with attributes: source = 'camels_us', "
                        f"'hdf5' or 'csv_folder', not {d.source!r}")
    if d.source == "csv_folder" and d.attribute_files is None:
        raise cfg.error("data.attribute_files", "required for a regional run with source = 'csv_folder': the "
                        "attribute table(s) (a .csv file, a folder of them or a list), e.g. "
                        "attribute_files = \"Caravan/attributes/camels\"")
    if not g.hidden:
        raise cfg.error("regional.hidden", "needs at least one hidden layer width, e.g. [32, 32]")
    for i, w in enumerate(g.hidden):
        if w < 1:
            raise cfg.error(f"regional.hidden[{i}]", f"layer width must be >= 1, got {w}")
    _one_of(cfg, "regional.loss", g.loss, list(REGIONAL_LOSSES))
    _one_of(cfg, "regional.lr_schedule", g.lr_schedule, ("cosine", "constant"))
    for key in ("epochs", "batch_basins", "patience", "val_every"):
        _positive(cfg, f"regional.{key}", getattr(g, key))
    _positive(cfg, "regional.lr", g.lr)
    _positive(cfg, "regional.grad_clip", g.grad_clip)
    _positive(cfg, "regional.warmup", g.warmup, allow_zero=True)
    _positive(cfg, "regional.window", g.window, allow_zero=True)
    if g.window == 1:
        raise cfg.error("regional.window", "must be at least 2 days (or 0: the whole training period)")
    if g.cv_folds < 0 or g.cv_folds == 1:
        raise cfg.error("regional.cv_folds", f"must be 0 (off) or at least 2 folds, got {g.cv_folds}")
    # time-varying parameters (dPL after Feng et al. 2022; adjointhydro.regional.AttributeParameters)
    pnames = list(build_physics_model(m).parameter_names)
    for i, n in enumerate(g.dynamic_parameters):
        if n not in pnames:
            raise cfg.error(f"regional.dynamic_parameters[{i}]", f"{n!r} is not a parameter of the model"
                            f"{_did_you_mean(n, pnames)} (parameters: {', '.join(pnames)})")
    if len(set(g.dynamic_parameters)) != len(g.dynamic_parameters):
        raise cfg.error("regional.dynamic_parameters", f"names a parameter twice: {g.dynamic_parameters}")
    if g.dynamic_lookback < 1:
        raise cfg.error("regional.dynamic_lookback", f"days of the trailing forcing means, must be >= 1, "
                        f"got {g.dynamic_lookback}")
    if g.dynamic_inputs is not None and not g.dynamic_parameters:
        raise cfg.error("regional.dynamic_inputs", "only used with regional.dynamic_parameters")
    if g.dynamic_inputs is not None and not g.dynamic_inputs:
        raise cfg.error("regional.dynamic_inputs", "is empty; list forcing variables, e.g. [\"P\", \"T\"], "
                        "or leave it out (the model's forcing)")


def build_physics_model(m: ModelConfig):
    """The physics-only model M0 of a model section."""
    from .models import exphydro, reservoir_cascade

    smoothing = None if m.smoothing == 0 else m.smoothing
    if m.name == "reservoir_cascade":
        return reservoir_cascade(m.n_reservoirs, smoothing=smoothing)
    return exphydro(snow=m.use_snow, smoothing=smoothing)


# -------------------------------------------------------------------- the data
def _read_source(cfg: Config):
    from .data import (load_camels_us, load_exphydro_sample, load_holmes, load_leaf_river, read_csv,
                       read_hdf5)

    d = cfg.data
    if d.source == "leaf_river":
        return load_leaf_river()
    if d.source == "holmes":
        return load_holmes(d.path, d.catchment)
    if d.source == "exphydro_sample":
        return load_exphydro_sample(d.path)
    if d.source == "hdf5":
        return read_hdf5(d.path)
    if d.source == "camels_us":
        return load_camels_us(d.path, d.basins, d.forcing_source)
    # csv, csv_folder: the columns to read are raw names; rename maps them to variable names
    physics = build_physics_model(cfg.model)
    inverse = {v: k for k, v in d.rename.items()}
    variables = d.variables or [inverse.get(n, n) for n in physics.forcing_names]
    if d.source == "csv":
        _check_columns(cfg, d.path, variables)
        return read_csv(d.path, date_column=d.date_column_name, forcing=variables, observations=[d.observed],
                        rename=d.rename)
    return _read_csv_folder(cfg, variables)


def _csv_header(path: Path) -> list[str]:
    """The column names of a CSV file (its first non-blank line), without reading the rest.

    Raises:
        DataError: the file is empty.
    """
    import csv

    from .data import DataError

    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        for cells in csv.reader(fh):
            if cells and any(c.strip() for c in cells):
                return [c.strip().lstrip("\ufeff") for c in cells]
    raise DataError(f"{path}: empty file (no header line)")


def _check_columns(cfg: Config, path: Path, variables: list[str]) -> None:
    """The configured columns are in the CSV file ``path`` (else a ConfigError naming the key)."""
    d = cfg.data
    header = _csv_header(path)
    for key, cols in (("data.date_column", [d.date_column_name]), ("data.variables", variables),
                      ("data.observed", [d.observed])):
        for col in cols:
            if col not in header:
                raise cfg.error(key, f"column {col!r} is not in {path.name}{_did_you_mean(col, header)} (columns: {', '.join(header)})")
    for k in d.rename:
        if k not in header:
            raise cfg.error(f"data.rename.{k}", f"column {k!r} is not in {path.name}{_did_you_mean(k, header)}")


def _attribute_tables(cfg: Config) -> list[Path]:
    """The attribute tables of data.attribute_files (folders searched recursively for *.csv)."""
    d = cfg.data
    tables: list[Path] = []
    for i, a in enumerate(d.attribute_files or []):
        key = f"data.attribute_files[{i}]" if len(d.attribute_files) > 1 else "data.attribute_files"
        found = sorted(a.rglob("*.csv")) if a.is_dir() else [a]
        if not found:
            raise cfg.error(key, f"no attribute tables (*.csv) in the folder {a}")
        for t in found:
            header = _csv_header(t)
            if d.id_column not in header:
                raise cfg.error("data.id_column", f"{d.id_column!r} is not a column of the attribute table {t}"
                                f"{_did_you_mean(d.id_column, header, limit=12)}")
        tables += [t for t in found if t not in tables]
    return tables


def _read_csv_folder(cfg: Config, variables: list[str]):
    """source = 'csv_folder': per-basin <basin>.csv files plus attribute tables (Caravan layout)."""
    import warnings

    from .data import DataWarning, load_csv_folder

    d = cfg.data
    files = {p.stem: p for p in sorted(d.path.glob("*.csv"))}
    if not files:
        raise cfg.error("data.path", f"no per-basin files <basin>.csv in the folder {d.path}")
    if d.basins is not None:
        for i, b in enumerate(d.basins):
            if b not in files:
                raise cfg.error(f"data.basins[{i}]", f"no file {b}.csv in {d.path}{_did_you_mean(b, list(files), limit=12)}")
    first = files[d.basins[0]] if d.basins else next(iter(files.values()))
    _check_columns(cfg, first, variables)  # the other files are checked while reading (DataError names them)
    tables = _attribute_tables(cfg)
    with warnings.catch_warnings():
        # NaN in attributes the run does not use is no problem; load_dataset rejects NaN in
        # the attributes a regional run reads, naming regional.attributes
        warnings.filterwarnings("ignore", message=".*NaN attribute values kept as NaN", category=DataWarning)
        return load_csv_folder(d.path, tables or None, basins=d.basins, date_column=d.date_column_name,
                               forcing=variables, observations=[d.observed], rename=d.rename,
                               id_column=d.id_column)


def observed_name(cfg: Config) -> str:
    """Name of the observed discharge variable in the data set."""
    if cfg.data.source in CSV_SOURCES:
        return cfg.data.rename.get(cfg.data.observed, cfg.data.observed)
    return cfg.data.observed


def forcing_names(cfg: Config) -> list[str]:
    """The forcing variables the model reads (in its order)."""
    return list(build_physics_model(cfg.model).forcing_names)


def load_dataset(cfg: Config):
    """Load the data of ``cfg`` and check the configuration against them.

    Raises:
        ConfigError: dates outside the data, forcing the model needs but the data lack,
            no observed discharge in a scored period, unknown basins.
        DataError: the files cannot be read.
    """
    ds = _read_source(cfg)
    d, p = cfg.data, cfg.periods
    if d.basins is not None and d.source == "hdf5":
        missing = [b for b in d.basins if b not in ds.basins]
        if missing:
            raise cfg.error("data.basins", f"basin(s) {missing} not in {ds.source}; available: {ds.basins[:20]}")
        ds = ds.select_basins(d.basins)
    if cfg.regional is not None:
        have = list(ds.attribute_names)
        for i, a in enumerate(cfg.regional.attributes):
            if a not in have:
                raise cfg.error(f"regional.attributes[{i}]", f"{a!r} is not an attribute of the data"
                                f"{_did_you_mean(a, have)} ({len(have)} attributes: {', '.join(have[:12])}"
                                f"{' ...' if len(have) > 12 else ''})")
            bad = [b for b, v in zip(ds.basins, ds.attribute(a)) if not np.isfinite(v)]
            if bad:
                raise cfg.error(f"regional.attributes[{i}]", f"{a!r} is missing (NaN) for basin(s) {bad[:5]}; "
                                f"leave it out or fill it")
        for i, v in enumerate(cfg.regional.dynamic_inputs or []):
            if v not in ds.forcing_names:
                have = list(ds.forcing_names)
                raise cfg.error(f"regional.dynamic_inputs[{i}]", f"{v!r} is not a forcing variable of the data"
                                f"{_did_you_mean(v, have)} (forcing: {', '.join(have)})")
        k = cfg.regional.cv_folds
        if k > len(ds.basins):
            raise cfg.error("regional.cv_folds", f"{k} folds need at least {k} basins; the data have "
                            f"{len(ds.basins)}")
    # forcing
    physics = build_physics_model(cfg.model)
    names = list(ds.forcing_names)
    if d.variables is not None and d.source not in CSV_SOURCES:
        for i, v in enumerate(d.variables):
            if v not in names:
                raise cfg.error(f"data.variables[{i}]", f"{v!r} is not in the data{_did_you_mean(v, names)} (forcing: {', '.join(names)})")
    avail = names if d.variables is None or d.source in CSV_SOURCES else list(d.variables)
    for v in physics.forcing_names:
        if v not in avail:
            key = "model.snow" if (v == "T" and cfg.model.name != "reservoir_cascade") else "data.variables"
            raise cfg.error(
                key,
                f"model {physics.name!r} needs forcing {v!r}, which the data ({ds.source}) do not "
                f"{'have' if v not in names else 'select'} (forcing: {', '.join(names)})"
                + ("; use model.snow = false" if key == "model.snow" else ""),
            )
    obs = observed_name(cfg)
    if obs not in ds.observation_names:
        raise cfg.error("data.observed", f"{obs!r} is not an observed variable of the data{_did_you_mean(obs, ds.observation_names)} (observed: {', '.join(ds.observation_names)})")
    # dates
    first, last = ds.dates[0], ds.dates[-1]
    for f in fields(PeriodsConfig):
        v = getattr(p, f.name)
        if v is not None and not first <= v <= last:
            raise cfg.error(
                f"periods.{f.name}",
                f"{v} is outside the data ({ds.source} covers {first}..{last})",
            )
    q = ds.observed(obs)
    for name, (s, e) in p.defined().items():
        i = int((s - first).astype(np.int64))
        j = int((e - first).astype(np.int64)) + 1
        if not np.isfinite(q[:, i:j]).any():
            raise cfg.error(f"periods.{name}_start", f"no observed {obs!r} in the {name} period {s}..{e}")
        if (np.isfinite(q[:, i:j]).sum(axis=1) < 2).any():
            b = int(np.argmin(np.isfinite(q[:, i:j]).sum(axis=1)))
            raise cfg.error(f"periods.{name}_start",
                            f"fewer than 2 observed {obs!r} values for basin {ds.basins[b]!r} in the {name} period {s}..{e}")
    return ds
