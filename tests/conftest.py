"""Shared fixtures: synthetic forcing that always exists, real data that may not."""
from __future__ import annotations

import os

# Threaded OpenBLAS is hundreds of times slower on small matrices on a loaded 2-core
# machine; tests use one thread (set before numpy loads it).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import numpy as np
import pytest
import torch

from adjointhydro import Forcing

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def synthetic_forcing(n_basins: int = 3, n_days: int = 730, seed: int = 0, snow: bool = True) -> Forcing:
    """Weather-generator-like daily forcing: wet/dry days, seasonal temperature and PET."""
    rng = np.random.default_rng(seed)
    doy = np.arange(n_days) % 365
    season = np.cos(2 * np.pi * (doy - 200) / 365)
    temp = 8 + 14 * season[None] + rng.normal(0, 3, (n_basins, n_days)) + rng.normal(0, 3, (n_basins, 1))
    wet = rng.random((n_basins, n_days)) < 0.45
    precip = rng.gamma(0.7, 7.0, (n_basins, n_days)) * wet
    pet = np.clip(2.2 + 1.8 * season, 0.1, None)[None].repeat(n_basins, 0) * rng.uniform(0.8, 1.2, (n_basins, 1))
    dates = np.datetime64("2001-01-01") + np.arange(n_days)
    if snow:
        return Forcing(np.stack([precip, temp, pet], -1), ("P", "T", "PET"), ("mm/day", "degC", "mm/day"),
                       dates=dates, source="synthetic")
    return Forcing(np.stack([precip, pet], -1), ("P", "PET"), ("mm/day", "mm/day"), dates=dates, source="synthetic")


@pytest.fixture
def forcing3() -> Forcing:
    return synthetic_forcing()


def failing_flux_case(n_basins: int, n_days: int, flood_day: int):
    """A one-store model whose outflow turns NaN where precipitation exceeds 50 mm, and
    forcing (basins 'a', 'b', ... from 2001-01-01) with such a flood in the third basin
    on day ``flood_day`` (0-based): the solver must name basin 'c' and that date."""
    from adjointhydro import Flux, Model, Store

    m = Model([Store("S", initial=1.0)],
              [Flux("rain", None, "S", lambda v: v.P),
               Flux("Q", "S", None, lambda v: torch.where(v.P > 50, torch.full_like(v.S, float("nan")), 0.1 * v.S))],
              forcing=["P"])
    p = np.ones((n_basins, n_days, 1))
    p[2, flood_day, 0] = 100.0
    basins = tuple("abcdefgh"[:n_basins])
    return m, Forcing(p, ("P",), dates=np.datetime64("2001-01-01") + np.arange(n_days), basins=basins)


def exphydro_sample_forcing(n_days: int | None = None) -> Forcing:
    folder = SHARED_DATA / "exphydro_sample"
    if not folder.exists():
        pytest.skip(f"real data folder {folder} is absent (a fresh clone has no ../shared)")
    from adjointhydro.data import load_exphydro_sample

    ds = load_exphydro_sample(folder)
    f = ds.to_forcing(["P", "T", "PET"])
    return f if n_days is None else f.select(steps=slice(0, n_days))


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield


#: Caravan column names of the synthetic CSV folder (write_csv_folder) -> the model's names.
CARAVAN_RENAME = {"total_precipitation_sum": "P", "temperature_2m_mean": "T", "potential_evaporation_sum": "PET"}


def write_csv_folder(root: Path, ds, gap: tuple[str, int, int] | None = None) -> tuple[Path, Path]:
    """Write a BasinDataset (forcing P, T, PET; observation Q) in the Caravan layout under ``root``.

    ``root/timeseries/<basin>.csv`` (columns date, Caravan forcing names, streamflow; a missing
    observation is an empty cell) and two attribute tables in ``root/attributes/`` joined on
    ``gauge_id`` (the first with a text column, rows in reverse order). ``gap = (basin, i, j)``
    empties the streamflow of that basin on days i..j-1. Values are written exactly (repr).
    Returns (timeseries folder, attributes folder).
    """
    ts, att = root / "timeseries", root / "attributes"
    ts.mkdir(parents=True)
    att.mkdir(parents=True)
    names = {v: k for k, v in CARAVAN_RENAME.items()}
    for b, basin in enumerate(ds.basins):
        q = ds.observed("Q")[b].copy()
        if gap is not None and gap[0] == basin:
            q[gap[1]:gap[2]] = np.nan
        cols = [ds.forcing_variable(v)[b] for v in ("P", "T", "PET")]
        lines = ["date," + ",".join(names[v] for v in ("P", "T", "PET")) + ",streamflow"]
        for t, d in enumerate(ds.dates):
            obs = "" if np.isnan(q[t]) else repr(float(q[t]))
            lines.append(f"{d}," + ",".join(repr(float(c[t])) for c in cols) + f",{obs}")
        (ts / f"{basin}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    half = len(ds.attribute_names) // 2
    for k, (fname, cols) in enumerate((("attributes_a.csv", ds.attribute_names[:half]),
                                       ("attributes_b.csv", ds.attribute_names[half:]))):
        lines = ["gauge_id," + ("gauge_name," if k == 0 else "") + ",".join(cols)]
        order = range(len(ds.basins) - 1, -1, -1) if k == 0 else range(len(ds.basins))
        for b in order:
            name = f"Creek {b}," if k == 0 else ""
            lines.append(f"{ds.basins[b]}," + name + ",".join(repr(float(ds.attribute(c)[b])) for c in cols))
        (att / fname).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ts, att
