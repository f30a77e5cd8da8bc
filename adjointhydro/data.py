"""Basin data sets: daily forcing, observations and static attributes for many basins.

:class:`BasinDataset` is the in-memory form: regular daily dates, forcing
``[basin, time, variable]``, observations ``[basin, time, obs_variable]`` (NaN =
missing) and attributes ``[basin, attribute]``. :meth:`BasinDataset.to_forcing` turns
it into the solver's :class:`~adjointhydro.forcing.Forcing`.

Readers
-------
* :func:`read_hdf5` / :func:`write_hdf5` -- the library's own file format (below).
* :func:`read_csv` -- one basin, a date column plus variable columns.
* :func:`load_leaf_river` -- the vendored Leaf River data (no download needed).
* :func:`load_holmes` -- HOLMES ``<catchment>_Observations.csv`` (+ ``_CemaNeigeInfo.csv``).
* :func:`load_exphydro_sample` -- the EXP-HYDRO sample catchment (``P_test.txt`` ...).
* :func:`load_camels_us` -- the original CAMELS-US folder layout; :func:`camels_to_hdf5`.
* :func:`load_csv_folder` -- a folder of ``<basin>.csv`` plus attribute tables (Caravan).

Potential evapotranspiration for basins without it: :func:`hamon_pet`, :func:`oudin_pet`.

Conventions
-----------
Rates (precipitation ``P``, potential evapotranspiration ``PET``, streamflow ``Q``) are
in mm/day; air temperature ``T`` in degC. Attributes named ``latitude`` are in degrees
north, ``elevation`` in metres above sea level and ``area`` in km^2.

HDF5 layout (version 1)
-----------------------
One file holds one :class:`BasinDataset`::

    /                      attrs: format = "adjointhydro-basins", version = 1,
                                  source = original source (informative only)
    /dates        int64    [time]                    days since 1970-01-01, regular daily
    /basins       utf-8    [basin]                   basin identifiers (unique)
    /forcing      float64  [basin, time, variable]   attrs: names, units (utf-8 string arrays)
    /observations float64  [basin, time, obs]        attrs: names, units; NaN = missing
    /attributes   float64  [basin, attribute]        attrs: names; may have 0 columns

All five datasets are required; a variable axis may have length 0. :func:`write_hdf5`
writes to a temporary file in the target folder and renames it over the target
(:func:`os.replace`), so readers never see a half-written file.
"""
from __future__ import annotations

import csv
import math
import os
import re
import uuid
import warnings
from dataclasses import dataclass, replace
from importlib.resources import as_file, files
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import h5py
import numpy as np
import torch

from .forcing import Forcing

__all__ = [
    "BasinDataset",
    "DataError",
    "DataWarning",
    "FORMAT",
    "VERSION",
    "LEAF_RIVER_LATITUDE",
    "write_hdf5",
    "read_hdf5",
    "read_csv",
    "load_leaf_river",
    "load_holmes",
    "load_exphydro_sample",
    "load_camels_us",
    "camels_to_hdf5",
    "load_csv_folder",
    "day_of_year",
    "daylight_hours",
    "extraterrestrial_radiation",
    "hamon_pet",
    "oudin_pet",
]

#: Root attribute ``format`` of the HDF5 layout.
FORMAT = "adjointhydro-basins"
#: Root attribute ``version`` of the HDF5 layout this module writes and reads.
VERSION = 1

#: Latitude used for the vendored Leaf River data (degrees north). The HOLMES files
#: carry no latitude for Leaf River; 31.8 N is an approximate basin value (the USGS
#: gauge Leaf River near Collins, MS, lies at about 31.7 N). Good enough for
#: temperature-based PET, not for anything that needs the true centroid.
LEAF_RIVER_LATITUDE = 31.8

_EPOCH = np.datetime64("1970-01-01", "D")
#: Cell texts read as a missing value.
_MISSING_TEXT = {"", "na", "nan", "n/a", "null", "none", "-"}
#: Units assumed by :func:`read_csv` for common variable names when none are given.
_DEFAULT_UNITS = {
    "p": "mm/day", "prcp": "mm/day", "precip": "mm/day", "precipitation": "mm/day",
    "pet": "mm/day", "e0": "mm/day", "pe": "mm/day", "ep": "mm/day",
    "q": "mm/day", "qo": "mm/day", "qobs": "mm/day",
    "t": "degC", "tmean": "degC", "tmin": "degC", "tmax": "degC",
}


class DataError(ValueError):
    """Raised when data cannot be read or used; the message names the file and the problem."""


class DataWarning(UserWarning):
    """Data were loaded but something deserves a look (e.g. NaN attributes)."""


# --------------------------------------------------------------------------- helpers
def _parse_date(text: str) -> np.datetime64:
    """Parse ``YYYY-MM-DD`` (optionally ``YYYY/MM/DD`` or followed by a midnight time).

    Raises plain :class:`ValueError`; callers add the file and line.
    """
    m = re.fullmatch(r"\s*(\d{4})[-/](\d{1,2})[-/](\d{1,2})(?:[ T]00:00(?::00(?:\.0+)?)?Z?)?\s*", text)
    if m is None:
        raise ValueError(f"not a date of the form YYYY-MM-DD: {text!r}")
    y, mo, d = (int(g) for g in m.groups())
    # np.datetime64 rejects impossible days such as 2001-02-30
    return np.datetime64(f"{y:04d}-{mo:02d}-{d:02d}", "D")


def _to_date(value: str | np.datetime64 | object, source: str, what: str) -> np.datetime64:
    """A date given as 'YYYY-MM-DD', numpy datetime64 or datetime.date, as datetime64[D]."""
    try:
        if isinstance(value, str):
            return _parse_date(value)
        return np.datetime64(value, "D")
    except (ValueError, TypeError) as e:
        raise DataError(f"{source}: cannot read {what} {value!r} as a date ({e})") from None


def _ymd_to_dates(y: np.ndarray, m: np.ndarray, d: np.ndarray, source: str) -> np.ndarray:
    """Vectorised year/month/day -> datetime64[D], rejecting impossible dates."""
    y, m, d = (np.asarray(a, dtype=np.int64) for a in (y, m, d))
    if np.any((m < 1) | (m > 12) | (d < 1) | (d > 31)):
        i = int(np.nonzero((m < 1) | (m > 12) | (d < 1) | (d > 31))[0][0])
        raise DataError(f"{source}: impossible date {y[i]}-{m[i]}-{d[i]} (row {i + 1})")
    months = (y - 1970) * 12 + (m - 1)
    dates = months.astype("datetime64[M]").astype("datetime64[D]") + (d - 1)
    # 2001-02-30 would silently become 2001-03-02: check the month survived
    bad = dates.astype("datetime64[M]").astype(np.int64) != months
    if np.any(bad):
        i = int(np.nonzero(bad)[0][0])
        raise DataError(f"{source}: impossible date {y[i]}-{m[i]:02d}-{d[i]:02d} (row {i + 1})")
    return dates


