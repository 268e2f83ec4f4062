"""Behaviour of the data layer: readers on the real benchmark files, the dataset registry,
and the one-line errors for bad input."""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest
from gluonts.dataset.common import ListDataset

from tsdb.data import (
    Series,
    describe,
    from_gluonts,
    list_datasets,
    load_dataset,
    read_exchange_rate,
    read_long,
    read_m4,
    read_wide_csv,
    validate_series,
)
from tsdb.data import registry
from tsdb.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
ETT_COLUMNS = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/datasets is missing")


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    return str(info.value)


@pytest.fixture(autouse=True)
def no_user_data_dir(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)


# ---------------------------------------------------------------- real files


@pytest.fixture(scope="module")
def m4():
    return read_m4(SHARED / "m4_hourly_train.csv", SHARED / "m4_hourly_test.csv")


@needs_shared
def test_m4_hourly_is_train_then_test(m4):
    train = read_m4(SHARED / "m4_hourly_train.csv")
    assert len(m4) == len(train) == 414
    assert m4.series[0].item_id == "H1" and m4.series[-1].item_id == "H414"
    train_lengths = np.array([len(s) for s in train])
    assert train_lengths.min() == 700 and train_lengths.max() == 960
    assert [len(s) for s in m4] == list(train_lengths + 48)
    assert m4.meta["prediction_length"] == 48
    assert (m4.freq, m4.season_length) == ("h", 24)
    h1 = m4.series[0]
    assert h1.target.dtype == np.float32 and not np.isnan(h1.target).any()
    assert h1.start == pd.Period("1750-01-01 00:00", "h")
    np.testing.assert_array_equal(h1.target[:len(train.series[0])], train.series[0].target)
    assert h1.target[len(train.series[0])] == 619  # first test value of H1


@needs_shared
def test_etth1_wide_csv():
    ds = read_wide_csv(SHARED / "ETTh1.csv", name="etth1")
    assert [s.item_id for s in ds] == ETT_COLUMNS
    assert all(len(s) == 17420 and s.target.dtype == np.float32 for s in ds)
    assert ds.series[0].start == pd.Period("2016-07-01 00:00", "h")
    assert (ds.freq, ds.season_length) == ("h", 24)
    assert ds.series[-1].target[0] == np.float32(30.5310001373291)


@needs_shared
def test_exchange_rate():
    ds = read_exchange_rate(SHARED / "exchange_rate.txt.gz")
    assert [s.item_id for s in ds] == [str(i) for i in range(8)]
    assert all(len(s) == 7588 for s in ds)
    assert (ds.freq, ds.season_length) == ("B", 5)
    assert ds.series[0].start == pd.Period("1990-01-01", "B")
    assert ds.series[0].target[0] == np.float32(0.7855)


def test_vic_elec_loads_from_the_package():
    ds = load_dataset("vic_elec")
    [s] = ds.series
    assert (ds.freq, ds.season_length, len(s)) == ("30min", 48, 52608)
    assert s.start == pd.Period("2011-12-31 13:00", "30min")
    assert s.past_covariates.shape == (1, 52608) and s.past_covariates.dtype == np.float32
    assert ds.meta["covariates"] == ["Temperature"] and ds.meta["prediction_length"] == 48


# ---------------------------------------------------------------- registry


def test_list_and_describe():
    assert [d["name"] for d in list_datasets()] == ["etth1", "exchange_rate", "m4_hourly",
                                                    "vic_elec"]
    card = describe("etth1")
    assert card["files"]["data"]["url"].startswith("https://raw.githubusercontent.com/")
    assert (card["frequency"], card["season_length"]) == ("h", 24)


def test_unknown_dataset_lists_known_names():
    assert error_of(load_dataset, "etth2") == (
        "unknown dataset 'etth2'; known datasets: etth1, exchange_rate, m4_hourly, vic_elec")


@needs_shared
def test_cards_match_the_shared_files():
    for card in map(describe, ["etth1", "exchange_rate", "m4_hourly"]):
        for spec in card["files"].values():
            assert registry.check_sha256(SHARED / spec["name"], spec["sha256"])


