"""Checks that turn bad input into one clear `DataError` line.

Every message names the series (or the column and row of a table) and says how to fix
the input. Nothing here drops or alters data: a check passes, or it raises.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import polars as pl
from pandas.tseries.frequencies import to_offset

from tsdb.data.series import Series, SeriesDataset
from tsdb.errors import DataError

FREQ_HINT = "a pandas alias such as 'h', '30min', 'D' or 'B'"
# Largest |value| accepted: the model scales a series by its own statistics in float32, and
# a forecast of a series of such values (level +- a few hundred scales) must stay below the
# float32 maximum 3.4e38.
MAX_ABS_VALUE = 1e30


@dataclass(frozen=True)
class TableRef:
    """A table's name, to point users at a row: text files by line, frames by row position."""

    name: str
    first_line: int | None = None  # text line holding data row 0 (2 below a header)

    def at(self, row: int) -> str:
        if self.first_line is None:
            return f"row {row} of {self.name}"
        return f"line {row + self.first_line} of {self.name}"


# ---------------------------------------------------------------- series and datasets


def validate_series(series: Series, min_length: int | None = None) -> Series:
    """Return ``series`` unchanged if a model can use it, else raise a one-line `DataError`.

    Checks: Period start, float 1-D target, not empty, no inf, not all NaN (NaN alone is a missing
    value), complete and finite covariates of shape ``[C, T]``, and, when ``min_length``
    (context_length + horizon) is given, at least that many time steps.
    """
    who = f"series {series.item_id!r}"
    if not isinstance(series.start, pd.Period):
        raise DataError(f"{who}: start must be a pd.Period, got {type(series.start).__name__}; "
                        "build it with pd.Period(timestamp, freq)")
    target = series.target
    if not isinstance(target, np.ndarray) or target.dtype.kind != "f" or target.ndim != 1:
        kind = getattr(target, "dtype", type(target).__name__)
        raise DataError(f"{who}: target must be a 1-D float array, got {kind} with shape "
                        f"{np.shape(target)}; convert it with np.asarray(values, dtype=np.float32)")
    if len(series) == 0:
        raise DataError(f"{who} has no observations; drop it or check the item_id and "
                        "target columns")
    check_values(who, target, series.start)
    if np.isnan(target).all():
        raise DataError(f"{who}: all {len(series)} values are missing (NaN); drop the series")
    if series.past_covariates is not None:
        _check_covariates(who, series)
    if min_length is not None and len(series) < min_length:
        raise DataError(f"{who}: {len(series)} observations, but the model needs at least {min_length}; "
                        "forecast a shorter horizon (--horizon, model.horizon) or use a shorter "
                        "model.context_length, or drop the series")
    return series


def validate_dataset(dataset: SeriesDataset, min_length: int | None = None) -> SeriesDataset:
    """`validate_series` on every series, plus: not empty, unique item ids, one frequency."""
    if not dataset.series:
        raise DataError(f"dataset {dataset.name!r} has no series; check the input source")
    seen: set[str] = set()
    for series in dataset.series:
        validate_series(series, min_length)
        if series.item_id in seen:
            raise DataError(f"series {series.item_id!r} appears twice in dataset "
                            f"{dataset.name!r}; give every series a unique item_id")
        seen.add(series.item_id)
        if series.freq != dataset.freq:
            raise DataError(f"series {series.item_id!r} has frequency {series.freq!r} but dataset "
                            f"{dataset.name!r} has {dataset.freq!r}; resample it or load it apart")
    return dataset


def check_values(who: str, values: np.ndarray, start: pd.Period | None = None) -> None:
    """Raise naming the first infinite value, or one beyond ``MAX_ABS_VALUE``; NaN (missing) is fine.
    ``start`` dates the position in the message (the values of a series from ``start``)."""
    _check_no_inf(who, "value", values, start)
    with np.errstate(invalid="ignore"):
        huge = np.abs(values) > MAX_ABS_VALUE
    if huge.any():
        pos = int(huge.argmax())
        raise DataError(f"{who}: value {values[pos]:.3g} at {_where(start, pos)} is beyond "
                        f"+-{MAX_ABS_VALUE:.0e}, too large for the model's float32 scaling; rescale the series "
                        "(e.g. divide it by a power of ten) or replace the outlier with NaN (= missing)")


