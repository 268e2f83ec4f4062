"""Readers from files and frames to a `SeriesDataset`.

Tables are read with polars (lazy scans of CSV/Parquet) and timestamps parsed with pandas.
Targets come out float32 ``[T]``, covariates float32 ``[C, T]``, starts as ``pd.Period``.
Every reader validates what it returns (see `tsdb.data.validate`): bad input raises a
one-line `DataError`, never a silently altered dataset. Empty cells are missing values (NaN).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import zip_longest
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl

from tsdb.data.series import Series, SeriesDataset
from tsdb.data.validate import (
    FREQ_HINT,
    TableRef,
    as_float32,
    check_no_nulls,
    parse_freq,
    parse_timestamps,
    regular_starts,
    require_columns,
    to_float,
    to_period,
    validate_dataset,
)
from tsdb.errors import DataError

Source = str | PathLike | pd.DataFrame | pl.DataFrame | pl.LazyFrame

M4_START = "1750-01-01 00:00"        # M4 has no timestamps; GluonTS uses this mock start
EXCHANGE_RATE_START = "1990-01-01"   # GluonTS's start for the LSTNet exchange_rate file
_ITEM = "__item_id"                  # item id column made up when a table holds one series


def read_long(source: Source, item_id: str | None, timestamp: str, target: str,
              covariates: list[str] | None = None, freq: str | None = None,
              name: str | None = None) -> SeriesDataset:
    """Long table (one row per item and timestamp) from a .csv/.parquet path or a DataFrame.

    ``item_id`` None reads the whole table as one series named ``name``. ``freq`` None
    infers it with pandas. Rows may come in any order; each series must cover a gap-free
    grid of ``freq`` (a missing value is a row with an empty target, not a missing row).
    Covariate columns go to ``past_covariates`` and must be complete.
    """
    covariates = list(covariates or [])
    name = name or _default_name(source)
    frame, ref = _scan(source)
    require_columns(frame.collect_schema().names(),
                    [c for c in (item_id, timestamp, target, *covariates) if c], ref)
    item_col = item_id or _ITEM
    frame = frame.select(pl.col(item_id).cast(pl.String) if item_id else pl.lit(name).alias(_ITEM),
                         timestamp, target, *covariates)
    df = to_float(_collect(frame, ref), [target, *covariates], ref, item_col)
    check_no_nulls(df, item_col, ref)
    df = df.with_columns(pl.Series(timestamp, parse_timestamps(df, timestamp, ref)))
    parts = [part.sort(timestamp) for part in df.partition_by(item_col, maintain_order=True)]
    starts = regular_starts([(f"series {p[item_col][0]!r}", _index(p[timestamp])) for p in parts],
                            freq)
    meta = {"covariates": covariates} if covariates else {}
    series = [Series(part[item_col][0], _float32(part[target]), start, start.freqstr,
                     _covariates(part, covariates), meta | _start_offset(part[timestamp], start))
              for part, start in zip(parts, starts)]
    return _dataset(name, series, meta)


def read_wide_csv(path: str | PathLike, timestamp_col: str = "date",
                  columns: list[str] | None = None, freq: str | None = None,
                  name: str | None = None) -> SeriesDataset:
    """Wide table (ETT style): a timestamp column and one series per value column.

    ``columns`` None reads every column but the timestamp; item ids are the column names.
    """
    frame, ref = _scan(path)
    available = frame.collect_schema().names()
    columns = list(columns or [c for c in available if c != timestamp_col])
    require_columns(available, [timestamp_col, *columns], ref)
    df = to_float(_collect(frame.select(timestamp_col, *columns), ref), columns, ref)
    df = df.with_columns(pl.Series(timestamp_col, parse_timestamps(df, timestamp_col, ref)))
    df = df.sort(timestamp_col, maintain_order=True)
    [start] = regular_starts([(ref.name, _index(df[timestamp_col]))], freq)
    series = [Series(col, _float32(df[col]), start, start.freqstr) for col in columns]
    return _dataset(name or _default_name(path), series)


def read_m4(train_path: str | PathLike, test_path: str | PathLike | None = None,
            freq: str = "h", name: str = "m4_hourly") -> SeriesDataset:
    """M4 competition CSVs: first column the series id (V1), then values, rows padded with
    empty cells at the end (the padding is removed; gaps inside a row stay NaN).

    With ``test_path`` each series is train followed by test (the GluonTS convention) and
    ``meta["prediction_length"]`` is the number of test columns. M4 has no timestamps:
    every series starts at the mock period ``M4_START``, as in GluonTS.
    """
    ids, train, train_ref = _m4_table(train_path)
    targets = [row[:n] for row, n in zip(train, _unpadded_lengths(train))]
    meta = {}
    if test_path is not None:
        test_ids, test, test_ref = _m4_table(test_path)
        _check_same_ids(ids, test_ids, train_ref, test_ref)
        targets = [np.concatenate([head, tail]) for head, tail in zip(targets, test)]
        meta["prediction_length"] = test.shape[1]
    start = to_period(M4_START, freq, f"dataset {name!r}")
    series = [Series(item, target, start, start.freqstr) for item, target in zip(ids, targets)]
    return _dataset(name, series, meta)


def from_gluonts(dataset: Iterable[Mapping], freq: str | None = None,
                 name: str = "gluonts") -> SeriesDataset:
    """Any iterable of GluonTS entries (``start``, ``target``, optional ``item_id`` and
    ``feat_dynamic_real`` or ``past_feat_dynamic_real`` as the covariates; a
    ``feat_dynamic_real`` longer than the target is cut to it), e.g. a ListDataset,
    PandasDataset or ``get_dataset(..).train``.

    ``freq`` is needed only when starts are not ``pd.Period``; item ids default to the
    entry's position. Other entry fields are not read.
    """
    series = [_gluonts_series(entry, position, freq) for position, entry in enumerate(dataset)]
    return _dataset(name, series)


def read_exchange_rate(path: str | PathLike, name: str = "exchange_rate") -> SeriesDataset:
    """LSTNet ``exchange_rate.txt.gz``: comma-separated, no header, one currency per column.

    Business-day frequency from the GluonTS start ``EXCHANGE_RATE_START``; item ids "0".."7".
    """
    path = _existing_file(path)
    ref = TableRef(path.name, first_line=1)
    df = _collect(pl.scan_csv(path, has_header=False, infer_schema=False), ref)
    df.columns = [str(i) for i in range(df.width)]
    df = to_float(df, df.columns, ref)
    start = to_period(EXCHANGE_RATE_START, "B", f"dataset {name!r}")
    series = [Series(col, _float32(df[col]), start, start.freqstr) for col in df.columns]
    return _dataset(name, series)


# ---------------------------------------------------------------- tables


def _scan(source: Source) -> tuple[pl.LazyFrame, TableRef]:
    """A lazy frame over ``source`` and a reference that locates its rows in messages."""
    if isinstance(source, pl.LazyFrame):
        return source, TableRef("the polars LazyFrame")
    if isinstance(source, pl.DataFrame):
        return source.lazy(), TableRef("the polars DataFrame")
    if isinstance(source, pd.DataFrame):
        return _from_pandas(source).lazy(), TableRef("the pandas DataFrame")
    path = _existing_file(source)
    if path.suffix == ".parquet":
        return pl.scan_parquet(path), TableRef(path.name)
    if path.suffix == ".csv":
        # all columns as text: numbers are parsed by `to_float`, which names bad cells
        return pl.scan_csv(path, infer_schema=False), TableRef(path.name, first_line=2)
    raise DataError(f"cannot read {path.name}: pass a .csv or .parquet file, or a pandas or "
                    "polars DataFrame")


def _from_pandas(df: pd.DataFrame) -> pl.DataFrame:
    """Polars copy of a pandas frame; a named index becomes a column, mixed-type object
    columns become text so that `to_float` can name their bad cells."""
    if any(level is not None for level in df.index.names):
        df = df.reset_index()
    text = {col: "string" for col, dtype in df.dtypes.items() if dtype == object}
    return pl.from_pandas(df.astype(text))


def _existing_file(source) -> Path:
    if not isinstance(source, (str, PathLike)):
        raise DataError(f"cannot read a {type(source).__name__}: pass a file path, a pandas "
                        "DataFrame or a polars DataFrame")
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"file not found: {path}; check the path")
    return path


def _collect(frame: pl.LazyFrame, ref: TableRef) -> pl.DataFrame:
    """Run the lazy query; a malformed file or an empty table is a `DataError`."""
    try:
        df = frame.collect()
    except pl.exceptions.PolarsError as e:
        reason = str(e).strip().splitlines()[0]
        raise DataError(f"cannot read {ref.name}: {reason}; check that it is a valid table") from e
    if df.is_empty():
        raise DataError(f"{ref.name} has no data rows; check the input")
    return df


def _default_name(source) -> str:
    return Path(source).stem if isinstance(source, (str, PathLike)) else "dataframe"


def _index(timestamps: pl.Series) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(timestamps.to_numpy())


def _start_offset(timestamps: pl.Series, start: pd.Period) -> dict:
    """``{"start_offset": Timedelta}`` when the first timestamp lies inside its period (an hourly
    series stamped at :30), so forecasts keep the series' own clock; else ``{}``."""
    offset = pd.Timestamp(timestamps[0]) - start.start_time
    return {"start_offset": offset} if offset else {}