def _check_daily(dates: np.ndarray, source: str, lines: Sequence[int] | None = None) -> None:
    """Raise :class:`DataError` at the first step that is not exactly one day."""
    if len(dates) < 2:
        return
    steps = np.diff(dates).astype(np.int64)
    bad = np.nonzero(steps != 1)[0]
    if bad.size == 0:
        return
    i = int(bad[0])
    step = int(steps[i])
    if step > 1:
        what = f"a gap of {step - 1} missing day(s)"
    elif step == 0:
        what = "a repeated date"
    else:
        what = "dates going backwards"
    where = f" (lines {lines[i]}-{lines[i + 1]})" if lines is not None else ""
    raise DataError(
        f"{source}: dates are not regular daily: {dates[i]} is followed by {dates[i + 1]}{where}, "
        f"{what}; {bad.size} irregular step(s) in all. Fill missing days (NaN is allowed in "
        f"observations) or resample to daily first."
    )


def _float_or_nan(text: str) -> float:
    t = text.strip()
    if t.lower() in _MISSING_TEXT:
        return math.nan
    return float(t)


def _as_list(names: str | Iterable[str] | None) -> list[str]:
    if names is None:
        return []
    if isinstance(names, str):
        return [names]
    return [str(n) for n in names]


def day_of_year(dates: np.ndarray) -> np.ndarray:
    """Day of the year (1..366, int64) of datetime64 dates."""
    d = np.asarray(dates).astype("datetime64[D]")
    return (d - d.astype("datetime64[Y]").astype("datetime64[D]")).astype(np.int64) + 1


