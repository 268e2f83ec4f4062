"""``tsdb stream MODEL_DIR``: NDJSON observations in, NDJSON forecasts out.

Each input line is ``{"item_id": ..., "timestamp": ..., "value": ...}``. For every accepted
record the series' state is updated and one forecast line is written::

    {"item_id": "a", "timestamp": "2016-07-01 05:00:00", "observations": 6,
     "forecast_timestamps": [...], "mean": [...], "quantiles": {"0.1": [...], "0.5": [...], ...}}

A bad record gets one error line instead and leaves that series' state unchanged; other
series continue::

    {"line": 7, "item_id": "a", "timestamp": "...", "error": "gap: expected ..., got ...; ..."}

A missing reading is ``"value": null`` (or ``NaN``): it is applied as a missing value (the
model masks it), so the series stays on its time grid. ``{"item_id": "a", "reset": true}``
forgets series ``a`` (state and clock; acknowledged with ``{"line": n, "item_id": "a",
"reset": true, "existed": true}``); its next record starts it afresh. Every output line is
valid JSON: a forecast that is not finite is reported as an error line, never as ``NaN``.

Models with ``n`` covariates: every record also carries ``"covariates": [n numbers]`` (this
step's) and ``"future_covariates": [n lists of H numbers]`` (the known future after it),
checked like the value.

Checks per record: valid JSON object with the three keys; ``item_id`` a string or integer;
``value`` a finite number within +-1e30 or null/NaN (missing; strings, booleans and infinities
are rejected, and so are values the runtime refuses, e.g. ones whose normalised scale would
overflow); ``timestamp`` an ISO date-time string or a number, of the same kind for the whole series; strictly after the
series' last applied timestamp (duplicate / out-of-order otherwise) and exactly one step
after it (a gap otherwise). The step is ``freq`` if given (a pandas frequency such as
``"h"`` or ``"MS"`` for date-times, a number for numeric timestamps), else the difference
between a series' first two timestamps.

State (model state of every series plus each series' last timestamp and step) is saved
atomically to ``state_path`` every ``checkpoint_every`` applied records and at the end
(also on an exception or Ctrl-C), and loaded from it at start. Replaying input after a
restart is safe: records already applied are reported as duplicates and ignored, the rest
are applied, so no update is lost. Forecast noise is seeded per series and observation
count, so a resumed run writes the same forecasts as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Sequence

import numpy as np

from tsdb.errors import TsdbError

STREAM_STATE_VERSION = 1


def import_runtime():
    """``tsdb_streaming`` (the torch-free runtime), from the environment or this checkout."""
    try:
        import tsdb_streaming
    except ImportError:
        local = Path(__file__).resolve().parents[2] / "streaming"
        if not (local / "tsdb_streaming").is_dir():
            raise TsdbError("the streaming runtime is not installed; run `pip install -e streaming/` "
                            "(or `pip install tsdb-streaming`)") from None
        sys.path.insert(0, str(local))
        import tsdb_streaming
    return tsdb_streaming


def resolve_model_dir(model_dir: str | Path) -> Path:
    """An exported model directory; a training run directory is exported to RUN/onnx first."""
    model_dir = Path(model_dir)
    if (model_dir / "tsdb_model.json").exists():
        return model_dir
    if (model_dir / "model.pt").exists():
        out = model_dir / "onnx"
        if not (out / "tsdb_model.json").exists():
            from tsdb.export.onnx import export_run
            export_run(model_dir, out)
        return out
    raise TsdbError(f"{model_dir} is neither an exported model (tsdb_model.json) nor a training run "
                    f"(model.pt); run `tsdb export RUN_DIR` first")


# ---------------------------------------------------------------------------------------
# Timestamps
# ---------------------------------------------------------------------------------------

class RecordError(Exception):
    pass


def _parse_time(raw: Any) -> tuple[str, Any]:
    """-> ("num", float) or ("time", pd.Timestamp)."""
    if isinstance(raw, bool) or raw is None:
        raise RecordError(f"timestamp must be an ISO date-time string or a number, got {json.dumps(raw)}")
    if isinstance(raw, (int, float)):
        if not math.isfinite(raw):
            raise RecordError(f"timestamp must be finite, got {raw}")
        return "num", raw
    if isinstance(raw, str):
        import pandas as pd
        try:
            ts = pd.Timestamp(raw)
        except (ValueError, TypeError):
            raise RecordError(f"timestamp {raw!r} is not an ISO date-time") from None
        if ts is pd.NaT:
            raise RecordError(f"timestamp {raw!r} is not a date-time")
        return "time", ts
    raise RecordError(f"timestamp must be an ISO date-time string or a number, got {type(raw).__name__}")


def _offset(freq):
    import pandas as pd
    try:
        return pd.tseries.frequencies.to_offset(freq)
    except ValueError:
        raise TsdbError(f"freq {freq!r} is not a pandas frequency (e.g. 'h', '15min', 'D', 'MS')") from None


@dataclass
class SeriesClock:
    """Last applied timestamp and step of one series (checkpointed as JSON)."""

    kind: str
    last: Any
    step: Any = None          # float (num) or pd.Timedelta (time) when inferred

    def to_json(self) -> dict:
        if self.kind == "num":
            return {"kind": "num", "last": self.last, "step": self.step}
        return {"kind": "time", "last": self.last.isoformat(),
                "step": None if self.step is None else int(self.step.value)}

    @classmethod
    def from_json(cls, d: dict) -> "SeriesClock":
        if d["kind"] == "num":
            return cls("num", d["last"], d["step"])
        import pandas as pd
        return cls("time", pd.Timestamp(d["last"]), None if d["step"] is None else pd.Timedelta(d["step"], "ns"))


class Clocks:
    """Per-series timestamp checks."""

    def __init__(self, freq=None):
        self.freq = freq
        self._offset = _offset(freq) if isinstance(freq, str) else None
        self.series: dict[Any, SeriesClock] = {}

    def _next(self, clock: SeriesClock):
        """The timestamp expected after ``clock.last`` (None if the step is still unknown)."""
        if clock.kind == "num":
            step = self.freq if isinstance(self.freq, (int, float)) and not isinstance(self.freq, bool) else clock.step
            return None if step is None else clock.last + step
        if self._offset is not None:
            return clock.last + self._offset
        return None if clock.step is None else clock.last + clock.step

    def check(self, item, raw_ts) -> tuple[str, Any]:
        kind, ts = _parse_time(raw_ts)
        clock = self.series.get(item)
        if clock is None:
            if kind == "num" and isinstance(self.freq, str) or kind == "time" and isinstance(self.freq, (int, float)):
                raise RecordError(f"timestamp {raw_ts!r} does not fit freq {self.freq!r}")
            return kind, ts
        if kind != clock.kind:
            raise RecordError(f"timestamp {raw_ts!r} is a {'number' if kind == 'num' else 'date-time'} but the "
                              f"series uses {'numbers' if clock.kind == 'num' else 'date-times'}")
        try:
            if ts == clock.last:
                raise RecordError(f"duplicate timestamp {self.show(clock.last)} (already applied); record ignored")
            if ts < clock.last:
                raise RecordError(f"out-of-order timestamp {self.show(ts)}: the series is already at "
                                  f"{self.show(clock.last)}; record ignored")
        except TypeError:  # tz-aware vs naive
            raise RecordError(f"timestamp {raw_ts!r} cannot be compared with {self.show(clock.last)} "
                              f"(time zone mismatch)") from None
        expected = self._next(clock)
        if expected is not None and ts != expected:
            if ts > expected:
                raise RecordError(f"gap: expected {self.show(expected)} after {self.show(clock.last)}, got "
                                  f"{self.show(ts)}; send the missing steps first (values must be numbers)")
            raise RecordError(f"timestamp {self.show(ts)} is off the series' step (expected {self.show(expected)})")
        return kind, ts

    def apply(self, item, kind, ts) -> None:
        clock = self.series.get(item)
        if clock is None:
            self.series[item] = SeriesClock(kind, ts)
            return
        if self._next(clock) is None:
            clock.step = ts - clock.last
        clock.last = ts

    def future(self, item, horizon: int) -> list | None:
        clock = self.series[item]
        if self._next(clock) is None:
            return None
        probe, out = SeriesClock(clock.kind, clock.last, clock.step), []
        for _ in range(horizon):
            probe.last = self._next(probe)
            out.append(self.show(probe.last))
        return out

    @staticmethod
    def show(ts):
        if hasattr(ts, "isoformat"):
            return str(ts)
        return ts

    def to_json(self) -> dict:
        return {"freq": self.freq, "series": [[item, c.to_json()] for item, c in self.series.items()]}

    def load(self, d: dict) -> None:
        if d.get("freq") != self.freq and self.freq is not None:
            raise TsdbError(f"the state was written with freq={d.get('freq')!r}, not {self.freq!r}")
        if self.freq is None and d.get("freq") is not None:
            self.freq = d["freq"]
            self._offset = _offset(self.freq) if isinstance(self.freq, str) else None
        self.series = {(tuple(i) if isinstance(i, list) else i): SeriesClock.from_json(c) for i, c in d["series"]}


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------

def _check_value(raw):
    """A finite number, or None/NaN for a missing reading (applied as NaN)."""
    if raw is None:
        return math.nan
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise RecordError(f"value must be a finite number or null (missing), got {_show(raw)}")
    try:
        value = float(raw)
    except OverflowError:    # an integer beyond the float range
        raise RecordError(f"value {str(raw)[:40]} is beyond the float range; rescale the series") from None
    if math.isinf(value):
        raise RecordError(f"value must be a finite number or null (missing), got {raw}")
    from tsdb.data.validate import MAX_ABS_VALUE   # the limit of `tsdb forecast` and the readers too
    if abs(value) > MAX_ABS_VALUE:
        raise RecordError(f"value {raw} is beyond +-{MAX_ABS_VALUE:.0e}, too large for the model's float32 "
                          "scaling; rescale the series")
    return value


def _show(raw) -> str:
    """A short JSON rendering of a raw field for a message (NaN/inf shown as text)."""
    return _dumps(raw)[:40]


def _safe(x):
    """JSON-safe copy: non-finite floats become strings (the output stays valid JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_safe(v) for v in x]
    return x