def _where(start: pd.Period | None, pos: int) -> str:
    return f"position {pos}" if start is None else f"{start + pos} (position {pos})"


def _check_no_inf(who: str, what: str, values: np.ndarray, start: pd.Period | None) -> None:
    infinite = np.isinf(values)
    if infinite.any():
        pos = int(infinite.argmax())
        raise DataError(f"{who}: infinite {what} at {_where(start, pos)}; values beyond +-3.4e38 overflow "
                        "float32 too; replace it with NaN (= missing) or fix the source")


def require_covariates(series: Series, num_covariates: int) -> np.ndarray:
    """The series' covariates ``[num_covariates, T]``, complete and finite, or a `DataError`
    naming the series."""
    who = f"series {series.item_id!r}"
    cov = series.past_covariates
    if cov is None:
        raise DataError(f"{who} has no covariates, but the model takes {num_covariates}; load them with "
                        f"the data (read_long(..., covariates=[...])) or set model.num_covariates: 0")
    _check_covariates(who, series)
    if cov.shape[0] != num_covariates:
        raise DataError(f"{who} has {cov.shape[0]} covariate(s), but the model takes {num_covariates}; "
                        "set model.num_covariates to the number of covariate columns")
    return cov


def _check_covariates(who: str, series: Series) -> None:
    cov = series.past_covariates
    if cov.ndim != 2 or cov.shape[1] != len(series) or cov.dtype.kind != "f":
        raise DataError(f"{who}: past_covariates must be a float array [C, {len(series)}], got "
                        f"{cov.dtype} with shape {cov.shape}; align covariates with the target")
    names = series.meta.get("covariates") or [str(c) for c in range(cov.shape[0])]
    for name, values in zip(names, cov):
        if not np.isfinite(values).all():
            pos = int((~np.isfinite(values)).argmax())
            raise DataError(f"{who}: covariate {name!r} is {values[pos]} at {series.start + pos} "
                            f"(position {pos}); fill it in: covariates must be complete and finite")


# ---------------------------------------------------------------- table columns


def require_columns(available: list[str], needed: list[str], ref: TableRef) -> None:
    """Raise naming the first column of ``needed`` that the table lacks."""
    missing = [c for c in needed if c not in available]
    if missing:
        shown = ", ".join(available[:12]) + (", ..." if len(available) > 12 else "")
        raise DataError(f"column {missing[0]!r} not found in {ref.name} (columns: {shown}); "
                        "pass the right column name")


def check_no_nulls(df: pl.DataFrame, column: str, ref: TableRef) -> None:
    """Raise naming the first empty cell of a key column (item id or timestamp)."""
    nulls = df[column].is_null().arg_true()
    if len(nulls):
        raise DataError(f"column {column!r} is empty at {ref.at(nulls[0])}; fill it in or "
                        "drop the row")


def to_float(df: pl.DataFrame, columns: list[str], ref: TableRef,
             item_col: str | None = None) -> pl.DataFrame:
    """Cast ``columns`` to Float64; raise naming the column and first cell that is no number.

    Empty cells become null (= missing); numbers written as text are parsed.
    """
    return df.with_columns(_float_column(df, col, ref, item_col) for col in columns)


def _float_column(df: pl.DataFrame, col: str, ref: TableRef, item_col: str | None) -> pl.Series:
    values = df[col]
    if values.dtype.is_numeric() or values.dtype == pl.Null:
        return values.cast(pl.Float64)
    if values.dtype != pl.String:
        raise DataError(f"column {col!r} of {ref.name} holds {values.dtype} values, not numbers; "
                        "convert it to numbers")
    text = values.str.strip_chars()
    parsed = text.cast(pl.Float64, strict=False)
    bad = (parsed.is_null() & (text != "")).arg_true()
    if len(bad):
        row = bad[0]
        series = f" (series {df[item_col][row]!r})" if item_col else ""
        raise DataError(f"column {col!r} has a non-numeric value {values[row]!r} at "
                        f"{ref.at(row)}{series}; fix the cell or leave it empty (empty = missing)")
    return parsed