# --------------------------------------------------------------------- the dataset
@dataclass(eq=False, repr=False)
class BasinDataset:
    """Daily forcing, observations and attributes of one or more basins.

    Args:
        basins: basin identifiers, unique, length ``B``.
        dates: ``datetime64[D]`` array of length ``T``, regular daily (strings accepted).
        forcing: float64 ``[B, T, V]``; must be finite (models cannot run over gaps).
        forcing_names, forcing_units: one per forcing variable, e.g. ``["P", "PET"]``,
            ``["mm/day", "mm/day"]``.
        observations: float64 ``[B, T, O]``, NaN = missing (``None``: no observations).
        observation_names, observation_units: one per observed variable, e.g. ``["Q"]``.
        attributes: float64 ``[B, A]`` static attributes (``None``: no attributes);
            NaN allowed.
        attribute_names: one per attribute.
        source: where the data came from (a file name), used in every error message.

    Raises:
        DataError: on any inconsistency, naming ``source`` and the problem.
    """

    basins: list[str]
    dates: np.ndarray
    forcing: np.ndarray
    forcing_names: list[str]
    forcing_units: list[str]
    observations: np.ndarray | None = None
    observation_names: list[str] | None = None
    observation_units: list[str] | None = None
    attributes: np.ndarray | None = None
    attribute_names: list[str] | None = None
    source: str = "dataset"

    def __post_init__(self) -> None:
        src = self.source = str(self.source)
        self.basins = _as_list(self.basins)
        n_b = len(self.basins)
        if n_b == 0:
            raise DataError(f"{src}: no basins")
        if len(set(self.basins)) != n_b:
            dup = sorted({b for b in self.basins if self.basins.count(b) > 1})
            raise DataError(f"{src}: duplicate basin ids {dup}")

        dates = np.asarray(self.dates)
        if dates.dtype.kind in "US":
            try:
                dates = np.array([_parse_date(str(s)) for s in dates], dtype="datetime64[D]")
            except ValueError as e:
                raise DataError(f"{src}: {e}") from None
        try:
            dates = dates.astype("datetime64[D]")
        except (ValueError, TypeError):
            raise DataError(f"{src}: dates must be datetime64 values, got dtype {dates.dtype}") from None
        if dates.ndim != 1:
            raise DataError(f"{src}: dates must be 1-D, got shape {dates.shape}")
        if len(dates) == 0:
            raise DataError(f"{src}: no time steps (empty period)")
        if np.isnat(dates).any():
            raise DataError(f"{src}: missing date (NaT) at position {int(np.isnat(dates).argmax())}")
        _check_daily(dates, src)
        self.dates = dates
        n_t = len(dates)

        self.forcing, self.forcing_names, self.forcing_units = self._block(
            "forcing", self.forcing, self.forcing_names, self.forcing_units, n_b, n_t
        )
        bad = ~np.isfinite(self.forcing)
        if bad.any():
            b, t, j = (int(i) for i in np.argwhere(bad)[0])
            raise DataError(
                f"{src}: missing or non-finite forcing {self.forcing_names[j]!r} "
                f"({self.forcing[b, t, j]}) for basin {self.basins[b]!r} on {dates[t]}; "
                f"{int(bad.sum())} such values. Forcing must be complete: fill gaps or shorten the period."
            )
        self.observations, self.observation_names, self.observation_units = self._block(
            "observations", self.observations, self.observation_names, self.observation_units, n_b, n_t
        )
        if np.isinf(self.observations).any():
            b, t, j = (int(i) for i in np.argwhere(np.isinf(self.observations))[0])
            raise DataError(
                f"{src}: infinite observation {self.observation_names[j]!r} for basin "
                f"{self.basins[b]!r} on {dates[t]} (use NaN for missing values)"
            )

        att = np.zeros((n_b, 0)) if self.attributes is None else np.asarray(self.attributes, dtype=np.float64)
        if att.ndim == 1 and n_b == 1:
            att = att[None]
        names = _as_list(self.attribute_names)
        if att.ndim != 2 or att.shape[0] != n_b:
            raise DataError(f"{src}: attributes must have shape [basin={n_b}, attribute], got {att.shape}")
        if len(names) != att.shape[1]:
            raise DataError(f"{src}: {att.shape[1]} attribute columns but {len(names)} attribute names {names}")
        if len(set(names)) != len(names):
            raise DataError(f"{src}: duplicate attribute names {sorted({n for n in names if names.count(n) > 1})}")
        self.attributes, self.attribute_names = att, names

    def _block(
        self, what: str, values: np.ndarray | None, names: Iterable[str] | None,
        units: Iterable[str] | None, n_b: int, n_t: int,
    ) -> tuple[np.ndarray, list[str], list[str]]:
        """Validate one ``[basin, time, variable]`` block with its names and units."""
        src = self.source
        names_l = _as_list(names)
        v = np.zeros((n_b, n_t, 0)) if values is None else np.asarray(values, dtype=np.float64)
        if v.ndim == 2 and n_b == 1:  # [time, variable] of a single basin
            v = v[None]
        if v.ndim != 3:
            raise DataError(f"{src}: {what} must have shape [basin, time, variable], got {v.shape}")
        if v.shape[0] != n_b:
            raise DataError(f"{src}: {what} has {v.shape[0]} basins along axis 0 but there are {n_b} basin ids")
        if v.shape[1] != n_t:
            raise DataError(f"{src}: {what} has {v.shape[1]} time steps but there are {n_t} dates")
        if len(names_l) != v.shape[2]:
            raise DataError(f"{src}: {what} has {v.shape[2]} variables but {len(names_l)} names {names_l}")
        if len(set(names_l)) != len(names_l):
            raise DataError(f"{src}: duplicate {what} names {names_l}")
        units_l = _as_list(units) if units is not None else [""] * len(names_l)
        if len(units_l) != len(names_l):
            raise DataError(f"{src}: {len(names_l)} {what} names {names_l} but {len(units_l)} units {units_l}")
        return v, names_l, units_l

    # ------------------------------------------------------------------ basics
    @property
    def n_basins(self) -> int:
        return len(self.basins)

    @property
    def n_steps(self) -> int:
        return len(self.dates)

    def __len__(self) -> int:
        return self.n_steps

    def __repr__(self) -> str:
        return (
            f"BasinDataset(source={self.source!r}, basins={self.n_basins}, "
            f"dates={self.dates[0]}..{self.dates[-1]} ({self.n_steps} days), "
            f"forcing={self.forcing_names}, observations={self.observation_names}, "
            f"attributes={len(self.attribute_names)})"
        )

    def day_of_year(self) -> np.ndarray:
        """Day of the year (1..366) of every date, ``[time]``."""
        return day_of_year(self.dates)

    # --------------------------------------------------------------- accessors
    def _lookup(self, kind: str, names: list[str], wanted: Sequence[str]) -> list[int]:
        missing = [n for n in wanted if n not in names]
        if missing:
            raise DataError(f"{self.source}: no {kind} variable(s) {missing}; available: {names}")
        return [names.index(n) for n in wanted]

    def forcing_variable(self, name: str) -> np.ndarray:
        """One forcing variable, ``[basin, time]`` (a copy)."""
        (j,) = self._lookup("forcing", self.forcing_names, [name])
        return self.forcing[:, :, j].copy()

    def observed(self, name: str = "Q") -> np.ndarray:
        """One observed variable, ``[basin, time]`` with NaN = missing (a copy)."""
        (j,) = self._lookup("observation", self.observation_names, [name])
        return self.observations[:, :, j].copy()

    def attribute(self, name: str) -> np.ndarray:
        """One static attribute, ``[basin]`` (a copy; NaN where unknown)."""
        (j,) = self._lookup("attribute", self.attribute_names, [name])
        return self.attributes[:, j].copy()

    def to_forcing(
        self,
        variables: str | Sequence[str] | None = None,
        interpolation: str = "constant",
        dtype: torch.dtype = torch.float64,
    ) -> Forcing:
        """The solver's :class:`Forcing` for the chosen variables, in the order given.

        Args:
            variables: forcing names to keep (default: all, in stored order).
            interpolation: ``"constant"`` or ``"linear"`` (see :class:`Forcing`).
            dtype: torch dtype of the values.

        Raises:
            DataError: naming any variable that is not in the data set.
        """
        names = list(self.forcing_names) if variables is None else _as_list(variables)
        if not names:
            raise DataError(f"{self.source}: no forcing variables selected")
        idx = self._lookup("forcing", self.forcing_names, names)
        values = torch.as_tensor(np.ascontiguousarray(self.forcing[:, :, idx]), dtype=dtype)
        return Forcing(
            values, tuple(names), tuple(self.forcing_units[j] for j in idx), self.dates.copy(),
            tuple(self.basins), interpolation, self.source,
        )

    # ----------------------------------------------------------------- subsets
    def index_of(self, date: str | np.datetime64) -> int:
        """Time index of a date ('YYYY-MM-DD'); :class:`DataError` if outside the data."""
        d = _to_date(date, self.source, "date")
        k = int((d - self.dates[0]).astype(np.int64))
        if not 0 <= k < self.n_steps:
            raise DataError(
                f"{self.source}: date {d} is outside the data, which cover "
                f"{self.dates[0]}..{self.dates[-1]}"
            )
        return k

    def period(self, start: str | np.datetime64, end: str | np.datetime64) -> "BasinDataset":
        """The data from ``start`` to ``end`` inclusive ('YYYY-MM-DD').

        Raises:
            DataError: if ``end`` is before ``start`` (empty period) or the range reaches
                outside the data (the message gives the available range).
        """
        s = _to_date(start, self.source, "period start")
        e = _to_date(end, self.source, "period end")
        if e < s:
            raise DataError(f"{self.source}: empty period {s}..{e}: the end is before the start")
        if s < self.dates[0] or e > self.dates[-1]:
            raise DataError(
                f"{self.source}: period {s}..{e} is outside the data, which cover "
                f"{self.dates[0]}..{self.dates[-1]}"
            )
        i = int((s - self.dates[0]).astype(np.int64))
        j = int((e - self.dates[0]).astype(np.int64)) + 1
        return replace(
            self, dates=self.dates[i:j].copy(), forcing=self.forcing[:, i:j].copy(),
            observations=self.observations[:, i:j].copy(), attributes=self.attributes.copy(),
        )

    def select_basins(self, ids: str | Sequence[str]) -> "BasinDataset":
        """The data of the given basin ids, in the order given."""
        wanted = _as_list(ids)
        if not wanted:
            raise DataError(f"{self.source}: no basins selected")
        missing = [b for b in wanted if b not in self.basins]
        if missing:
            raise DataError(f"{self.source}: basin(s) {missing} not in the data; available: {self.basins}")
        idx = [self.basins.index(b) for b in wanted]
        return replace(
            self, basins=wanted, forcing=self.forcing[idx], observations=self.observations[idx],
            attributes=self.attributes[idx],
        )

    def with_forcing(self, name: str, values: np.ndarray, unit: str) -> "BasinDataset":
        """A copy with one forcing variable added (or replaced), e.g. a computed PET.

        Args:
            values: ``[basin, time]`` (or ``[time]`` for a single basin).
        """
        v = np.asarray(values, dtype=np.float64)
        if v.ndim == 1 and self.n_basins == 1:
            v = v[None]
        if v.shape != (self.n_basins, self.n_steps):
            raise DataError(
                f"{self.source}: new forcing {name!r} must have shape "
                f"{(self.n_basins, self.n_steps)}, got {v.shape}"
            )
        names, units = list(self.forcing_names), list(self.forcing_units)
        forcing = self.forcing.copy()
        if name in names:
            j = names.index(name)
            forcing[:, :, j] = v
            units[j] = unit
        else:
            forcing = np.concatenate([forcing, v[:, :, None]], axis=2)
            names.append(name)
            units.append(unit)
        return replace(self, forcing=forcing, forcing_names=names, forcing_units=units)


def _stack(parts: Sequence[BasinDataset], source: str) -> BasinDataset:
    """Join single-basin data sets that share dates and variable names."""
    first = parts[0]
    for p in parts[1:]:
        if p.n_steps != first.n_steps or p.dates[0] != first.dates[0]:
            raise DataError(f"{source}: basin {p.basins} covers {p.dates[0]}..{p.dates[-1]}, "
                            f"basin {first.basins} {first.dates[0]}..{first.dates[-1]}")
        for what in ("forcing_names", "observation_names", "attribute_names"):
            if getattr(p, what) != getattr(first, what):
                raise DataError(f"{source}: {what} of {p.basins} ({getattr(p, what)}) differ from "
                                f"{first.basins} ({getattr(first, what)})")
    return BasinDataset(
        basins=[b for p in parts for b in p.basins], dates=first.dates,
        forcing=np.concatenate([p.forcing for p in parts]), forcing_names=first.forcing_names,
        forcing_units=first.forcing_units,
        observations=np.concatenate([p.observations for p in parts]),
        observation_names=first.observation_names, observation_units=first.observation_units,
        attributes=np.concatenate([p.attributes for p in parts]), attribute_names=first.attribute_names,
        source=source,
    )