def _dumps(obj) -> str:
    try:
        return json.dumps(obj, allow_nan=False)
    except ValueError:
        return json.dumps(_safe(obj), allow_nan=False)


def _check_covariates(rec: dict, n: int, horizon: int) -> tuple[list, list] | None:
    """``covariates`` (n numbers: this step's) and ``future_covariates`` (n lists of
    ``horizon`` numbers: the known future after it) of a record, for a model with n covariates."""
    if not n:
        if "covariates" in rec or "future_covariates" in rec:
            raise RecordError("this model takes no covariates; drop covariates/future_covariates")
        return None
    now, future = rec.get("covariates"), rec.get("future_covariates")
    if now is None or future is None:
        raise RecordError(f"the model takes {n} covariate(s): give covariates [{n} numbers] and "
                          f"future_covariates [{n} lists of {horizon} numbers]")
    if not isinstance(now, list) or len(now) != n:
        raise RecordError(f"covariates must be a list of {n} number(s), got {json.dumps(now)[:40]}")
    if (not isinstance(future, list) or len(future) != n
            or any(not isinstance(row, list) or len(row) != horizon for row in future)):
        raise RecordError(f"future_covariates must be {n} list(s) of {horizon} numbers (the known future)")
    for x in [*now, *(x for row in future for x in row)]:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise RecordError(f"covariates must be finite numbers, got {json.dumps(x)[:40]}")
    return now, future