def _float32(column: pl.Series) -> np.ndarray:
    with np.errstate(over="ignore"):   # beyond float32 becomes inf, which validation names
        return column.to_numpy().astype(np.float32)


def _covariates(part: pl.DataFrame, columns: list[str]) -> np.ndarray | None:
    if not columns:
        return None
    return part.select(columns).to_numpy().T.astype(np.float32, order="C")


def _dataset(name: str, series: list[Series], meta: dict | None = None) -> SeriesDataset:
    """Validated dataset; the frequency is the series', seasonality from GluonTS."""
    freq = series[0].freq if series else ""
    dataset = validate_dataset(SeriesDataset(name, series, freq, meta=meta or {}))
    from gluonts.time_feature import get_seasonality   # after validation: errors answer without it
    dataset.season_length = get_seasonality(freq)
    return dataset


# ---------------------------------------------------------------- M4 and GluonTS


def _m4_table(path) -> tuple[list[str], np.ndarray, TableRef]:
    """Series ids (first column) and the values as a float32 ``[N, width]`` matrix."""
    frame, ref = _scan(path)
    df = _collect(frame, ref)
    id_col, value_cols = df.columns[0], df.columns[1:]
    check_no_nulls(df, id_col, ref)
    values = to_float(df, value_cols, ref, item_col=id_col).select(value_cols).to_numpy()
    return df[id_col].cast(pl.String).to_list(), values.astype(np.float32), ref