# ------------------------------------------------------------------------ HDF5
_STR = h5py.string_dtype("utf-8")


def _strings(values: Sequence[str]) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=object)


def _decode(values: object) -> list[str]:
    arr = np.atleast_1d(np.asarray(values, dtype=object))
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in arr]


def _write_layout(f: h5py.File, ds: BasinDataset) -> None:
    """Write ``ds`` into an open, empty HDF5 file (layout in the module docstring)."""
    f.attrs["format"] = FORMAT
    f.attrs["version"] = np.int64(VERSION)
    f.attrs["source"] = ds.source
    f.create_dataset("dates", data=(ds.dates - _EPOCH).astype(np.int64))
    f.create_dataset("basins", data=_strings(ds.basins), dtype=_STR)

    def block(name: str, values: np.ndarray, names: list[str], units: list[str] | None) -> None:
        # compression only pays (and only works) for non-empty arrays
        opts = {"compression": "gzip", "compression_opts": 4, "shuffle": True} if values.size else {}
        d = f.create_dataset(name, data=values, dtype=np.float64, **opts)
        d.attrs.create("names", _strings(names), dtype=_STR)
        if units is not None:
            d.attrs.create("units", _strings(units), dtype=_STR)

    block("forcing", ds.forcing, ds.forcing_names, ds.forcing_units)
    block("observations", ds.observations, ds.observation_names, ds.observation_units)
    block("attributes", ds.attributes, ds.attribute_names, None)


def write_hdf5(ds: BasinDataset, path: str | os.PathLike) -> Path:
    """Write ``ds`` to ``path`` in the HDF5 layout of this module, atomically.

    The data go to a temporary file in the same folder which then replaces ``path``
    (:func:`os.replace`), so an interrupted write never leaves a truncated file behind.

    Returns:
        The path written.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise DataError(f"{path}: folder {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with h5py.File(tmp, "w-") as f:
            _write_layout(f, ds)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_hdf5(path: str | os.PathLike) -> BasinDataset:
    """Read a :class:`BasinDataset` written by :func:`write_hdf5`.

    Raises:
        DataError: the file is missing, is not HDF5, is not in this layout (or another
            version), lacks a dataset or attribute, or has inconsistent shapes.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not an HDF5 file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        fmt = f.attrs.get("format")
        fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
        if fmt != FORMAT:
            raise DataError(
                f"{path}: not an adjointhydro basin file (root attribute format={fmt!r}, "
                f"expected {FORMAT!r})"
            )
        version = f.attrs.get("version")
        try:
            ok = version is not None and int(version) == VERSION
        except (TypeError, ValueError):
            ok = False
        if not ok:
            shown = version.item() if isinstance(version, np.generic) else version
            raise DataError(f"{path}: layout version {shown!r} is not supported (this reader knows {VERSION})")
        required = ("dates", "basins", "forcing", "observations", "attributes")
        missing = [k for k in required if k not in f or not isinstance(f[k], h5py.Dataset)]
        if missing:
            raise DataError(f"{path}: missing dataset(s) {missing}; found {sorted(f.keys())}")

        def names(key: str, attr: str) -> list[str]:
            if attr not in f[key].attrs:
                raise DataError(f"{path}: dataset {key!r} lacks its {attr!r} attribute")
            return _decode(f[key].attrs[attr])

        dates_raw = f["dates"][()]
        if dates_raw.ndim != 1 or dates_raw.dtype.kind not in "iu":
            raise DataError(f"{path}: 'dates' must be 1-D integers (days since 1970-01-01), "
                            f"got {dates_raw.dtype} {dates_raw.shape}")
        basins = _decode(f["basins"][()])
        return BasinDataset(
            basins=basins,
            dates=_EPOCH + dates_raw.astype(np.int64),
            forcing=f["forcing"][()],
            forcing_names=names("forcing", "names"),
            forcing_units=names("forcing", "units"),
            observations=f["observations"][()],
            observation_names=names("observations", "names"),
            observation_units=names("observations", "units"),
            attributes=f["attributes"][()],
            attribute_names=names("attributes", "names"),
            source=path.name,
        )


# ------------------------------------------------------------------------- CSV
def _read_table(path: Path, delimiter: str = ",", encoding: str = "utf-8") -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and ``(line number, cells)`` rows of a delimited text file; blank lines skipped."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, newline="", encoding=encoding, errors="replace") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        header: list[str] | None = None
        rows: list[tuple[int, list[str]]] = []
        for cells in reader:
            if not cells or all(not c.strip() for c in cells):
                continue
            if header is None:
                header = [c.strip().lstrip("\ufeff") for c in cells]
                continue
            rows.append((reader.line_num, cells))
    if header is None:
        raise DataError(f"{path}: empty file (no header line)")
    return header, rows


def read_csv(
    path: str | os.PathLike,
    date_column: str = "Date",
    forcing: Sequence[str] = ("P", "PET"),
    observations: Sequence[str] = ("Q",),
    units: Mapping[str, str] | None = None,
    basin: str | None = None,
    rename: Mapping[str, str] | None = None,
    attributes: Mapping[str, float] | None = None,
    delimiter: str = ",",
) -> BasinDataset:
    """Read one basin from a CSV file: a date column plus one column per variable.

    Args:
        path: the file.
        date_column: name of the date column (dates 'YYYY-MM-DD', regular daily).
        forcing: columns to read as forcing (must be complete: NaN is an error).
        observations: columns to read as observations (empty cells, 'NA', 'NaN' = missing).
        units: unit per variable (after ``rename``); common names default to mm/day
            (P, PET, E0, Q, Qo) or degC (T), others to ''.
        basin: basin id (default: the file name without extension).
        rename: column name -> variable name, e.g. ``{"E0": "PET", "Qo": "Q"}``.
        attributes: static attributes of the basin, e.g. ``{"latitude": 31.8}``.
        delimiter: field separator.

    Raises:
        DataError: naming the file and the problem: missing column(s), unparseable date
            or number (with line), irregular dates (with the first gap), NaN in forcing
            (with column and date).
    """
    path = Path(path)
    forcing, observations = _as_list(forcing), _as_list(observations)
    rename = dict(rename or {})
    header, rows = _read_table(path, delimiter)
    needed = [date_column, *forcing, *observations]
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; the file has columns {header}")
    if not rows:
        raise DataError(f"{path}: no data rows after the header")
    col = {c: header.index(c) for c in needed}
    width = max(col.values()) + 1

    dates = np.empty(len(rows), dtype="datetime64[D]")
    values = np.empty((len(rows), len(forcing) + len(observations)))
    lines = [n for n, _ in rows]
    for r, (n, cells) in enumerate(rows):
        if len(cells) < width:
            raise DataError(f"{path}, line {n}: {len(cells)} fields, expected {len(header)}")
        try:
            dates[r] = _parse_date(cells[col[date_column]])
        except ValueError:
            raise DataError(
                f"{path}, line {n}: cannot read {cells[col[date_column]]!r} in column "
                f"{date_column!r} as a date (expected YYYY-MM-DD)"
            ) from None
        for k, c in enumerate((*forcing, *observations)):
            try:
                values[r, k] = _float_or_nan(cells[col[c]])
            except ValueError:
                raise DataError(
                    f"{path}, line {n}: cannot read {cells[col[c]]!r} in column {c!r} as a number"
                ) from None
    _check_daily(dates, str(path), lines)

    nf = len(forcing)
    for k, c in enumerate(forcing):
        bad = ~np.isfinite(values[:, k])
        if bad.any():
            r = int(np.argmax(bad))
            raise DataError(
                f"{path}: missing value in forcing column {c!r} on {dates[r]} (line {lines[r]}); "
                f"{int(bad.sum())} missing in that column. Forcing must be complete: fill the "
                f"gaps or choose a shorter period."
            )

    def unit_of(name: str) -> str:
        if units and name in units:
            return units[name]
        return _DEFAULT_UNITS.get(name.lower(), "")

    f_names = [rename.get(c, c) for c in forcing]
    o_names = [rename.get(c, c) for c in observations]
    attrs = dict(attributes or {})
    return BasinDataset(
        basins=[basin if basin is not None else path.stem],
        dates=dates,
        forcing=values[None, :, :nf],
        forcing_names=f_names,
        forcing_units=[unit_of(n) for n in f_names],
        observations=values[None, :, nf:],
        observation_names=o_names,
        observation_units=[unit_of(n) for n in o_names],
        attributes=np.array([[float(v) for v in attrs.values()]]).reshape(1, len(attrs)),
        attribute_names=list(attrs),
        source=path.name,
    )


