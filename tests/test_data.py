"""Tests of adjointhydro.data: the BasinDataset, file formats, loaders and PET formulas.

Tests marked by the ``shared_data`` fixture read the real catchment data in
``../shared/data`` (next to the repository) and skip when it is absent.
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from adjointhydro import data
from adjointhydro.data import (
    BasinDataset,
    DataError,
    DataWarning,
    daylight_hours,
    hamon_pet,
    load_camels_us,
    load_csv_folder,
    load_exphydro_sample,
    load_holmes,
    load_leaf_river,
    oudin_pet,
    read_csv,
    read_hdf5,
    write_hdf5,
)
from adjointhydro.forcing import Forcing

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CAMELS_BASINS = ["01022500", "01547700"]


def shared(sub: str) -> Path:
    """A folder of the shared real data, or skip the test when it is not there."""
    p = SHARED / sub
    if not p.exists():
        pytest.skip(f"real data not available: {p} is absent (a fresh clone has no ../shared/data)")
    return p


def make_dataset(n_basins: int = 2, n_steps: int = 10, start: str = "2000-01-01") -> BasinDataset:
    rng = np.random.default_rng(0)
    obs = rng.random((n_basins, n_steps, 1))
    obs[0, 3, 0] = np.nan  # a missing observation must survive every operation
    return BasinDataset(
        basins=[f"b{i}" for i in range(n_basins)],
        dates=np.datetime64(start) + np.arange(n_steps),
        forcing=rng.random((n_basins, n_steps, 3)) * 5,
        forcing_names=["P", "T", "PET"],
        forcing_units=["mm/day", "degC", "mm/day"],
        observations=obs,
        observation_names=["Q"],
        observation_units=["mm/day"],
        attributes=np.array([[31.8, np.nan], [45.0, 120.0]])[:n_basins],
        attribute_names=["latitude", "elevation"],
        source="synthetic.h5",
    )


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def assert_same(a: BasinDataset, b: BasinDataset) -> None:
    assert a.basins == b.basins
    np.testing.assert_array_equal(a.dates, b.dates)
    np.testing.assert_array_equal(a.forcing, b.forcing)
    np.testing.assert_array_equal(a.observations, b.observations)  # NaN == NaN here
    np.testing.assert_array_equal(a.attributes, b.attributes)
    for f in ("forcing_names", "forcing_units", "observation_names", "observation_units", "attribute_names"):
        assert getattr(a, f) == getattr(b, f), f


# ------------------------------------------------------------------ BasinDataset
def test_dataset_validates_shapes_and_names_source():
    ds = make_dataset()
    with pytest.raises(DataError, match=r"synthetic\.h5: forcing has 9 time steps but there are 10 dates"):
        BasinDataset(ds.basins, ds.dates, ds.forcing[:, :9], ds.forcing_names, ds.forcing_units, source="synthetic.h5")
    with pytest.raises(DataError, match=r"synthetic\.h5: forcing has 3 variables but 2 names"):
        BasinDataset(ds.basins, ds.dates, ds.forcing, ["P", "T"], ["mm/day"] * 2, source="synthetic.h5")
    with pytest.raises(DataError, match="not regular daily: 2000-01-02 is followed by 2000-01-04"):
        BasinDataset(["a"], np.array(["2000-01-01", "2000-01-02", "2000-01-04"], dtype="datetime64[D]"),
                     np.ones((1, 3, 1)), ["P"], ["mm/day"])
    bad = ds.forcing.copy()
    bad[1, 4, 2] = np.nan
    with pytest.raises(DataError, match=r"'PET'.*basin 'b1' on 2000-01-05"):
        BasinDataset(ds.basins, ds.dates, bad, ds.forcing_names, ds.forcing_units)


def test_to_forcing_subset_order_and_missing_variable():
    ds = make_dataset()
    f = ds.to_forcing(["PET", "P"], interpolation="linear", dtype=torch.float32)
    assert isinstance(f, Forcing)
    assert f.names == ("PET", "P") and f.units == ("mm/day", "mm/day")
    assert f.values.dtype == torch.float32 and f.values.shape == (2, 10, 2)
    assert f.basins == ("b0", "b1") and f.interpolation == "linear"
    np.testing.assert_allclose(f["P"].numpy(), ds.forcing[:, :, 0], rtol=1e-6)
    np.testing.assert_array_equal(f.dates, ds.dates)
    with pytest.raises(DataError, match=r"synthetic\.h5: no forcing variable\(s\) \['E0', 'tmax'\]"):
        ds.to_forcing(["P", "E0", "tmax"])


def test_period_index_select_and_attribute():
    ds = make_dataset()
    sub = ds.period("2000-01-03", "2000-01-05")
    assert sub.n_steps == 3 and str(sub.dates[0]) == "2000-01-03" and str(sub.dates[-1]) == "2000-01-05"
    np.testing.assert_array_equal(sub.forcing, ds.forcing[:, 2:5])
    assert np.isnan(sub.observed("Q")[0, 1])  # the NaN at 2000-01-04
    assert ds.index_of("2000-01-10") == 9
    with pytest.raises(DataError, match=r"2000-01-11 is outside the data, which cover 2000-01-01\.\.2000-01-10"):
        ds.index_of("2000-01-11")
    with pytest.raises(DataError, match=r"synthetic\.h5: empty period 2000-01-05\.\.2000-01-03"):
        ds.period("2000-01-05", "2000-01-03")
    with pytest.raises(DataError, match=r"outside the data, which cover 2000-01-01\.\.2000-01-10"):
        ds.period("1999-12-31", "2000-01-05")
    with pytest.raises(DataError, match="cannot read period start '2000-13-01'"):
        ds.period("2000-13-01", "2000-01-05")
    one = ds.select_basins(["b1"])
    assert one.basins == ["b1"] and one.attribute("latitude").tolist() == [45.0]
    with pytest.raises(DataError, match=r"basin\(s\) \['nope'\] not in the data"):
        ds.select_basins(["b0", "nope"])
    assert np.isnan(ds.attribute("elevation")[0])
    with pytest.raises(DataError, match=r"no attribute variable\(s\) \['area'\]"):
        ds.attribute("area")
    with pytest.raises(DataError, match=r"no observation variable\(s\) \['SWE'\]"):
        ds.observed("SWE")
    pet = ds.with_forcing("PET2", np.ones((2, 10)), "mm/day")
    assert pet.forcing_names[-1] == "PET2" and pet.forcing.shape == (2, 10, 4)


# ------------------------------------------------------------------------- HDF5
def test_hdf5_round_trip(tmp_path):
    ds = make_dataset()
    path = write_hdf5(ds, tmp_path / "basins.h5")
    back = read_hdf5(path)
    assert_same(ds, back)
    assert back.source == "basins.h5"
    with h5py.File(path, "r") as f:  # the documented layout
        assert f.attrs["format"] == "adjointhydro-basins" and int(f.attrs["version"]) == 1
        assert f["dates"].dtype == np.int64 and int(f["dates"][0]) == 10957  # 2000-01-01
    # no observations and no attributes: 0-length axes survive too
    bare = BasinDataset(ds.basins, ds.dates, ds.forcing, ds.forcing_names, ds.forcing_units)
    assert_same(bare, read_hdf5(write_hdf5(bare, tmp_path / "bare.h5")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.h5", "basins.h5"]  # no temp files left


def test_hdf5_write_is_atomic(tmp_path, monkeypatch):
    path = write_hdf5(make_dataset(), tmp_path / "basins.h5")
    before = path.read_bytes()

    def broken(f, ds):
        f.create_dataset("dates", data=np.arange(3))
        raise RuntimeError("disk full")

    monkeypatch.setattr(data, "_write_layout", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_hdf5(make_dataset(n_basins=1), path)
    assert path.read_bytes() == before  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["basins.h5"]  # the temp file is gone


def test_hdf5_errors(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.h5: file not found"):
        read_hdf5(tmp_path / "nothere.h5")
    text = write_text(tmp_path / "text.h5", "Date,P\n2000-01-01,1\n")
    with pytest.raises(DataError, match=r"text\.h5: not a readable HDF5 file"):
        read_hdf5(text)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(DataError, match=r"other\.h5: not an adjointhydro basin file .*'something-else'"):
        read_hdf5(other)

    path = write_hdf5(make_dataset(), tmp_path / "basins.h5")
    with h5py.File(path, "a") as f:
        del f["observations"]
    with pytest.raises(DataError, match=r"basins\.h5: missing dataset\(s\) \['observations'\]"):
        read_hdf5(path)

    path = write_hdf5(make_dataset(), tmp_path / "shapes.h5")
    with h5py.File(path, "a") as f:  # cut forcing to 9 of the 10 dates
        forcing = f["forcing"][:, :9]
        attrs = dict(f["forcing"].attrs)
        del f["forcing"]
        d = f.create_dataset("forcing", data=forcing)
        for k, v in attrs.items():
            d.attrs[k] = v
    with pytest.raises(DataError, match=r"shapes\.h5: forcing has 9 time steps but there are 10 dates"):
        read_hdf5(path)

    path = write_hdf5(make_dataset(), tmp_path / "version.h5")
    with h5py.File(path, "a") as f:
        f.attrs["version"] = 2
    with pytest.raises(DataError, match=r"version\.h5: layout version 2 is not supported"):
        read_hdf5(path)


# -------------------------------------------------------------------------- CSV
CSV_OK = "Date,P,PET,Q\n2000-01-01,1.0,0.5,0.2\n2000-01-02,0.0,0.6,\n2000-01-03,3.5,0.7,NA\n"


def test_read_csv_reads_units_and_missing_observations(tmp_path):
    ds = read_csv(write_text(tmp_path / "basin_a.csv", CSV_OK))
    assert ds.basins == ["basin_a"] and ds.source == "basin_a.csv"
    assert ds.forcing_names == ["P", "PET"] and ds.forcing_units == ["mm/day", "mm/day"]
    np.testing.assert_array_equal(ds.forcing[0, :, 0], [1.0, 0.0, 3.5])
    q = ds.observed("Q")[0]
    assert q[0] == 0.2 and np.isnan(q[1]) and np.isnan(q[2])  # empty cell and NA = missing
    assert str(ds.dates[0]) == "2000-01-01" and ds.n_steps == 3
    renamed = read_csv(tmp_path / "basin_a.csv", forcing=("P",), observations=("Q",),
                       rename={"Q": "Qobs"}, units={"Qobs": "m3/s"}, basin="A")
    assert renamed.observation_names == ["Qobs"] and renamed.observation_units == ["m3/s"]
    assert renamed.basins == ["A"]


def test_read_csv_errors_name_file_and_problem(tmp_path):
    path = write_text(tmp_path / "cols.csv", "Date,P,Q\n2000-01-01,1,1\n")
    with pytest.raises(DataError, match=r"cols\.csv: missing column\(s\) \['PET'\]"):
        read_csv(path)
    path = write_text(tmp_path / "nan.csv", "Date,P,PET,Q\n2000-01-01,1,1,1\n2000-01-02,NA,1,1\n2000-01-03,,1,1\n")
    with pytest.raises(DataError, match=r"nan\.csv: missing value in forcing column 'P' on 2000-01-02 \(line 3\); 2 missing"):
        read_csv(path)
    path = write_text(tmp_path / "gap.csv", "Date,P,PET,Q\n2000-01-01,1,1,1\n2000-01-02,1,1,1\n2000-01-05,1,1,1\n")
    with pytest.raises(DataError, match=r"gap\.csv: dates are not regular daily: 2000-01-02 is followed by "
                                        r"2000-01-05 \(lines 3-4\), a gap of 2 missing day"):
        read_csv(path)
    path = write_text(tmp_path / "dup.csv", "Date,P,PET,Q\n2000-01-01,1,1,1\n2000-01-01,1,1,1\n")
    with pytest.raises(DataError, match=r"dup\.csv: .*a repeated date"):
        read_csv(path)
    path = write_text(tmp_path / "date.csv", "Date,P,PET,Q\n2000-01-01,1,1,1\n01/02/2000,1,1,1\n")
    with pytest.raises(DataError, match=r"date\.csv, line 3: cannot read '01/02/2000' in column 'Date' as a date"):
        read_csv(path)
    path = write_text(tmp_path / "num.csv", "Date,P,PET,Q\n2000-01-01,1,one,1\n")
    with pytest.raises(DataError, match=r"num\.csv, line 2: cannot read 'one' in column 'PET' as a number"):
        read_csv(path)
    with pytest.raises(DataError, match=r"absent\.csv: file not found"):
        read_csv(tmp_path / "absent.csv")


def test_load_csv_folder_caravan_layout(tmp_path):
    ts = tmp_path / "timeseries" / "csv" / "camels"
    head = "date,total_precipitation_sum,potential_evaporation_sum,streamflow\n"
    days_a = np.datetime64("2000-01-01") + np.arange(10)
    days_b = np.datetime64("2000-01-03") + np.arange(10)
    write_text(ts / "camels_A.csv", head + "".join(f"{d},{i},{0.5},{i / 10}\n" for i, d in enumerate(days_a)))
    write_text(ts / "camels_B.csv", head + "".join(f"{d},{2 * i},{1.5},\n" for i, d in enumerate(days_b)))
    att = tmp_path / "attributes" / "camels"
    write_text(att / "attributes_other_camels.csv",
               "gauge_id,gauge_name,area,gauge_lat\ncamels_A,Alpha Creek,10.5,44.1\ncamels_B,Beta River,20,NaN\n")
    write_text(att / "attributes_caravan_camels.csv", "gauge_id,aridity\ncamels_B,0.7\ncamels_A,1.2\n")
    rename = {"total_precipitation_sum": "P", "potential_evaporation_sum": "PET", "streamflow": "Q"}
    with pytest.warns(DataWarning, match="camels_B: gauge_lat"):
        ds = load_csv_folder(ts, tmp_path / "attributes", forcing=("total_precipitation_sum", "potential_evaporation_sum"),
                             observations=("streamflow",), rename=rename)
    assert ds.basins == ["camels_A", "camels_B"]
    assert (str(ds.dates[0]), str(ds.dates[-1])) == ("2000-01-03", "2000-01-10")  # the common period
    assert ds.forcing_names == ["P", "PET"] and ds.observation_names == ["Q"]
    np.testing.assert_array_equal(ds.forcing_variable("P")[:, 0], [2.0, 0.0])
    assert np.isnan(ds.observed()[1]).all()
    assert ds.attribute_names == ["aridity", "area", "gauge_lat"]  # the text column is dropped
    np.testing.assert_array_equal(ds.attribute("aridity"), [1.2, 0.7])  # joined on gauge_id, not row order

    write_text(att / "attributes_other_camels.csv", "gauge_id,area\ncamels_A,10.5\n")
    with pytest.raises(DataError, match=r"attributes_other_camels\.csv: attribute table lacks basin\(s\) \['camels_B'\]"):
        load_csv_folder(ts, att, forcing=("total_precipitation_sum",), observations=("streamflow",))
    with pytest.raises(DataError, match=r"basin\(s\) \['camels_C'\] not found"):
        load_csv_folder(ts, basins=["camels_A", "camels_C"], forcing=("total_precipitation_sum",), observations=())


# --------------------------------------------------------------------------- PET
def test_hamon_hand_computed():
    # equator: omega_s = arccos(0) = pi/2 on every day, so N = 12 h exactly.
    # e_s(20 degC) = 0.611 * exp(17.27*20/257.3) = 0.611 * exp(1.342402) = 0.611 * 3.828225 = 2.339045 kPa
    # PET = 29.8 * 12 * 2.339045 / (20 + 273.2) = 836.4425 / 293.2 = 2.852805 mm/day
    assert hamon_pet(20.0, 0.0, 80) == pytest.approx(2.852805, rel=1e-5)
    # 45 N at the June solstice: about 15.4 h of daylight, 9.0 h in December
    assert daylight_hours(45.0, 172) == pytest.approx(15.43, abs=0.02)
    assert daylight_hours(45.0, 355) == pytest.approx(8.57, abs=0.03)
    # vectorised, hemispheres mirror each other, and more PET in summer
    pet = hamon_pet(np.array([10.0, 10.0]), np.array([45.0, -45.0]), np.array([172, 355]))
    assert pet.shape == (2,) and pet[0] == pytest.approx(pet[1], rel=2e-3)
    assert hamon_pet(10.0, 45.0, 172) > hamon_pet(10.0, 45.0, 355) > 0
    with pytest.raises(DataError, match="day_of_year"):
        hamon_pet(10.0, 45.0, 0)


def test_oudin_zero_below_minus_five_and_positive_above():
    t = np.array([-20.0, -5.0, -4.9, 0.0, 20.0])
    pet = oudin_pet(t, 45.0, np.full(5, 172))
    np.testing.assert_array_equal(pet[:2], 0.0)
    assert np.all(pet[2:] > 0) and np.all(np.diff(pet[2:]) > 0)
    # equator, equinox: Re ~ 37.6 * (1 + 0.033 cos(2 pi 80/365)) * cos(delta) ~ 37.9 MJ/m2/day
    assert oudin_pet(15.0, 0.0, 80) == pytest.approx(37.9 / 2.45 * 0.2, rel=0.01)


# ------------------------------------------------------------------- real data
def test_leaf_river_loads():
    ds = load_leaf_river()
    assert ds.basins == ["leaf_river"] and ds.n_steps == 11322
    assert str(ds.dates[0]) == "1957-01-01" and str(ds.dates[-1]) == "1987-12-31"
    assert ds.forcing_names == ["P", "PET"] and ds.observation_names == ["Q"]
    assert ds.forcing_units == ["mm/day", "mm/day"] and ds.observation_units == ["mm/day"]
    p, q = ds.forcing_variable("P")[0], ds.observed("Q")[0]
    assert 3.8 < p.mean() < 4.2  # about 1460 mm/year, humid south-eastern US
    assert not np.isnan(q).any()
    assert 0.25 < q.mean() / p.mean() < 0.45  # runoff ratio
    assert ds.forcing_variable("PET")[0].mean() < p.mean()
    assert ds.attribute("latitude")[0] == pytest.approx(31.8)
    f = ds.period("1980-01-01", "1980-12-31").to_forcing()
    assert f.n_steps == 366


def test_vendored_leaf_river_is_the_shared_file():
    src = shared("holmes") / "Leaf_Observations.csv"
    vendored = Path(data.__file__).parent / "datasets" / "leaf_river.csv"
    assert vendored.read_bytes() == src.read_bytes()
    assert "Université Laval" in (vendored.parent / "LICENSE_holmes").read_text(encoding="utf-8")


def test_exphydro_sample_loads():
    ds = load_exphydro_sample(shared("exphydro_sample"))
    assert ds.n_steps == 4017 and str(ds.dates[0]) == "2001-01-01"
    assert ds.forcing_names == ["P", "T", "PET"] and ds.forcing_units == ["mm/day", "degC", "mm/day"]
    assert ds.observation_names == ["Q"]
    p, q = ds.forcing_variable("P")[0], ds.observed()[0]
    assert 0.1 < np.nanmean(q) / p.mean() < 1.0
    ds.to_forcing()  # finite and non-negative where it must be


def test_au_saumon_loads_with_temperature_and_oudin_matches_its_pet():
    ds = load_holmes(shared("holmes"), "Au Saumon")
    assert ds.forcing_names == ["P", "PET", "T"] and ds.forcing_units[2] == "degC"
    assert str(ds.dates[0]) == "1975-03-01" and str(ds.dates[-1]) == "2003-12-31"
    assert ds.attribute_names == ["latitude", "elevation"]
    assert ds.attribute("latitude")[0] == pytest.approx(45.482)
    t = ds.forcing_variable("T")[0]
    assert -5 < t.mean() < 10 and t.min() < -20  # Quebec winters
    # HOLMES's E0 is an Oudin PET: our formula reproduces it to a few hundredths of a mm/day
    pet = oudin_pet(t, ds.attribute("latitude")[0], ds.day_of_year())
    e0 = ds.forcing_variable("PET")[0]
    assert np.abs(pet - e0).max() < 0.1
    assert pet.mean() == pytest.approx(e0.mean(), rel=0.01)
    with pytest.raises(DataError, match=r"Nowhere_Observations\.csv: file not found; catchments in .*'Au Saumon'"):
        load_holmes(shared("holmes"), "Nowhere")


def test_camels_two_basins_load_and_runoff_ratio_matches_attributes():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # these two basins have no NaN attributes
        ds = load_camels_us(shared("camels_us"))
    assert ds.basins == CAMELS_BASINS
    # forcing of 01547700 ends 2002-12-31, streamflow of both 2002-12-31: the common period
    assert (str(ds.dates[0]), str(ds.dates[-1]), ds.n_steps) == ("2000-01-01", "2002-12-31", 1096)
    assert ds.forcing_names[:3] == ["P", "T", "PET"] and ds.forcing_units[:3] == ["mm/day", "degC", "mm/day"]
    # first day of 01022500: 255 ft3/s over the header area 587675987 m2
    assert ds.observed()[0, 0] == pytest.approx(255 * 0.0283168 * 86400 * 1000 / 587675987, rel=1e-12)
    np.testing.assert_allclose(ds.attribute("latitude"), [44.82, 40.98])
    np.testing.assert_allclose(ds.attribute("area"), [587.675987, 114.169652])  # km2
    assert {"runoff_ratio", "p_mean", "huc_02", "elev_mean"} <= set(ds.attribute_names)
    assert "gauge_name" not in ds.attribute_names and "dom_land_cover" not in ds.attribute_names
    p, q = ds.forcing_variable("P"), ds.observed("Q")
    for i, basin in enumerate(ds.basins):
        ok = ~np.isnan(q[i])
        ratio = q[i, ok].mean() / p[i, ok].mean()
        # The attribute is the 1989-2009 runoff ratio; 2000-2002 was a dry spell in the
        # north-east (P 11-15 % below p_mean), so the ratio here is ~0.11 lower: a unit or
        # area mistake would be off by far more.
        assert ratio == pytest.approx(ds.attribute("runoff_ratio")[i], abs=0.15), basin
        assert p[i].mean() == pytest.approx(ds.attribute("p_mean")[i], rel=0.2), basin
    pet = ds.forcing_variable("PET")
    assert np.all(pet >= 0) and 1.0 < pet.mean() < 3.0
    f = ds.to_forcing(["P", "T", "PET"])
    assert f.values.shape == (2, 1096, 3)


@pytest.fixture
def camels_copy(tmp_path):
    """The two CAMELS basins in a scratch copy with HUC subfolders, for error cases."""
    src = shared("camels_us")
    root = tmp_path / "camels"
    for b, huc in zip(CAMELS_BASINS, ("01", "02")):
        f = next((src / "basin_mean_forcing" / "daymet").glob(f"{b}_*"))
        dst = root / "basin_mean_forcing" / "daymet" / huc / f.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst)
        dst = root / "usgs_streamflow" / huc / f"{b}_streamflow_qc.txt"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / "usgs_streamflow" / f"{b}_streamflow_qc.txt", dst)
    (root / "camels_attributes_v2.0").mkdir()
    return root


def test_camels_errors_and_nan_attribute_warning(camels_copy):
    root = camels_copy
    table = root / "camels_attributes_v2.0" / "camels_topo.txt"
    # gauge ids without the leading zero, a text column, and an NA
    write_text(table, "gauge_id;gauge_name;slope_mean;root_depth_50\n1022500;Narraguagus;17.8;NA\n1547700;Marsh;43.0;0.19\n")
    with pytest.warns(DataWarning, match=r"NaN attribute values kept as NaN: 01022500: root_depth_50"):
        ds = load_camels_us(root, basins=["1022500", "01547700"])  # HUC subfolders found recursively
    assert ds.basins == CAMELS_BASINS
    assert ds.attribute_names == ["latitude", "elevation", "area", "slope_mean", "root_depth_50"]
    assert np.isnan(ds.attribute("root_depth_50")[0]) and ds.attribute("slope_mean")[1] == 43.0

    with pytest.raises(DataError, match=r"basin '09999999' not found: no file '09999999_lump_\*_forcing_leap\.txt' "
                                        r"under .*basin_mean_forcing/daymet \(searched recursively\)"):
        load_camels_us(root, basins=["09999999"])
    with pytest.raises(DataError, match=r"daymet_v4: forcing folder not found; available sources: \['daymet'\]"):
        load_camels_us(root, forcing_source="daymet_v4")
    write_text(table, "gauge_id;slope_mean\n01022500;17.8\n")
    with pytest.raises(DataError, match=r"camels_topo\.txt: attribute table lacks basin\(s\) \['01547700'\]"):
        load_camels_us(root)


def test_camels_to_hdf5_round_trip(camels_copy, tmp_path):
    shutil.rmtree(camels_copy / "camels_attributes_v2.0")
    with pytest.warns(DataWarning, match="only latitude, elevation and area"):
        ds = data.camels_to_hdf5(camels_copy, tmp_path / "camels.h5", basins=["01547700"])
    back = read_hdf5(tmp_path / "camels.h5")
    assert_same(ds, back)
    assert back.attribute_names == ["latitude", "elevation", "area"]


# ------------------------------------------- CAMELS validation for regional training
def _streamflow(camels_copy: Path, basin: str) -> Path:
    return next((camels_copy / "usgs_streamflow").rglob(f"{basin}_streamflow_qc.txt"))


def test_camels_streamflow_of_another_gauge_or_repeated_dates_is_an_error(camels_copy):
    path = _streamflow(camels_copy, "01547700")
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:5] + [lines[5].replace("01547700", "01022500", 1)] + lines[6:]) + "\n")
    with pytest.raises(DataError, match=r"01547700_streamflow_qc\.txt, line 6: streamflow of gauge '01022500' "
                                        r"in the file of basin '01547700'"):
        load_camels_us(camels_copy)
    path.write_text("\n".join(lines[:10] + [lines[9]] + lines[10:]) + "\n")  # day 10 twice
    with pytest.raises(DataError, match=r"01547700_streamflow_qc\.txt, lines 10-11: streamflow dates "
                                        r"2000-01-10 then 2000-01-10, a repeated date"):
        load_camels_us(camels_copy)


def test_camels_forcing_and_streamflow_without_common_period_name_both(camels_copy):
    path = _streamflow(camels_copy, "01547700")
    lines = path.read_text().splitlines()
    # move the streamflow record 20 years later: it no longer overlaps the forcing
    shifted = [ln[:9] + str(int(ln[9:13]) + 20) + ln[13:] for ln in lines]
    path.write_text("\n".join(shifted) + "\n")
    with pytest.raises(DataError, match=r"no period common to all forcing and streamflow files .*01547700: "
                                        r"forcing 2000-01-01\.\.2002-12-31, streamflow 2020-01-01"):
        load_camels_us(camels_copy)


@pytest.mark.filterwarnings("ignore:.*no camels_attributes")
def test_camels_basin_without_observations_is_named_and_kept_as_nan(camels_copy):
    path = _streamflow(camels_copy, "01022500")
    lines = path.read_text().splitlines()
    path.write_text("\n".join(" ".join(ln.split()[:4]) + " -999.00 M" for ln in lines) + "\n")
    with pytest.warns(DataWarning, match=r"basin\(s\) \['01022500'\] have no streamflow observation .* "
                                         r"common period 2000-01-01\.\.2002-12-31"):
        ds = load_camels_us(camels_copy)
    q = ds.observed("Q")
    assert np.isnan(q[0]).all() and np.isfinite(q[1]).mean() > 0.9
    # regional training rejects it by name, before any solve
    from adjointhydro.models import exphydro
    from adjointhydro.regional import train_regional

    with pytest.raises(ValueError, match=r"1 basin\(s\) have fewer than 2 non-missing observations in the "
                                         r"training period .*'01022500' \(0\)"):
        train_regional(exphydro(), ds, attribute_names=["latitude", "elevation", "area"], epochs=1)


def test_nan_attributes_are_rejected_by_regional_training_naming_basin_and_attribute(camels_copy):
    table = camels_copy / "camels_attributes_v2.0" / "camels_topo.txt"
    write_text(table, "gauge_id;slope_mean;root_depth_50\n01022500;17.8;NA\n01547700;43.0;0.19\n")
    with pytest.warns(DataWarning, match="01022500: root_depth_50"):
        ds = load_camels_us(camels_copy)
    from adjointhydro.models import exphydro
    from adjointhydro.regional import train_regional

    with pytest.raises(ValueError, match=r"missing \(NaN\) or infinite attribute values in 1 basin\(s\): "
                                         r"basin '01022500': root_depth_50"):
        train_regional(exphydro(), ds, attribute_names=["slope_mean", "root_depth_50"], epochs=1)
    with pytest.raises(ValueError, match=r"attribute\(s\) \['aridity'\] not in the data"):
        train_regional(exphydro(), ds, attribute_names=["slope_mean", "aridity"], epochs=1)
