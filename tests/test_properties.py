"""Property-based tests (hypothesis): tables and NDJSON streams with faults in them.

Tables go through ``tsdb.data.read_long`` and ``tsdb forecast``'s own entry point
(``tsdb.cli.forecast.forecast_csv``, with ``--run`` on a tiny model, and ``prepare`` for the path
that would train); streams through ``tsdb stream``'s loop (``tsdb.cli.stream.run_stream``) on
the tiny model's ONNX export. Faults: empty tables and series, NaN, +-inf, huge (1e20 .. 1e300,
-1e39) and tiny (1e-7 .. 5e-45) values, constant series, duplicate, out-of-order, missing and
off-grid timestamps, mixed and unparseable timestamp formats, :30 offsets, unicode and numeric
ids, malformed JSON, non-object records, missing fields, null/NaN readings, resets.

Every example must end in a clean one-line error (``DataError``/``TsdbError`` for a table, an
error record for a stream line) or in finite output; never another exception, a partial file or
a bare NaN, and a bad record never changes another series' forecasts. The example counts are
fixed (derandomized, so the suite is the same on every run); see the number of cases with
``pytest tests/test_properties.py --hypothesis-show-statistics``.
"""

from __future__ import annotations

import io
import json
import math
import re
from argparse import Namespace

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tsdb.data import read_long
from tsdb.data.validate import MAX_ABS_VALUE
from tsdb.errors import DataError, TsdbError
from tsdb.cli.forecast import forecast_csv, prepare
from tsdb.cli.stream import run_stream

from conftest import TINY_MODEL

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
H = TINY_MODEL["horizon"]

SPECIAL = [math.nan, math.inf, -math.inf, 1e20, 1e30, 1e31, 1e300, -1e39, 1e-7, 1e-30, 5e-45, 0.0, -0.0]
IDS = st.one_of(st.sampled_from(["a", "b", "é", "日本", "a b", "x,y", '"q"', "", " "]),
                st.text(min_size=1, max_size=4), st.integers(-5, 5).map(str))
FREQS = {"h": pd.Timedelta(hours=1), "30min": pd.Timedelta(minutes=30), "D": pd.Timedelta(days=1)}


def one_line(message: str) -> bool:
    return "\n" not in message and len(message) > 10


def refused(error: Exception) -> None:
    """An error is fine when it is one line; it is counted in hypothesis' statistics."""
    assert one_line(str(error)), str(error)
    event(outcome(error))


def outcome(error: Exception) -> str:
    """A short label of an error for hypothesis' statistics (its first words, no names or values)."""
    text = re.sub(r"^series .*?: ", "", str(error))
    return "refused: " + " ".join(w for w in text.split()[:4] if not re.search(r"[\d'/]", w))


# ---------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------

@st.composite
def tables(draw):
    """A long table (id, ts, y) as a pandas DataFrame with faults, and the freq to pass (or None)."""
    freq = draw(st.sampled_from(list(FREQS)))
    step = FREQS[freq]
    faulty = draw(st.booleans())     # half the tables get faults; the others are valid or too small
    rows = []
    for _ in range(draw(st.integers(0, 4) if faulty else st.integers(1, 4))):
        item = draw(IDS)
        n = draw(st.integers(0, 60))
        level = draw(st.sampled_from([1e-7, 1e-3, 1.0, 100.0, 1e6, 1e20, -5.0]))
        constant = draw(st.booleans())
        t = np.arange(n)
        y = level * np.ones(n) if constant else level * (1 + 0.1 * np.sin(t / 3) + 0.01 * t)
        for _ in range(draw(st.sampled_from([0, 0, 1, 2])) if faulty else 0):   # special values
            if n:
                y[draw(st.integers(0, n - 1))] = draw(st.sampled_from(SPECIAL))
        start = pd.Timestamp("2024-01-01") + draw(st.sampled_from([pd.Timedelta(0), pd.Timedelta(minutes=30)]))
        stamps = [start + i * step for i in range(n)]
        fault = draw(st.sampled_from(["none", "duplicate", "swap", "drop", "jitter"])) if faulty else "none"
        if n >= 3:
            i = draw(st.integers(1, n - 2))
            if fault == "duplicate":
                stamps[i] = stamps[i - 1]
            elif fault == "swap":
                stamps[i], stamps[i + 1] = stamps[i + 1], stamps[i]
            elif fault == "drop":
                del stamps[i]
                y = np.delete(y, i)
            elif fault == "jitter":
                stamps[i] = stamps[i] + pd.Timedelta(minutes=7)
        text = [str(s) for s in stamps]
        form = draw(st.sampled_from(["iso"] * 4 + ["mixed", "garbage"])) if faulty else "iso"
        if form == "mixed" and text:
            text[0] = stamps[0].strftime("%d/%m/%Y %H:%M")
        elif form == "garbage" and text:
            text[-1] = "yesterday"
        rows += [{"id": item, "ts": s, "y": v} for s, v in zip(text, y)]
    frame = pd.DataFrame(rows, columns=["id", "ts", "y"])
    return frame, draw(st.sampled_from([freq, None]))