def _unpadded_lengths(values: np.ndarray) -> np.ndarray:
    """Per row, the position after its last non-NaN value (0 for an all-empty row)."""
    observed = ~np.isnan(values)
    last = values.shape[1] - np.argmax(observed[:, ::-1], axis=1)
    return np.where(observed.any(axis=1), last, 0)


def _check_same_ids(train_ids: list[str], test_ids: list[str], train: TableRef,
                    test: TableRef) -> None:
    for row, (want, got) in enumerate(zip_longest(train_ids, test_ids)):
        if want != got:
            raise DataError(f"{test.at(row)} holds series {got!r} but {train.at(row)} holds "
                            f"{want!r}; pass the test file that matches the train file")


def _gluonts_series(entry: Mapping, position: int, freq: str | None) -> Series:
    item_id = str(entry.get("item_id", position))
    who = f"series {item_id!r}"
    if "start" not in entry or "target" not in entry:
        raise DataError(f"{who}: a GluonTS entry needs 'start' and 'target', got fields "
                        f"{sorted(entry)}; fix the dataset")
    start = _gluonts_start(entry["start"], freq, who)
    target = as_float32(entry["target"], who)
    if target.ndim != 1:
        raise DataError(f"{who}: target has shape {target.shape}; tsdb models univariate "
                        "series: make one entry per variable")
    field = next((f for f in ("feat_dynamic_real", "past_feat_dynamic_real") if entry.get(f) is not None), None)
    covariates = None
    if field is not None:
        covariates = as_float32(entry[field], who, field)
        if covariates.ndim == 2 and covariates.shape[1] > len(target):   # known-future part of a test entry
            covariates = covariates[:, : len(target)]
    return Series(item_id, target, start, start.freqstr, covariates)


def _gluonts_start(start, freq: str | None, who: str) -> pd.Period:
    if isinstance(start, pd.Period):
        if freq is None or parse_freq(freq) == start.freq:
            return start
        raise DataError(f"{who}: start {start} has frequency {start.freqstr!r} but freq={freq!r} "
                        "was passed; drop freq= or resample the data")
    if freq is None:
        raise DataError(f"{who}: start {start!r} carries no frequency; pass freq= ({FREQ_HINT})")
    return to_period(start, freq, who)