# ---------------------------------------------------------------- bundled data
def load_leaf_river() -> BasinDataset:
    """The vendored Leaf River (Mississippi, USA) data, 1957-01-01..1987-12-31.

    Forcing ``P`` and ``PET`` (the HOLMES column ``E0``), observation ``Q`` (``Qo``),
    all mm/day; attribute ``latitude`` = :data:`LEAF_RIVER_LATITUDE` (deg N,
    approximate). Source: holmes-hydro 3.5.0, MIT licence (``datasets/LICENSE_holmes``).
    """
    resource = files("adjointhydro.datasets").joinpath("leaf_river.csv")
    with as_file(resource) as p:
        return read_csv(
            p, forcing=("P", "E0"), observations=("Qo",), rename={"E0": "PET", "Qo": "Q"},
            basin="leaf_river", attributes={"latitude": LEAF_RIVER_LATITUDE},
        )


def load_holmes(folder: str | os.PathLike, catchment: str) -> BasinDataset:
    """A catchment in the HOLMES layout: ``<catchment>_Observations.csv`` (+ info file).

    The observation file has columns ``Date, P, E0, Qo`` and optionally ``T``; they
    become forcing ``P``, ``PET`` (from ``E0``) and ``T`` where present, and observation
    ``Q`` (from ``Qo``); rates in mm/day, ``T`` in degC. Where
    ``<catchment>_CemaNeigeInfo.csv`` exists (``key,value`` lines), its ``Lat`` becomes
    attribute ``latitude`` (deg N) and ``Z50`` (median elevation of the elevation bands)
    attribute ``elevation`` (m).
    """
    folder = Path(folder)
    obs = folder / f"{catchment}_Observations.csv"
    if not obs.is_file():
        found = sorted(p.name[: -len("_Observations.csv")] for p in folder.glob("*_Observations.csv"))
        raise DataError(f"{obs}: file not found; catchments in {folder}: {found}")
    header, _ = _read_table(obs)
    forcing = ["P", "E0"] + (["T"] if "T" in header else [])
    attrs: dict[str, float] = {}
    info = folder / f"{catchment}_CemaNeigeInfo.csv"
    if info.is_file():
        keys = {"Lat": "latitude", "Z50": "elevation"}
        with open(info, newline="", encoding="utf-8") as fh:
            for n, cells in enumerate(csv.reader(fh), start=1):
                if len(cells) >= 2 and cells[0].strip() in keys:
                    try:
                        attrs[keys[cells[0].strip()]] = float(cells[1])
                    except ValueError:
                        raise DataError(f"{info}, line {n}: cannot read {cells[1]!r} as a number") from None
    order = [k for k in ("latitude", "elevation") if k in attrs]  # stable order, not file order
    return read_csv(
        obs, forcing=forcing, observations=("Qo",), rename={"E0": "PET", "Qo": "Q"},
        basin=catchment, attributes={k: attrs[k] for k in order},
    )


def load_exphydro_sample(folder: str | os.PathLike) -> BasinDataset:
    """The EXP-HYDRO sample catchment: ``P_test.txt``, ``PET_test.txt``, ``T_test.txt``, ``Q_test.txt``.

    Each file has a header ``# Day 1: YYYY-MM-DD; Units: <unit>`` and then one value a
    line. Forcing ``P`` (mm/day), ``T`` (degC), ``PET`` (mm/day); observation ``Q`` (mm/day).
    """
    folder = Path(folder)
    series: dict[str, tuple[np.datetime64, str, np.ndarray]] = {}
    for name in ("P", "T", "PET", "Q"):
        path = folder / f"{name}_test.txt"
        if not path.is_file():
            raise DataError(f"{path}: file not found (EXP-HYDRO sample needs P, PET, T and Q _test.txt)")
        lines = path.read_text(encoding="utf-8").splitlines()
        head = lines[0] if lines else ""
        m_day = re.search(r"Day\s*1\s*:\s*([0-9/-]+)", head)
        m_unit = re.search(r"Units?\s*:\s*(.+?)\s*$", head)
        if m_day is None:
            raise DataError(f"{path}, line 1: header {head!r} lacks 'Day 1: YYYY-MM-DD'")
        try:
            start = _parse_date(m_day.group(1))
        except ValueError as e:
            raise DataError(f"{path}, line 1: {e}") from None
        unit = m_unit.group(1).replace(" ", "") if m_unit else ""
        unit = {"degC": "degC", "°C": "degC"}.get(unit, unit)
        vals = []
        for n, text in enumerate(lines[1:], start=2):
            if not text.strip():
                continue
            try:
                vals.append(_float_or_nan(text))
            except ValueError:
                raise DataError(f"{path}, line {n}: cannot read {text!r} as a number") from None
        series[name] = (start, unit, np.array(vals))
    start, _, q = series["Q"]
    for name, (s, _, v) in series.items():
        if s != start or len(v) != len(q):
            raise DataError(
                f"{folder}: {name}_test.txt starts {s} with {len(v)} values but Q_test.txt "
                f"starts {start} with {len(q)}"
            )
    dates = start + np.arange(len(q))
    for name in ("P", "T", "PET"):
        bad = ~np.isfinite(series[name][2])
        if bad.any():
            raise DataError(f"{folder / (name + '_test.txt')}: missing value on {dates[int(np.argmax(bad))]}")
    return BasinDataset(
        basins=["exphydro_sample"],
        dates=dates,
        forcing=np.stack([series[n][2] for n in ("P", "T", "PET")], axis=-1)[None],
        forcing_names=["P", "T", "PET"],
        forcing_units=[series[n][1] for n in ("P", "T", "PET")],
        observations=q[None, :, None],
        observation_names=["Q"],
        observation_units=[series["Q"][1]],
        source=str(folder.name or folder),
    )