def parse_timestamps(df: pl.DataFrame, column: str, ref: TableRef) -> np.ndarray:
    """Timestamps of ``column`` as naive datetime64[ns]; zoned times are converted to UTC.

    Raises naming the first empty cell or the first value that is not a timestamp.
    """
    values = df[column]
    if values.dtype != pl.String and not values.dtype.is_temporal():
        raise DataError(f"column {column!r} of {ref.name} holds {values.dtype} values, not "
                        "timestamps; convert it to dates/times")
    check_no_nulls(df, column, ref)
    raw = values.to_pandas()
    # ISO 8601 at any precision ("2024-01-01" beside "2024-01-01 00:30:00") is one format; else
    # the format pandas infers from the first value. The reading with fewer failures wins, so a
    # message names the odd value out.
    parsed = pd.to_datetime(raw, errors="coerce", utc=True, format="ISO8601")
    if parsed.isna().any() and values.dtype == pl.String:
        inferred = pd.to_datetime(raw, errors="coerce", utc=True)
        if inferred.isna().sum() < parsed.isna().sum():
            parsed = inferred
    parsed = parsed.dt.tz_convert(None)
    bad = np.flatnonzero(parsed.isna().to_numpy())
    if len(bad):
        raise DataError(f"column {column!r} has a value {values[int(bad[0])]!r} that is not a "
                        f"timestamp at {ref.at(int(bad[0]))}; write all timestamps in one format")
    return parsed.to_numpy()


def as_float32(values, who: str, what: str = "target") -> np.ndarray:
    """``values`` as a float32 array; raise naming the series if they are not numbers."""
    try:
        return np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise DataError(f"{who}: {what} holds values that are not numbers ({e}); convert them "
                        "to floats") from e


# ---------------------------------------------------------------- timestamps and frequency


def parse_freq(freq: str) -> pd.DateOffset:
    """A pandas offset for ``freq``, or a `DataError` naming the bad alias."""
    try:
        return to_offset(freq)
    except (TypeError, ValueError):
        raise DataError(f"unknown frequency {freq!r}; use {FREQ_HINT}") from None


def to_period(value, freq: str, who: str) -> pd.Period:
    """``value`` (a timestamp or string) as a `pd.Period` of ``freq``."""
    offset = parse_freq(freq)
    try:
        return pd.Period(value, freq=offset)
    except (TypeError, ValueError) as e:
        raise DataError(f"{who}: start {value!r} is not a {freq!r} period ({e}); pass a valid "
                        f"start and {FREQ_HINT}") from e


def regular_starts(indexes: list[tuple[str, pd.DatetimeIndex]],
                   freq: str | None = None) -> list[pd.Period]:
    """Start periods of sorted timestamp indexes that each form a gap-free grid of one freq.

    ``indexes`` pairs a label naming the series ("series 'A'") with its sorted timestamps.
    ``freq`` None infers it with pandas from the first series where that works.
    Raises on duplicate timestamps, on a missing or off-grid timestamp (naming it), and
    when no frequency can be inferred.
    """
    for who, index in indexes:
        _check_unique(who, index)
    offset = parse_freq(freq) if freq else _infer_freq(indexes)
    return [_grid_start(who, index, offset) for who, index in indexes]


def _check_unique(who: str, index: pd.DatetimeIndex) -> None:
    duplicated = index.duplicated()
    if duplicated.any():
        raise DataError(f"{who}: duplicate timestamp {index[duplicated.argmax()]}; keep one row "
                        "per timestamp")


def _infer_freq(indexes: list[tuple[str, pd.DatetimeIndex]]) -> pd.DateOffset:
    for _, index in indexes:
        inferred = pd.infer_freq(index) if len(index) >= 3 else None
        if inferred:
            return to_offset(inferred)
    raise DataError(f"cannot infer the frequency of {indexes[0][0]}: fewer than 3 timestamps or "
                    f"uneven spacing; pass freq= ({FREQ_HINT})")


def _grid_start(who: str, index: pd.DatetimeIndex, offset: pd.DateOffset) -> pd.Period:
    expected = pd.date_range(index[0], periods=len(index), freq=offset)
    off_grid = np.flatnonzero(expected.values != index.values)
    if len(off_grid):
        pos = off_grid[0]
        raise DataError(f"{who}: timestamp {index[pos]} breaks the regular {offset.freqstr!r} grid "
                        f"(expected {expected[pos]}); add missing timestamps as rows with an "
                        "empty target (missing values are fine) or pass the right freq")
    try:
        return expected[:1].to_period()[0]
    except (TypeError, ValueError) as e:
        raise DataError(f"{who}: frequency {offset.freqstr!r} has no pandas Period ({e}); use "
                        f"{FREQ_HINT}") from e