@needs_shared
def test_load_dataset_carries_the_protocol(m4):
    etth1 = load_dataset("etth1")
    assert len(etth1) == 7 and etth1.meta["lookback"] == 512
    assert etth1.meta["splits"] == {"train": (0, 8640), "val": (8128, 11520),
                                    "test": (11008, 14400)}
    m4_loaded = load_dataset("m4_hourly")
    assert m4_loaded.meta["prediction_length"] == 48
    np.testing.assert_array_equal(m4_loaded.series[7].target, m4.series[7].target)


@needs_shared
@pytest.mark.parametrize("how", ["root", "env"])
def test_root_and_env_dir_come_before_the_shared_folder(tmp_path, monkeypatch, how):
    shutil.copy(SHARED / "exchange_rate.txt.gz", tmp_path)
    if how == "env":
        monkeypatch.setenv(registry.ENV_VAR, str(tmp_path))
    ds = load_dataset("exchange_rate", root=tmp_path if how == "root" else None)
    assert ds.meta["files"]["data"] == str(tmp_path / "exchange_rate.txt.gz")
    assert ds.meta["prediction_length"] == 30


def test_a_damaged_local_file_is_refused(tmp_path):
    (tmp_path / "exchange_rate.txt.gz").write_bytes(b"not the data")
    message = error_of(load_dataset, "exchange_rate", root=tmp_path)
    assert message.startswith(f"{tmp_path / 'exchange_rate.txt.gz'}: sha256 is ")
    assert message.endswith("replace it with the original file, or delete it to download it "
                            "again")


@needs_shared
def test_download_checks_sha256(tmp_path):
    source = SHARED / "exchange_rate.txt.gz"
    sha = describe("exchange_rate")["files"]["data"]["sha256"]
    dest = registry.download(source.as_uri(), tmp_path / "cache" / source.name, sha)
    assert dest.read_bytes() == source.read_bytes()
    message = error_of(registry.download, source.as_uri(), tmp_path / "other.gz", "0" * 64)
    assert message.startswith(f"download of {source.as_uri()} has sha256 {sha}, the dataset card")
    assert list(tmp_path.iterdir()) == [tmp_path / "cache"]  # nothing half-written is kept


def test_offline_without_local_files_is_one_clear_line(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(registry, "SHARED_DIR", tmp_path / "absent")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("TSDB_DATA_DIR", raising=False)
    monkeypatch.delenv("TSDB_OFFLINE")                       # the suite's guard; here the attempt is the point
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    url = describe("etth1")["files"]["data"]["url"]
    assert error_of(load_dataset, "etth1") == (
        f"cannot download ETTh1.csv from {url} (<urlopen error no network>); if offline, put the "
        "file in $TSDB_DATA_DIR or pass root=")


def test_downloads_are_off_under_tsdb_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "SHARED_DIR", tmp_path / "absent")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("TSDB_DATA_DIR", raising=False)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("downloaded under TSDB_OFFLINE"))
    message = error_of(load_dataset, "etth1")
    assert "downloads are off ($TSDB_OFFLINE)" in message and "\n" not in message


# ---------------------------------------------------------------- long tables


def long_table() -> pd.DataFrame:
    """Two hourly series, rows shuffled, one missing value."""
    return pd.DataFrame({
        "id": ["b", "a", "b", "a", "a", "b"],
        "time": ["2020-01-01 02:00", "2020-01-01 00:00", "2020-01-01 00:00",
                 "2020-01-01 02:00", "2020-01-01 01:00", "2020-01-01 01:00"],
        "y": [6.0, 1.0, 4.0, 3.0, np.nan, 5.0],
        "temp": [16.0, 11.0, 14.0, 13.0, 12.0, 15.0],
    })


def read_table(source, **kwargs):
    return read_long(source, "id", "time", "y", covariates=["temp"], **kwargs)


def as_tuples(ds):
    """Everything a series holds, with NaN as None so that equal datasets compare equal."""
    def plain(array):
        return np.where(np.isnan(array), None, array).tolist()

    return [(s.item_id, s.start, s.freq, plain(s.target), plain(s.past_covariates)) for s in ds]