# --------------------------------------------------------------- potential ET
#: Solar constant, MJ m^-2 min^-1 (FAO-56, eq. 21).
_GSC = 0.0820


def _solar(latitude_deg: np.ndarray, day_of_year: np.ndarray) -> tuple[np.ndarray, ...]:
    """Latitude (rad), solar declination (rad), sunset hour angle (rad), inverse relative
    Earth-Sun distance (-) after FAO-56 (Allen et al. 1998, eqs. 23-25)."""
    lat = np.asarray(latitude_deg, dtype=np.float64)
    doy = np.asarray(day_of_year, dtype=np.float64)
    if np.any(np.abs(lat) > 90):
        raise DataError(f"latitude must be within [-90, 90] degrees, got {lat[np.abs(lat) > 90].ravel()[0]}")
    if np.any((doy < 1) | (doy > 366)):
        raise DataError(f"day_of_year must be within 1..366, got {doy[(doy < 1) | (doy > 366)].ravel()[0]}")
    phi = np.deg2rad(lat)
    delta = 0.409 * np.sin(2 * np.pi / 365 * doy - 1.39)
    # clip: polar day (arccos(-1) = pi, 24 h) and polar night (arccos(1) = 0)
    omega = np.arccos(np.clip(-np.tan(phi) * np.tan(delta), -1.0, 1.0))
    dr = 1 + 0.033 * np.cos(2 * np.pi / 365 * doy)
    return phi, delta, omega, dr


def daylight_hours(latitude_deg: np.ndarray | float, day_of_year: np.ndarray | int) -> np.ndarray:
    """Astronomical day length ``N = 24/pi * omega_s`` in hours (FAO-56, eq. 34)."""
    _, _, omega, _ = _solar(latitude_deg, day_of_year)
    return 24.0 / np.pi * omega


def extraterrestrial_radiation(latitude_deg: np.ndarray | float, day_of_year: np.ndarray | int) -> np.ndarray:
    """Daily extraterrestrial radiation ``Re`` in MJ m^-2 day^-1 (FAO-56, eq. 21)::

        Re = 24*60/pi * Gsc * dr * (omega_s sin(phi) sin(delta) + cos(phi) cos(delta) sin(omega_s))

    with ``Gsc = 0.0820`` MJ m^-2 min^-1, ``dr = 1 + 0.033 cos(2 pi J/365)``,
    ``delta = 0.409 sin(2 pi J/365 - 1.39)`` and ``omega_s = arccos(-tan(phi) tan(delta))``.
    """
    phi, delta, omega, dr = _solar(latitude_deg, day_of_year)
    re_ = 24 * 60 / np.pi * _GSC * dr * (
        omega * np.sin(phi) * np.sin(delta) + np.cos(phi) * np.cos(delta) * np.sin(omega)
    )
    return np.maximum(re_, 0.0)


def hamon_pet(
    temperature_degC: np.ndarray | float,
    latitude_deg: np.ndarray | float,
    day_of_year: np.ndarray | int,
    coefficient: float = 1.0,
) -> np.ndarray:
    """Potential evapotranspiration after Hamon (1961), mm/day, vectorised.

    ``PET = coefficient * 29.8 * N * e_s(T) / (T + 273.2)``, where ``N`` is the
    astronomical day length in hours (:func:`daylight_hours`, from latitude and solar
    declination) and ``e_s(T) = 0.611 exp(17.27 T / (T + 237.3))`` the saturation vapour
    pressure in kPa at the daily mean air temperature ``T`` (degC). This is the same as the
    common form ``0.1651 * (N/12) * rho_sat`` with ``rho_sat = 216.7 e_s[hPa]/(T + 273.3)``
    the saturated vapour density (g/m^3) (e.g. Lu et al. 2005, where ``coefficient`` is
    their calibration factor KPEC), and the form used by EXP-HYDRO. PET is >= 0 for any T.

    Args:
        temperature_degC: daily mean air temperature, degC.
        latitude_deg: latitude, degrees north (negative south).
        day_of_year: 1..366.
        coefficient: multiplicative calibration factor (1 = uncalibrated).
    """
    t = np.asarray(temperature_degC, dtype=np.float64)
    n_hours = daylight_hours(latitude_deg, day_of_year)
    e_s = 0.611 * np.exp(17.27 * t / (t + 237.3))  # kPa
    return coefficient * 29.8 * n_hours * e_s / (t + 273.2)


def oudin_pet(
    temperature_degC: np.ndarray | float,
    latitude_deg: np.ndarray | float,
    day_of_year: np.ndarray | int,
    latent_heat: float = 2.45,
) -> np.ndarray:
    """Potential evapotranspiration after Oudin et al. (2005), mm/day, vectorised.

    ``PET = Re / (lambda * rho) * (T + 5) / 100`` (converted from m/day to mm/day) where
    ``T + 5 > 0``, else 0. ``Re`` is the extraterrestrial radiation (MJ m^-2 day^-1,
    :func:`extraterrestrial_radiation`), ``lambda`` the latent heat of vaporisation
    (``latent_heat``, MJ/kg, 2.45 as in Oudin et al. 2005) and ``rho = 1000`` kg/m^3.

    Args:
        temperature_degC: daily mean air temperature, degC.
        latitude_deg: latitude, degrees north.
        day_of_year: 1..366.
    """
    t = np.asarray(temperature_degC, dtype=np.float64)
    re_ = extraterrestrial_radiation(latitude_deg, day_of_year)
    pet = re_ / (latent_heat * 1000.0) * (t + 5.0) / 100.0 * 1000.0
    return np.where(t + 5.0 > 0.0, pet, 0.0)


# ------------------------------------------------------------------- CAMELS-US
#: ft^3/s -> m^3/s
_CFS = 0.0283168


def _gauge_id(b: str | int) -> str:
    """CAMELS gauge ids are 8 characters, zero-padded (01022500); tables may drop the zero."""
    s = str(b).strip()
    return s.zfill(8) if s.isdigit() else s