def _parse_record(line: str):
    """A record as a dict with a valid ``item_id``: an observation (``timestamp``, ``value``) or
    a reset (``"reset": true``)."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise RecordError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise RecordError("invalid JSON (nested too deeply)") from None
    if not isinstance(rec, dict):
        raise RecordError("a record must be a JSON object with item_id, timestamp and value")
    if "item_id" not in rec:
        raise RecordError("missing field(s) item_id")
    item = rec["item_id"]
    if isinstance(item, bool) or not isinstance(item, (str, int)):
        raise RecordError(f"item_id must be a string or an integer, got {_show(item)}")
    if isinstance(item, str):
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:
            raise RecordError("item_id is not valid Unicode (a lone surrogate escape)") from None
    if "reset" in rec:
        if rec["reset"] is not True or set(rec) != {"item_id", "reset"}:
            raise RecordError('a reset record is exactly {"item_id": ..., "reset": true}')
        return rec
    missing = [k for k in ("timestamp", "value") if k not in rec]
    if missing:
        raise RecordError(f"missing field(s) {', '.join(missing)}")
    return rec


def run_stream(model_dir: str | Path, input_stream: IO[str], output_stream: IO[str],
               state_path: str | Path | None = None, quantiles: Sequence[float] = (0.1, 0.5, 0.9),
               num_samples: int = 100, seed: int = 0, freq=None, checkpoint_every: int = 100,
               batch_size: int = 1, refresh: str = "context", intra_op_num_threads: int = 1) -> dict:
    """Stream NDJSON observations from ``input_stream`` to NDJSON forecasts on ``output_stream``.

    ``model_dir``: an exported model (``tsdb export``) or a training run (exported on the
    fly to ``RUN/onnx``). ``batch_size`` > 1 groups up to that many consecutive records
    (distinct series) into one batched update and forecast; outputs keep the input order
    either way. Returns counts: ``records``, ``forecasts``, ``errors``, ``series``.
    """
    rt = import_runtime()
    _check_options(quantiles, num_samples, seed, checkpoint_every, batch_size)
    model_dir = resolve_model_dir(model_dir)
    # a horizon model keeps num_samples noisy windows per series and draws its rolls' noise from seed
    horizon_kw = ({"num_samples": num_samples, "seed": seed} if rt.model_format(model_dir) == rt.HORIZON_FORMAT
                  else {})
    try:
        forecaster = rt.StreamingForecaster(model_dir, intra_op_num_threads=intra_op_num_threads, refresh=refresh,
                                            **horizon_kw)
    except (rt.StreamingError, OSError) as e:
        raise TsdbError(str(e)) from None
    except Exception as e:  # noqa: BLE001  (onnxruntime's own errors on an unreadable graph)
        raise TsdbError(f"{model_dir}: cannot load the exported model ({str(e).splitlines()[0][:160]}); "
                        "re-export it with `tsdb export RUN`") from None
    n_cov = getattr(forecaster, "num_covariates", 0)
    clocks = Clocks(freq)
    state_path = Path(state_path) if state_path is not None else None
    if state_path is not None and state_path.exists():
        try:
            extra = forecaster.load_state(state_path)
        except rt.StreamingError as e:
            raise TsdbError(f"{e}; delete {state_path} to start afresh (or restore it from a backup)") from None
        if not isinstance(extra, dict) or extra.get("version") != STREAM_STATE_VERSION or "clocks" not in extra:
            raise TsdbError(f"{state_path} was not written by `tsdb stream`; pass another --state file")
        try:
            clocks.load(extra["clocks"])
        except (KeyError, TypeError, ValueError) as e:
            raise TsdbError(f"{state_path}: unreadable series clocks ({e}); delete it to start afresh") from None
    counts = {"records": 0, "forecasts": 0, "errors": 0, "series": 0}
    since_checkpoint = 0
    horizon = forecaster.horizon

    def checkpoint():
        if state_path is not None:
            forecaster.save_state(state_path, extra={"version": STREAM_STATE_VERSION, "clocks": clocks.to_json()})

    outputs: list = []          # dicts, or (item, raw_ts) placeholders for forecasts
    batch: dict = {}            # item -> (value, raw_ts, kind, ts, covariates, line)

    def update(items: list) -> dict:
        """Apply ``batch[items]`` to the model state; -> {item: error message} for the records
        the runtime refused. The runtime applies a call per series (``SeriesRefused`` names the
        refused ones, the others are applied); any other error leaves the whole call unapplied,
        so it is retried record by record and one bad value costs only its own record."""
        cov = [batch[i][4] for i in items] if n_cov else None
        try:
            forecaster.update(items, [[batch[i][0]] for i in items],
                              **({"covariates": [np.asarray(c[0], np.float32)[:, None] for c in cov]} if cov else {}))
            return {}
        except rt.SeriesRefused as e:
            return {i: " ".join(str(msg).split()) for i, msg in e.refused.items()}
        except rt.StreamingError as e:
            if len(items) == 1:
                return {items[0]: " ".join(str(e).split())}
        refused = {}
        for i in items:
            refused.update(update([i]))
        return refused

    def forecast(items: list) -> dict:
        """{item: forecast record or error message}; a failed batch is retried series by series
        (forecasts are seeded per series, so batching does not change them)."""
        cov = [batch[i][4] for i in items] if n_cov else None
        seeds = [rt.series_seed(seed, i, forecaster.observation_count(i)) for i in items]
        try:
            fc = forecaster.forecast(items, num_samples=num_samples, seed=seeds, quantiles=quantiles,
                                     **({"covariates": np.asarray([c[1] for c in cov], np.float32)} if cov else {}))
        except rt.StreamingError as e:
            if len(items) > 1:
                return {k: v for i in items for k, v in forecast([i]).items()}
            return {items[0]: f"forecast failed: {' '.join(str(e).split())}"}
        out = {}
        for j, item in enumerate(items):
            if not (np.isfinite(fc.mean[j]).all() and np.isfinite(fc.quantiles[j]).all()):
                out[item] = ('the forecast is not finite (an extreme value reached the model state); reset the '
                             f'series with {{"item_id": {_show(item)}, "reset": true}}')
                continue
            out[item] = {
                "item_id": item, "timestamp": batch[item][1],
                "observations": forecaster.observation_count(item),
                "forecast_timestamps": clocks.future(item, horizon),
                "mean": [round(float(x), 6) for x in fc.mean[j]],
                "quantiles": {format(q, "g"): [round(float(x), 6) for x in fc.quantiles[j, k]]
                              for k, q in enumerate(fc.quantile_levels)},
            }
        return out

    def flush():
        nonlocal since_checkpoint
        by_item = {}
        if batch:
            items = list(batch)
            refused = update(items)
            applied = [i for i in items if i not in refused]
            for i in applied:
                clocks.apply(i, batch[i][2], batch[i][3])
            results = forecast(applied) if applied else {}
            for item in items:
                result = refused.get(item) or results[item]
                if isinstance(result, str):
                    counts["errors"] += 1
                    result = {"line": batch[item][5], "item_id": item, "timestamp": batch[item][1], "error": result}
                else:
                    counts["forecasts"] += 1
                by_item[item] = result
            since_checkpoint += len(applied)
            batch.clear()
        for o in outputs:
            rec = by_item[o[0]] if isinstance(o, tuple) else o
            output_stream.write(_dumps(rec) + "\n")
        outputs.clear()
        output_stream.flush()
        if since_checkpoint >= checkpoint_every:
            checkpoint()
            since_checkpoint = 0

    def reset_series(item) -> bool:
        clocks.series.pop(item, None)
        return bool(forecaster.reset_series([item]))

    # a non-finite intermediate is caught where it matters (the forecast check), not printed
    with np.errstate(all="ignore"):
        try:
            for lineno, line in enumerate(input_stream, 1):
                if not line.strip():
                    continue
                counts["records"] += 1
                item, raw_ts = None, None
                try:
                    rec = _parse_record(line)
                    item = rec["item_id"]
                    if "reset" in rec:
                        if batch:
                            flush()
                        outputs.append({"line": lineno, "item_id": item, "reset": True,
                                        "existed": reset_series(item)})
                        flush()
                        continue
                    raw_ts = rec["timestamp"]
                    value = _check_value(rec["value"])
                    covariates = _check_covariates(rec, n_cov, horizon)
                    if item in batch:       # a series twice in one batch: apply the first one before checking
                        flush()
                    kind, ts = clocks.check(item, raw_ts)
                except RecordError as e:
                    counts["errors"] += 1
                    err = {"line": lineno}
                    if item is not None:
                        err["item_id"] = item
                    if raw_ts is not None:
                        err["timestamp"] = raw_ts
                    err["error"] = str(e)
                    outputs.append(err)
                    if not batch:
                        flush()
                    continue
                batch[item] = (value, raw_ts, kind, ts, covariates, lineno)
                outputs.append((item, raw_ts))
                if len(batch) >= batch_size:
                    flush()
            flush()
        finally:
            counts["series"] = len(forecaster)
            checkpoint()
    return counts


def _check_options(quantiles, num_samples, seed, checkpoint_every, batch_size) -> None:
    """One-line errors for bad options of :func:`run_stream` (the CLI's argparse types check the same)."""
    try:
        levels = [float(q) for q in quantiles]
    except (TypeError, ValueError):
        raise TsdbError(f"quantiles must be numbers in (0, 1), got {quantiles!r}") from None
    if not levels or not all(0 < q < 1 for q in levels):
        raise TsdbError(f"quantiles must lie strictly between 0 and 1, got {list(quantiles)}")
    for name, value, low in (("num_samples", num_samples, 1), ("checkpoint_every", checkpoint_every, 1),
                             ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise TsdbError(f"{name} must be an integer >= {low}, got {value!r}")


__all__ = ["Clocks", "import_runtime", "resolve_model_dir", "run_stream"]