def test_long_table_from_pandas():
    ds = read_table(long_table(), name="toy")
    b, a = ds.series  # in order of first appearance
    assert (b.item_id, a.item_id, ds.freq, ds.season_length) == ("b", "a", "h", 24)
    assert a.start == pd.Period("2020-01-01 00:00", "h")
    np.testing.assert_array_equal(a.target, np.array([1.0, np.nan, 3.0], dtype=np.float32))
    np.testing.assert_array_equal(b.past_covariates, [[14.0, 15.0, 16.0]])
    assert a.target.dtype == b.past_covariates.dtype == np.float32


def test_pandas_and_polars_frames_give_the_same_dataset():
    frame = long_table()
    assert as_tuples(read_table(frame)) == as_tuples(read_table(pl.from_pandas(frame)))


def test_parquet_and_csv_round_trip(tmp_path):
    frame = long_table()
    frame.to_parquet(tmp_path / "toy.parquet")
    frame.to_csv(tmp_path / "toy.csv", index=False)
    expected = as_tuples(read_table(frame))
    assert as_tuples(read_table(tmp_path / "toy.parquet")) == expected
    assert as_tuples(read_table(str(tmp_path / "toy.csv"), freq="h")) == expected


def test_one_series_without_item_column():
    frame = long_table().query("id == 'a'")
    [s] = read_long(frame, None, "time", "y", name="solo").series
    assert s.item_id == "solo" and len(s) == 3 and s.past_covariates is None


def write_csv(tmp_path, text: str) -> Path:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    return path


def test_non_numeric_value_names_column_line_and_series(tmp_path):
    path = write_csv(tmp_path, "id,time,y\nA,2020-01-01 00:00,1\nA,2020-01-01 01:00,abc\n"
                               "A,2020-01-01 02:00,3\n")
    assert error_of(read_long, path, "id", "time", "y") == (
        "column 'y' has a non-numeric value 'abc' at line 3 of bad.csv (series 'A'); fix the cell "
        "or leave it empty (empty = missing)")


def test_empty_cell_is_a_missing_value(tmp_path):
    path = write_csv(tmp_path, "id,time,y\nA,2020-01-01 00:00,1\nA,2020-01-01 01:00,\n"
                               "A,2020-01-01 02:00,3\n")
    assert np.isnan(read_long(path, "id", "time", "y").series[0].target[1])


def frame_with(**changes) -> pd.DataFrame:
    frame = pd.DataFrame({"id": "A", "time": pd.date_range("2020-01-01", periods=4, freq="h"),
                          "y": [1.0, 2.0, 3.0, 4.0]})
    for column, (row, value) in changes.items():
        frame.loc[row, column] = value
    return frame


def test_duplicate_timestamp():
    frame = frame_with(time=(2, pd.Timestamp("2020-01-01 01:00")))
    assert error_of(read_long, frame, "id", "time", "y") == (
        "series 'A': duplicate timestamp 2020-01-01 01:00:00; keep one row per timestamp")


def test_missing_row_is_irregular():
    frame = frame_with().drop(index=2)
    assert error_of(read_long, frame, "id", "time", "y", freq="h") == (
        "series 'A': timestamp 2020-01-01 03:00:00 breaks the regular 'h' grid (expected "
        "2020-01-01 02:00:00); add missing timestamps as rows with an empty target (missing "
        "values are fine) or pass the right freq")


def test_off_grid_timestamp_is_irregular():
    frame = frame_with(time=(3, pd.Timestamp("2020-01-01 03:17")))
    assert error_of(read_long, frame, "id", "time", "y", freq="h") == (
        "series 'A': timestamp 2020-01-01 03:17:00 breaks the regular 'h' grid (expected "
        "2020-01-01 03:00:00); add missing timestamps as rows with an empty target (missing "
        "values are fine) or pass the right freq")


def test_frequency_that_cannot_be_inferred():
    assert error_of(read_long, frame_with().drop(index=2), "id", "time", "y") == (
        "cannot infer the frequency of series 'A': fewer than 3 timestamps or uneven spacing; "
        "pass freq= (a pandas alias such as 'h', '30min', 'D' or 'B')")