def _read_camels_forcing(path: Path) -> tuple[float, float, float, np.ndarray, dict[str, np.ndarray]]:
    """Latitude (deg), elevation (m), area (m^2), dates and columns of one forcing file."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if len(lines) < 5:
        raise DataError(f"{path}: too short for a CAMELS forcing file ({len(lines)} lines)")
    head = []
    for n in range(3):
        try:
            head.append(float(lines[n]))
        except ValueError:
            what = ("latitude", "elevation (m)", "area (m2)")[n]
            raise DataError(f"{path}, line {n + 1}: expected the basin {what}, got {lines[n]!r}") from None
    # "prcp(mm/day)" -> "prcp"; Maurer/NLDAS files capitalise some names
    names = [re.sub(r"\(.*\)$", "", c).lower() for c in lines[3].split()]
    needed = ["year", "mnth", "day", "dayl", "prcp", "srad", "tmax", "tmin", "vp"]
    missing = [c for c in needed if c not in names]
    if missing:
        raise DataError(f"{path}, line 4: missing column(s) {missing}; header is {lines[3].split()}")
    try:
        data = np.loadtxt(lines[4:], ndmin=2)
    except ValueError as e:
        raise DataError(f"{path}: cannot read the data lines ({e})") from None
    if data.shape[1] != len(names):
        raise DataError(f"{path}: {data.shape[1]} columns of data but {len(names)} in the header")
    cols = {n: data[:, i] for i, n in enumerate(names)}
    dates = _ymd_to_dates(cols["year"], cols["mnth"], cols["day"], str(path))
    _check_daily(dates, str(path))
    return head[0], head[1], head[2], dates, cols


def _read_camels_streamflow(path: Path, basin: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dates and discharge (ft^3/s, NaN where -999 or negative) of a USGS streamflow file.

    Raises :class:`DataError` naming the file and line for a gauge id other than ``basin``
    in the first column, and for repeated or backward dates (gaps are allowed: missing
    days become NaN in :func:`load_camels_us`).
    """
    try:
        data = np.loadtxt(path, usecols=(1, 2, 3, 4), ndmin=2)
    except ValueError as e:
        raise DataError(f"{path}: cannot read as 'gauge year month day Q flag' lines ({e})") from None
    if data.shape[0] == 0:
        raise DataError(f"{path}: no data lines")
    if basin is not None:
        ids = np.loadtxt(path, usecols=(0,), dtype=str, ndmin=1)
        wrong = np.nonzero(np.array([_gauge_id(i) for i in ids]) != basin)[0]
        if wrong.size:
            i = int(wrong[0])
            raise DataError(
                f"{path}, line {i + 1}: streamflow of gauge {str(ids[i])!r} in the file of basin {basin!r}; "
                f"{wrong.size} such line(s). The file does not belong to this basin."
            )
    dates = _ymd_to_dates(data[:, 0], data[:, 1], data[:, 2], str(path))
    steps = np.diff(dates).astype(np.int64)
    if steps.size and (steps < 1).any():
        i = int(np.nonzero(steps < 1)[0][0])
        what = "a repeated date" if steps[i] == 0 else "dates going backwards"
        raise DataError(
            f"{path}, lines {i + 1}-{i + 2}: streamflow dates {dates[i]} then {dates[i + 1]}, {what}; "
            f"each day may appear once, in order"
        )
    q = data[:, 3].copy()
    q[q < 0] = np.nan  # -999 marks missing days
    return dates, q


def _find_one(folder: Path, pattern: str, what: str) -> Path:
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found (looked for {what})")
    hits = sorted(folder.rglob(pattern))
    if not hits:
        raise DataError(f"{what} not found: no file {pattern!r} under {folder} (searched recursively)")
    return hits[0]


def _read_attribute_tables(
    paths: Sequence[Path], basins: list[str], id_column: str, delimiter: str,
    pad: bool, source: str,
) -> tuple[np.ndarray, list[str]]:
    """Numeric columns of attribute tables, joined on ``id_column``, rows in ``basins`` order.

    A column is kept when every non-missing cell of it (over all rows of its table, so the
    choice does not depend on the selected basins) reads as a number.
    """
    names: list[str] = []
    columns: list[np.ndarray] = []
    for path in paths:
        header, rows = _read_table(path, delimiter)
        if id_column not in header:
            raise DataError(f"{path}: no {id_column!r} column; the table has columns {header}")
        ic = header.index(id_column)
        table: dict[str, list[str]] = {}
        for n, cells in rows:
            cells = [c.strip() for c in cells] + [""] * (len(header) - len(cells))
            key = _gauge_id(cells[ic]) if pad else cells[ic]
            table.setdefault(key, cells)
        missing = [b for b in basins if b not in table]
        if missing:
            raise DataError(f"{path}: attribute table lacks basin(s) {missing}")
        for j, name in enumerate(header):
            if j == ic or name in names:
                continue
            try:
                col_all = [_float_or_nan(cells[j]) for cells in table.values()]
            except ValueError:
                continue  # a text column (names, classes): not an attribute a model can use
            if not col_all or all(math.isnan(v) for v in col_all):
                continue
            names.append(name)
            columns.append(np.array([_float_or_nan(table[b][j]) for b in basins]))
    values = np.stack(columns, axis=1) if columns else np.zeros((len(basins), 0))
    nan = np.isnan(values)
    if nan.any():
        listing = "; ".join(
            f"{b}: {', '.join(names[j] for j in np.nonzero(nan[i])[0])}"
            for i, b in enumerate(basins) if nan[i].any()
        )
        warnings.warn(f"{source}: NaN attribute values kept as NaN: {listing}", DataWarning, stacklevel=3)
    return values, names