def check_dataset(data, frame: pd.DataFrame) -> None:
    """What a successful read guarantees."""
    assert len(data) == frame["id"].nunique() and len({s.item_id for s in data}) == len(data)
    assert sum(len(s) for s in data) == len(frame)
    for s in data:
        t = s.target
        assert t.dtype == np.float32 and t.ndim == 1 and len(t) > 0
        assert not np.isinf(t).any() and not np.isnan(t).all()
        assert np.nanmax(np.abs(t)) <= MAX_ABS_VALUE


@settings(max_examples=150, **SETTINGS)
@given(table=tables(), as_csv=st.booleans())
def test_read_long_reads_or_says_one_line(table, as_csv, tmp_path_factory):
    frame, freq = table
    source = frame
    if as_csv:
        source = tmp_path_factory.mktemp("csv") / "t.csv"
        frame.to_csv(source, index=False)
    try:
        data = read_long(source, "id", "ts", "y", freq=freq)
    except DataError as e:
        refused(e)
        return
    event("read")
    check_dataset(data, frame)


def forecast_args(csv, out, horizon, freq, run=None) -> Namespace:
    return Namespace(input=str(csv), item_id="id", timestamp="ts", target="y", freq=freq, horizon=horizon,
                     out=str(out), run=run and str(run), num_samples=4, steps=1, covariates=None)


@settings(max_examples=60, **SETTINGS)
@given(table=tables(), horizon=st.integers(1, 40))
def test_forecast_input_without_run_is_checked_before_training(table, horizon, tmp_path_factory):
    """`tsdb forecast` without --run: the input is accepted for training or refused in one line."""
    frame, freq = table
    tmp = tmp_path_factory.mktemp("fc")
    frame.to_csv(tmp / "t.csv", index=False)
    try:
        data, futures, cfg = prepare(forecast_args(tmp / "t.csv", tmp / "out", horizon, freq))
    except TsdbError as e:
        refused(e)
        return
    event("accepted for training")
    check_dataset(data, frame)
    assert cfg.model.horizon >= horizon
    assert all(len(s) >= cfg.model.horizon + cfg.model.patch_length for s in data)


@settings(max_examples=30, **SETTINGS)
@given(table=tables(), horizon=st.integers(1, H + 2))
def test_forecast_writes_finite_quantiles_or_nothing(table, horizon, tiny_run, tmp_path_factory):
    """`tsdb forecast --run`: a finite CSV (on the series' own clock) and a PNG, or one line and
    no files at all."""
    frame, freq = table
    tmp = tmp_path_factory.mktemp("fc")
    frame.to_csv(tmp / "t.csv", index=False)
    out = tmp / "out"
    try:
        forecast_csv(forecast_args(tmp / "t.csv", out, horizon, freq, run=tiny_run))
    except TsdbError as e:
        refused(e)
        assert not out.exists() or not any(out.iterdir())
        return
    event("forecast written")
    assert sorted(p.name for p in out.iterdir()) == ["forecast.csv", "forecast.png"]
    result = pd.read_csv(out / "forecast.csv", keep_default_na=False)
    values = result.drop(columns=["item_id", "timestamp"]).to_numpy(dtype=float)
    assert np.isfinite(values).all()
    assert len(result) == frame["id"].nunique() * horizon
    # the forecast continues each series' own grid (offsets such as :30 kept)
    last = pd.to_datetime(frame["ts"], format="mixed").groupby(frame["id"].astype(str)).max()
    first = pd.to_datetime(result["timestamp"]).groupby(result["item_id"].astype(str)).min()
    step = pd.to_datetime(result["timestamp"]).groupby(result["item_id"].astype(str)).diff().dropna()
    assert ((first - last.reindex(first.index)) > pd.Timedelta(0)).all()
    assert (step == step.iloc[0]).all() if len(step) else True


# ---------------------------------------------------------------------------------------
# NDJSON streams
# ---------------------------------------------------------------------------------------

JUNK_LINES = ["{not json", "[1, 2]", "42", "null", '"text"', "{}", '{"item_id": {"a": 1}}', "{" * 40,
              '{"item_id": true, "timestamp": 0, "value": 1}', '{"item_id": "\\ud800", "timestamp": 0, "value": 1}']
VALUES = st.one_of(st.floats(-1e6, 1e6), st.none(), st.sampled_from(SPECIAL), st.integers(-10**30, 10**30),
                   st.text(max_size=3), st.booleans())