def test_unknown_frequency():
    assert error_of(read_long, frame_with(), "id", "time", "y", freq="hourly") == (
        "unknown frequency 'hourly'; use a pandas alias such as 'h', '30min', 'D' or 'B'")


def test_all_missing_series():
    frame = frame_with().assign(y=np.nan)
    assert error_of(read_long, frame, "id", "time", "y") == (
        "series 'A': all 4 values are missing (NaN); drop the series")


def test_infinite_value():
    assert error_of(read_long, frame_with(y=(1, np.inf)), "id", "time", "y") == (
        "series 'A': infinite value at 2020-01-01 01:00 (position 1); values beyond +-3.4e38 overflow "
        "float32 too; replace it with NaN (= missing) or fix the source")


def test_missing_covariate():
    frame = frame_with().assign(temp=[1.0, np.nan, 3.0, 4.0])
    assert error_of(read_long, frame, "id", "time", "y", ["temp"]) == (
        "series 'A': covariate 'temp' is nan at 2020-01-01 01:00 (position 1); fill it in: "
        "covariates must be complete and finite")


def test_bad_timestamp_and_missing_column(tmp_path):
    path = write_csv(tmp_path, "id,time,y\nA,2020-01-01 00:00,1\nA,tomorrow,2\n")
    assert error_of(read_long, path, "id", "time", "y") == (
        "column 'time' has a value 'tomorrow' that is not a timestamp at line 3 of bad.csv; "
        "write all timestamps in one format")
    assert error_of(read_long, path, "id", "date", "y") == (
        "column 'date' not found in bad.csv (columns: id, time, y); pass the right column name")


def test_empty_table(tmp_path):
    assert error_of(read_long, write_csv(tmp_path, "id,time,y\n"), "id", "time", "y") == (
        "bad.csv has no data rows; check the input")


# ---------------------------------------------------------------- series, M4, GluonTS


def make_series(values, item_id="H12") -> Series:
    return Series(item_id, np.asarray(values, dtype=np.float32), pd.Period("2020-01-01", "h"), "h")


def test_validate_series_empty_and_too_short():
    assert error_of(validate_series, make_series([])) == (
        "series 'H12' has no observations; drop it or check the item_id and target columns")
    assert error_of(validate_series, make_series(np.ones(37)), min_length=384) == (
        "series 'H12': 37 observations, but the model needs at least 384; forecast a shorter horizon "
        "(--horizon, model.horizon) or use a shorter model.context_length, or drop the series")
    series = make_series(np.ones(384))
    assert validate_series(series, min_length=384) is series


def test_m4_test_file_must_match_train_file(tmp_path):
    train = write_csv(tmp_path, '"V1","V2","V3","V4"\n"H1","1","2",""\n"H2","1","2","3"\n')
    test = tmp_path / "test.csv"
    test.write_text('"V1","V2"\n"H2","9"\n"H1","9"\n')
    assert error_of(read_m4, train, test) == (
        "line 2 of test.csv holds series 'H2' but line 2 of bad.csv holds 'H1'; pass the test "
        "file that matches the train file")
    test.write_text('"V1","V2"\n"H1","9"\n"H2","9"\n')
    assert [s.target.tolist() for s in read_m4(train, test)] == [[1, 2, 9], [1, 2, 3, 9]]


def test_gluonts_round_trip():
    ds = read_table(long_table())
    entries = ListDataset(ds.to_gluonts(), freq="h")
    assert as_tuples(from_gluonts(entries)) == as_tuples(ds)


def test_gluonts_bad_entries():
    assert error_of(from_gluonts, [{"start": "2020-01-01", "target": [1.0, 2.0]}]) == (
        "series '0': start '2020-01-01' carries no frequency; pass freq= (a pandas alias such as "
        "'h', '30min', 'D' or 'B')")
    message = error_of(from_gluonts, [{"start": "2020", "target": [1.0, "x"], "item_id": "s"}],
                       freq="D")
    assert message.startswith("series 's': target holds values that are not numbers (")
    assert error_of(from_gluonts, [{"start": "2020", "target": np.ones((2, 5))}], freq="D") == (
        "series '0': target has shape (2, 5); tsdb models univariate series: make one entry per "
        "variable")