def load_camels_us(
    root: str | os.PathLike,
    basins: Sequence[str] | None = None,
    forcing_source: str = "daymet",
) -> BasinDataset:
    """Basins from the original CAMELS-US folder layout (Newman et al. 2015; Addor et al. 2017).

    Reads ``basin_mean_forcing/<forcing_source>/**/<basin>_lump_*_forcing_leap.txt``,
    ``usgs_streamflow/**/<basin>_streamflow_qc.txt`` and, where present,
    ``camels_attributes_v2.0/camels_*.txt`` under ``root`` (subfolders are searched
    recursively, as the real layout has HUC folders).

    Forcing: ``P`` (prcp, mm/day), ``T`` (mean of tmax and tmin, degC), ``PET`` (Hamon,
    :func:`hamon_pet`, from ``T``, the header latitude and the day of year, mm/day),
    ``srad`` (W/m2), ``vp`` (Pa), ``dayl`` (s), ``tmax``, ``tmin`` (degC).
    Observation ``Q``: streamflow converted from ft^3/s to mm/day with the header area,
    ``Q * 0.0283168 * 86400 * 1000 / area_m2``; -999 or negative = NaN, days without a
    line = NaN. Dates: the period common to all forcing and streamflow files; a streamflow
    file with another gauge's id, repeated or backward dates raises :class:`DataError`
    (file and line), files without a common period raise :class:`DataError` listing each
    basin's spans, and a basin with no observation in the common period gets a
    :class:`DataWarning` naming it (its ``Q`` stays NaN).
    Attributes: ``latitude`` (deg N), ``elevation`` (m), ``area`` (km^2) from the forcing
    file header, then the numeric columns of the CAMELS tables (NaN kept, with a
    :class:`DataWarning` listing them).

    Args:
        root: the CAMELS-US folder.
        basins: gauge ids (8 characters; shorter numeric ids are zero-padded). Default:
            every basin with a forcing file.
        forcing_source: ``"daymet"``, ``"maurer"``, ``"nldas"`` ... (a folder name).
    """
    root = Path(root)
    forcing_dir = root / "basin_mean_forcing" / forcing_source
    if not forcing_dir.is_dir():
        parent = root / "basin_mean_forcing"
        found = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
        raise DataError(f"{forcing_dir}: forcing folder not found; available sources: {found}")
    if basins is None:
        ids = sorted({p.name.split("_")[0] for p in forcing_dir.rglob("*_lump_*_forcing_leap.txt")})
        if not ids:
            raise DataError(f"{forcing_dir}: no '*_lump_*_forcing_leap.txt' files (searched recursively)")
    else:
        ids = [_gauge_id(b) for b in _as_list(basins)]
        if not ids:
            raise DataError(f"{root}: no basins selected")
    source = f"CAMELS-US {root.name}/{forcing_source}"

    parts = []
    for b in ids:
        fpath = _find_one(forcing_dir, f"{b}_lump_*_forcing_leap.txt", f"forcing of basin {b!r}")
        qpath = _find_one(root / "usgs_streamflow", f"{b}_streamflow_qc.txt", f"streamflow of basin {b!r}")
        lat, elev, area_m2, fdates, cols = _read_camels_forcing(fpath)
        qdates, q_cfs = _read_camels_streamflow(qpath, b)
        if not area_m2 > 0:
            raise DataError(f"{fpath}, line 3: basin area must be > 0 m2, got {area_m2}")
        parts.append((b, fpath, qpath, lat, elev, area_m2, fdates, cols, qdates, q_cfs))

    start = max(max(p[6][0], p[8][0]) for p in parts)
    end = min(min(p[6][-1], p[8][-1]) for p in parts)
    if end < start:
        spans = "; ".join(f"{p[0]}: forcing {p[6][0]}..{p[6][-1]}, streamflow {p[8][0]}..{p[8][-1]}"
                          for p in parts)
        raise DataError(f"{source}: no period common to all forcing and streamflow files ({spans})")
    dates = np.arange(start, end + np.timedelta64(1, "D"), dtype="datetime64[D]")
    doy = day_of_year(dates)

    names = ["P", "T", "PET", "srad", "vp", "dayl", "tmax", "tmin"]
    units = ["mm/day", "degC", "mm/day", "W/m2", "Pa", "s", "degC", "degC"]
    forcing = np.empty((len(parts), len(dates), len(names)))
    q = np.full((len(parts), len(dates)), np.nan)
    head = np.empty((len(parts), 3))
    for i, (b, fpath, qpath, lat, elev, area_m2, fdates, cols, qdates, q_cfs) in enumerate(parts):
        k = int((start - fdates[0]).astype(np.int64))
        sl = slice(k, k + len(dates))
        t_mean = 0.5 * (cols["tmax"][sl] + cols["tmin"][sl])
        forcing[i] = np.stack([
            cols["prcp"][sl], t_mean, hamon_pet(t_mean, lat, doy), cols["srad"][sl],
            cols["vp"][sl], cols["dayl"][sl], cols["tmax"][sl], cols["tmin"][sl],
        ], axis=-1)
        pos = (qdates - start).astype(np.int64)
        inside = (pos >= 0) & (pos < len(dates))
        q[i, pos[inside]] = q_cfs[inside] * _CFS * 86400.0 * 1000.0 / area_m2
        head[i] = (lat, elev, area_m2 / 1e6)
    empty = [b for i, b in enumerate(ids) if np.isnan(q[i]).all()]
    if empty:
        warnings.warn(
            f"{source}: basin(s) {empty} have no streamflow observation (all missing or -999) in the "
            f"common period {start}..{end}; their Q is all NaN (training rejects such basins by name)",
            DataWarning, stacklevel=2,
        )

    attr_names = ["latitude", "elevation", "area"]
    attrs = head
    tables = sorted((root / "camels_attributes_v2.0").glob("camels_*.txt"))
    if not tables:
        tables = sorted(root.glob("camels_attributes*/camels_*.txt"))
    if tables:
        values, tnames = _read_attribute_tables(tables, ids, "gauge_id", ";", True, source)
        keep = [j for j, n in enumerate(tnames) if n not in attr_names]
        attrs = np.concatenate([head, values[:, keep]], axis=1)
        attr_names += [tnames[j] for j in keep]
    else:
        warnings.warn(f"{source}: no camels_attributes*/camels_*.txt tables under {root}; "
                      f"only latitude, elevation and area from the forcing headers", DataWarning, stacklevel=2)
    return BasinDataset(
        basins=ids, dates=dates, forcing=forcing, forcing_names=names, forcing_units=units,
        observations=q[:, :, None], observation_names=["Q"], observation_units=["mm/day"],
        attributes=attrs, attribute_names=attr_names, source=source,
    )


def camels_to_hdf5(
    root: str | os.PathLike, path: str | os.PathLike,
    basins: Sequence[str] | None = None, forcing_source: str = "daymet",
) -> BasinDataset:
    """Load CAMELS-US basins (:func:`load_camels_us`) and write them with :func:`write_hdf5`."""
    ds = load_camels_us(root, basins, forcing_source)
    write_hdf5(ds, path)
    return ds


# ------------------------------------------------------- folder of CSV files
def load_csv_folder(
    folder: str | os.PathLike,
    attributes_csv: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    basins: Sequence[str] | None = None,
    date_column: str = "date",
    forcing: Sequence[str] = ("P", "PET"),
    observations: Sequence[str] = ("Q",),
    units: Mapping[str, str] | None = None,
    rename: Mapping[str, str] | None = None,
    id_column: str = "gauge_id",
    delimiter: str = ",",
) -> BasinDataset:
    """Basins from a folder of ``<basin>.csv`` files plus attribute tables (Caravan layout).

    Caravan keeps ``timeseries/csv/<source>/<basin>.csv`` (a ``date`` column, one column
    per variable) and ``attributes/<source>/*.csv`` (an id column ``gauge_id``). Each
    file is read with :func:`read_csv` (same checks); the result covers the period common
    to all selected basins.

    Args:
        folder: the folder of per-basin CSV files.
        attributes_csv: an attribute table, a folder of them (``*.csv``, recursively) or
            a list of tables, joined on ``id_column``; numeric columns only. None: no
            attributes.
        basins: basin ids (file names without ``.csv``); default all files.
        date_column, forcing, observations, units, rename, delimiter: as in :func:`read_csv`
            (for Caravan e.g. ``forcing=("total_precipitation_sum", ...)`` with ``rename``).
        id_column: the basin id column of the attribute tables.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    ids = sorted(p.stem for p in folder.glob("*.csv")) if basins is None else _as_list(basins)
    if not ids:
        raise DataError(f"{folder}: no basins (no *.csv files)")
    missing = [b for b in ids if not (folder / f"{b}.csv").is_file()]
    if missing:
        raise DataError(f"basin(s) {missing} not found: no '<basin>.csv' in {folder}")
    parts = [
        read_csv(folder / f"{b}.csv", date_column, forcing, observations, units, b, rename, None, delimiter)
        for b in ids
    ]
    start = max(p.dates[0] for p in parts)
    end = min(p.dates[-1] for p in parts)
    if end < start:
        spans = "; ".join(f"{p.basins[0]}: {p.dates[0]}..{p.dates[-1]}" for p in parts)
        raise DataError(f"{folder}: the basins share no common period ({spans})")
    ds = _stack([p.period(start, end) for p in parts], str(folder.name or folder))
    if attributes_csv is None:
        return ds
    if isinstance(attributes_csv, (str, os.PathLike)):
        a = Path(attributes_csv)
        tables = sorted(a.rglob("*.csv")) if a.is_dir() else [a]
    else:
        tables = [Path(p) for p in attributes_csv]
    if not tables:
        raise DataError(f"{attributes_csv}: no attribute tables (*.csv) found")
    values, names = _read_attribute_tables(tables, ids, id_column, delimiter, False, ds.source)
    return replace(ds, attributes=values, attribute_names=names)