@st.composite
def streams(draw):
    """NDJSON lines with faults around a witness series 'w' that only gets good records."""
    ids = draw(st.lists(st.one_of(st.sampled_from(["a", "b", "é", "日本", "", "0"]), st.integers(-3, 3)),
                        min_size=1, max_size=4, unique=True))
    clock = {}          # id -> next timestamp (numbers for int-like ids, ISO text for the others)
    lines, witness = [], []
    w_t = 0
    for _ in range(draw(st.integers(1, 40))):
        if draw(st.integers(0, 3)) == 0:    # the witness series advances by one good record
            line = json.dumps({"item_id": "w", "timestamp": w_t, "value": 10 + math.sin(w_t)})
            lines.append(line)
            witness.append(line)
            w_t += 1
            continue
        item = draw(st.sampled_from(ids))
        t = clock.get(item, 0)
        kind = draw(st.sampled_from(["good", "good", "good", "value", "duplicate", "back", "gap", "mixed",
                                     "badtime", "missing", "reset", "junk", "blank", "extra"]))
        value = 1 + 0.1 * t if kind != "value" else draw(VALUES)
        stamp = {"duplicate": t - 1, "back": t - 3, "gap": t + 2, "mixed": f"2024-01-01T{t % 24:02d}:00",
                 "badtime": draw(st.sampled_from([None, "soon", [1], math.nan, math.inf, 1e300]))}.get(kind, t)
        rec = {"item_id": item, "timestamp": stamp, "value": value}
        if kind == "missing":
            del rec[draw(st.sampled_from(["timestamp", "value", "item_id"]))]
        elif kind == "reset":
            rec = {"item_id": item, "reset": True}
            clock.pop(item, None)
        elif kind == "extra":
            rec["note"] = "ignored"
        if kind == "junk":
            lines.append(draw(st.sampled_from(JUNK_LINES)))
        elif kind == "blank":
            lines.append("   ")
        else:
            lines.append(json.dumps(rec))
        if kind in ("good", "value", "extra"):
            clock[item] = t + 1
    return lines, witness, draw(st.integers(1, 4))


def strict_json(line: str):
    """``json.loads`` that refuses the NaN/Infinity tokens (not JSON)."""
    def refuse(token):
        raise ValueError(f"{token} is not JSON")
    return json.loads(line, parse_constant=refuse)


def stream_out(model_dir, lines, batch_size=1, state_path=None):
    buf = io.StringIO()
    counts = run_stream(model_dir, io.StringIO("\n".join(lines) + "\n"), buf, num_samples=4,
                        batch_size=batch_size, state_path=state_path)
    return counts, [strict_json(line) for line in buf.getvalue().splitlines()]


@settings(max_examples=40, **SETTINGS)
@given(case=streams())
def test_stream_answers_every_line_with_valid_json_and_spares_other_series(case, tiny_run, tmp_path_factory):
    lines, witness, batch = case
    model_dir = tiny_run / "onnx"
    state = tmp_path_factory.mktemp("st") / "state.npz"
    counts, out = stream_out(model_dir, lines, batch, state)
    assert len(out) == sum(1 for line in lines if line.strip()) == counts["records"]
    for rec in out:
        if "error" in rec:
            assert isinstance(rec["error"], str) and one_line(rec["error"]) and isinstance(rec["line"], int)
        elif rec.get("reset"):
            assert isinstance(rec["existed"], bool)
        else:
            assert len(rec["mean"]) == H and np.isfinite(rec["mean"]).all()
            assert all(len(q) == H and np.isfinite(q).all() for q in rec["quantiles"].values())
    assert counts["errors"] == sum("error" in r for r in out)
    event(f"{sum('mean' in r for r in out) * 10 // max(1, len(out)) * 10}% of the lines are forecasts")
    # the witness series' forecasts do not depend on the other series' records, good or bad
    _, alone = stream_out(model_dir, witness)
    assert [r for r in out if r.get("item_id") == "w"] == alone
    # the state file written at the end loads again
    assert stream_out(model_dir, [], state_path=state)[0]["series"] == counts["series"]


@pytest.mark.parametrize("value", ["null", "NaN"])
def test_missing_readings_keep_the_series_on_its_grid(tiny_run, value):
    recs = [f'{{"item_id": "s", "timestamp": {t}, "value": {value if t == 3 else 1.0 + t}}}' for t in range(8)]
    counts, out = stream_out(tiny_run / "onnx", recs)
    assert counts["errors"] == 0 and [r["observations"] for r in out] == list(range(1, 9))


def test_reset_starts_a_series_afresh(tiny_run):
    recs = [f'{{"item_id": "s", "timestamp": {t}, "value": {1.0 + t}}}' for t in range(5)]
    fresh = [f'{{"item_id": "s", "timestamp": {t}, "value": {2.0 * t}}}' for t in range(3)]
    counts, out = stream_out(tiny_run / "onnx", [*recs, '{"item_id": "s", "reset": true}', *fresh])
    assert counts["errors"] == 0 and out[5] == {"line": 6, "item_id": "s", "reset": True, "existed": True}
    assert out[6:] == stream_out(tiny_run / "onnx", fresh)[1]
