"""Evaluation protocols and metrics, shared by every arm (ours, e2e, baselines).

Every arm is judged the same way: an :class:`EvalTask` holds the test windows of one
protocol (built with ``gluonts.dataset.split``), the arm produces sample paths for every
window, and :meth:`EvalTask.evaluate` wraps them in GluonTS ``SampleForecast`` objects and
scores them with ``gluonts.ev`` metrics (the loop of gluonts' ``evaluate_forecasts_raw``).
The protocols and their published anchor numbers are in
``shared/benchmarks.md``:

- protocol A, :func:`m4_hourly_task`: M4 Hourly, H = 48, seasonality 24, one window;
- protocol B, :func:`etth1_task`: ETTh1 long horizon (LTSF), scaled space, rolling windows.

Metric keys returned by :meth:`EvalTask.evaluate`:

- ``crps``: ``mean_weighted_sum_quantile_loss`` over quantile levels 0.1..0.9;
- ``mase``: ``MASE[0.5]`` (sample median) with the task's seasonality;
- ``mse``: ``MSE[mean]`` (point forecast = sample mean);
- ``mae``: ``MAE[0.5]`` (point forecast = sample median);
- ``coverage80``: share of targets inside the [q0.1, q0.9] sample interval (nominal 0.8);
- ``num_windows`` plus the protocol facts in ``EvalTask.info`` (lookback, stride, split).

With ``EvalTask.window_scores`` set, the metrics also hold ``window_scores``: per test window
(in ``test_data`` order) the CRPS numerator ``crps_num`` (the mean over quantile levels of
the window's summed quantile loss), its denominator ``abs_target`` (the window's summed
``|y|``), and the window's ``mase``, ``mse`` and ``mae``, all from gluonts.ev with
``axis=1``. ``sum(crps_num) / sum(abs_target)`` is ``crps`` exactly, so a resample of
windows (the paired bootstrap of ``tsdb.bench.stats``) recomputes the metric as gluonts does.

Covariates: a model with ``num_covariates > 0`` gets, per window, the covariates over its
context and horizon (:meth:`EvalTask.covariates`). The horizon part is the covariates'
*observed* future values, so a benchmark with e.g. vic_elec's temperature scores the model
with a perfect (oracle) temperature forecast: an upper bound on what a real weather
forecast would give, not a deployable accuracy figure.

Quantiles of a ``SampleForecast`` are order statistics (sample ``round((S-1) q)`` of the
sorted samples), not interpolated.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
from gluonts.dataset import split as gluonts_split
from gluonts.dataset.split import TestData
from gluonts.ev.metrics import (
    MAE,
    MASE,
    MSE,
    Coverage,
    MeanWeightedSumQuantileLoss,
    SumAbsoluteLabel,
    SumQuantileLoss,
)
from gluonts.itertools import batcher
# (private, gluonts pinned < 0.18): the batch of labels, forecasts and seasonal errors its metrics read
from gluonts.model.evaluation import _get_data_batch
from gluonts.model.forecast import SampleForecast
from tqdm.auto import tqdm

from tsdb.data.series import Series, SeriesDataset
from tsdb.errors import DataError

SamplePredictor = Callable[..., np.ndarray]
"""The contract of every arm: ``(contexts [N, C] float32, num_samples) -> samples [N, S, H]``.

Contexts are in the task's scale (raw for protocol A, standardized for protocol B); NaN
marks a missing value or the left padding of a series shorter than C. An arm with
covariates is also called with ``covariates=[N, n_cov, C + H]`` (see ``evaluate_predictor``)."""

QUANTILE_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

METRICS = (
    MeanWeightedSumQuantileLoss(quantile_levels=QUANTILE_LEVELS),
    MASE(forecast_type="0.5"),
    MSE(forecast_type="mean"),
    MAE(forecast_type="0.5"),
    Coverage(q=0.1),
    Coverage(q=0.9),
)

# per window (axis=1: aggregated over lead times only), for resampling windows
WINDOW_METRICS = (
    *(SumQuantileLoss(q=q) for q in QUANTILE_LEVELS),
    SumAbsoluteLabel(),
    MASE(forecast_type="0.5"),
    MSE(forecast_type="mean"),
    MAE(forecast_type="0.5"),
)

M4_HOURLY_HORIZON = 48
M4_HOURLY_SEASON = 24

# ETTh1 (LTSF protocol): 12/4/4 months of 30 days of hourly rows.
ETT_TRAIN_END = 12 * 30 * 24
ETT_VAL_END = ETT_TRAIN_END + 4 * 30 * 24
ETT_TEST_END = ETT_VAL_END + 4 * 30 * 24
ETT_SEASON = 24


@dataclass
class StandardScaler:
    """Per-series standardization ``(x - mean) / std`` (population std, as sklearn)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, values: list[np.ndarray]) -> "StandardScaler":
        """Fit one (mean, std) per array in ``values``, ignoring NaN."""
        mean = np.array([np.nanmean(v) for v in values], dtype=np.float64)
        std = np.array([np.nanstd(v) for v in values], dtype=np.float64)
        return cls(mean, np.where(std > 0, std, 1.0))

    def transform(self, x: np.ndarray, index: int) -> np.ndarray:
        """Scale values of series ``index`` (float32 out)."""
        return ((x - self.mean[index]) / self.std[index]).astype(np.float32)

    def inverse_transform(self, x: np.ndarray, index: int) -> np.ndarray:
        """Map scaled values of series ``index`` back to the raw scale (float32 out)."""
        return (x * self.std[index] + self.mean[index]).astype(np.float32)


@dataclass
class EvalTask:
    """One protocol's test windows, its training data and how to score forecasts.

    ``test_data`` yields ``(input, label)`` pairs in a fixed order (series-major, then
    window); samples passed to :meth:`evaluate` must follow that order. ``train`` is all
    a model may fit on. ``scaler`` is set when the protocol scores in a scaled space
    (then ``train``, contexts and labels are all scaled).
    """

    name: str
    horizon: int
    season_length: int
    freq: str
    test_data: TestData
    train: SeriesDataset
    scaler: StandardScaler | None = None
    info: dict = field(default_factory=dict)
    window_scores: bool = False   # also return per-window scores (see the module doc)

    @property
    def num_windows(self) -> int:
        return len(self.test_data)

    def contexts(self, context_length: int) -> np.ndarray:
        """The last ``context_length`` input points of every window, ``[N, C]`` float32.

        Windows with a shorter history are left-padded with NaN.
        """
        out = np.full((self.num_windows, context_length), np.nan, dtype=np.float32)
        for row, entry in zip(out, self.test_data.input):
            tail = entry["target"][-context_length:]
            row[context_length - len(tail):] = tail
        return out

    def covariates(self, context_length: int) -> np.ndarray:
        """Every window's covariates over its last ``context_length`` input points and its
        horizon, ``[N, n_cov, C + H]`` float32 (the context part NaN-left-padded like
        :meth:`contexts`).

        The horizon part is the covariates' observed values in the label window: for a
        benchmark this is an oracle forecast of the covariate (e.g. the actual future
        temperature), not what a deployed model would have.
        """
        rows = []
        for entry, label in zip(self.test_data.input, self.test_data.label):
            past, future = entry.get("past_feat_dynamic_real"), label.get("past_feat_dynamic_real")
            who = f"{self.name}: series {entry.get('item_id')!r}"
            if past is None or future is None:
                raise DataError(f"{who} has no covariates (past_feat_dynamic_real); load the dataset with "
                                "its covariate columns or use a model with num_covariates: 0")
            past, future = np.asarray(past, np.float32), np.asarray(future, np.float32)
            if future.shape[-1] != self.horizon or not np.isfinite(future).all() or np.isinf(past).any():
                raise DataError(f"{who}: covariates of the window starting {label['start']} are incomplete "
                                f"or not finite; covariates must be complete over context and horizon")
            row = np.full((past.shape[0], context_length + self.horizon), np.nan, dtype=np.float32)
            tail = past[:, -context_length:]
            row[:, context_length - tail.shape[1]:context_length] = tail
            row[:, context_length:] = future
            rows.append(row)
        return np.stack(rows) if rows else np.zeros((0, 0, context_length + self.horizon), np.float32)

    def evaluate(self, samples: np.ndarray | Iterable[np.ndarray]) -> dict:
        """Score sample paths against the labels; returns the metrics in the module doc.

        ``samples`` is one array ``[N, S, H]`` or an iterable of ``[n, S, H]`` batches
        in window order (lets large protocols stream without holding all samples).
        """
        batches = [samples] if isinstance(samples, np.ndarray) else samples
        counter = {"windows": 0}
        # gluonts' evaluate_forecasts_raw, with a second set of evaluators at axis=1 fed from
        # the same batches, so per-window scores cost no second pass over the forecasts
        totals = {e.name: e for e in (m(axis=(0, 1)) for m in METRICS)}
        per_window = {e.name: e for e in (m(axis=(1,)) for m in WINDOW_METRICS)} if self.window_scores else {}
        forecasts = batcher(self._forecasts(batches, counter), batch_size=1000)
        for inputs, labels, batch in zip(batcher(self.test_data.input, batch_size=1000),
                                         batcher(self.test_data.label, batch_size=1000), forecasts):
            data = _get_data_batch(inputs, labels, batch, seasonality=self.season_length)
            for evaluator in (*totals.values(), *per_window.values()):
                evaluator.update(data)
        if counter["windows"] != self.num_windows or next(iter(forecasts), None) is not None:
            raise ValueError(
                f"{self.name}: got samples for {counter['windows']} windows, "
                f"the task has {self.num_windows}"
            )
        raw = {name: e.get() for name, e in totals.items()}
        out = {
            "crps": float(raw["mean_weighted_sum_quantile_loss"]),
            "mase": float(raw["MASE[0.5]"]),
            "mse": float(raw["MSE[mean]"]),
            "mae": float(raw["MAE[0.5]"]),
            "coverage80": float(raw["coverage[0.9]"] - raw["coverage[0.1]"]),
            "num_windows": self.num_windows,
            **self.info,
        }
        if per_window:
            w = {name: np.asarray(e.get(), dtype=np.float64) for name, e in per_window.items()}
            out["window_scores"] = {
                "crps_num": np.mean([w[f"sum_quantile_loss[{q}]"] for q in QUANTILE_LEVELS], axis=0).tolist(),
                "abs_target": w["sum_absolute_label"].tolist(),
                "mase": w["MASE[0.5]"].tolist(), "mse": w["MSE[mean]"].tolist(), "mae": w["MAE[0.5]"].tolist(),
            }
        return out

    def _forecasts(self, batches: Iterable[np.ndarray], counter: dict) -> Iterator[SampleForecast]:
        """Pair each sample array with its window's label start and item id."""
        labels = iter(self.test_data.label)
        for batch in batches:
            batch = np.asarray(batch, dtype=np.float64)  # accumulate metrics in float64
            if batch.ndim != 3 or batch.shape[2] != self.horizon:
                raise ValueError(
                    f"{self.name}: samples must be [N, S, {self.horizon}], got {batch.shape}"
                )
            for paths in batch:
                label = next(labels, None)
                if label is None:
                    raise ValueError(f"{self.name}: more samples than {self.num_windows} windows")
                counter["windows"] += 1
                yield SampleForecast(paths, start_date=label["start"], item_id=label.get("item_id"))


def evaluate_predictor(
    task: EvalTask,
    predictor: SamplePredictor,
    context_length: int,
    num_samples: int = 100,
    batch_size: int = 256,
    num_covariates: int = 0,
    progress: bool = False,
) -> dict:
    """Run ``predictor`` over all windows in batches and score it (``progress``: a bar over
    the windows on stderr).

    With ``num_covariates > 0`` the predictor also gets ``covariates=`` the windows'
    :meth:`EvalTask.covariates` (observed future values: an oracle covariate forecast).
    Adds ``predict_seconds`` (time inside the predictor only), ``context_length`` and
    ``num_samples`` to the metrics.
    """
    contexts = task.contexts(context_length)
    covariates = task.covariates(context_length) if num_covariates else None
    if covariates is not None and len(covariates) and covariates.shape[1] != num_covariates:
        raise DataError(f"{task.name}: the data has {covariates.shape[1]} covariate(s), the model takes "
                        f"{num_covariates}")
    timer = {"seconds": 0.0}

    def batches() -> Iterator[np.ndarray]:
        with tqdm(total=len(contexts), desc=f"forecasting {task.name}", unit="window", disable=not progress,
                  leave=False) as bar:
            for start in range(0, len(contexts), batch_size):
                t0 = time.perf_counter()
                if covariates is None:
                    samples = predictor(contexts[start:start + batch_size], num_samples)
                else:
                    samples = predictor(contexts[start:start + batch_size], num_samples,
                                        covariates=covariates[start:start + batch_size])
                timer["seconds"] += time.perf_counter() - t0
                bar.update(len(samples))
                yield samples

    metrics = task.evaluate(batches())
    extra = {"num_covariates": num_covariates, "covariate_future": "observed (oracle)"} if num_covariates else {}
    return {
        **metrics,
        "predict_seconds": timer["seconds"],
        "context_length": context_length,
        "num_samples": num_samples,
        **extra,
    }


def rolling_task(
    name: str,
    dataset: SeriesDataset,
    horizon: int,
    season_length: int,
    offset: int,
    windows: int = 1,
    stride: int | None = None,
    max_history: int | None = None,
    train: SeriesDataset | None = None,
    scaler: StandardScaler | None = None,
    info: dict | None = None,
) -> EvalTask:
    """Rolling-origin test windows from ``gluonts.dataset.split``.

    Window ``k`` of every series forecasts positions ``[offset + k * stride, ... + horizon)``
    (a negative ``offset`` counts from each series' end; ``stride`` defaults to
    ``horizon``); its input is everything before, or the last ``max_history`` points.
    ``train`` defaults to every series cut at ``offset``.
    """
    _, template = gluonts_split.split(dataset.to_gluonts(), offset=offset)
    test_data = template.generate_instances(
        prediction_length=horizon, windows=windows, distance=stride, max_history=max_history
    )
    if train is None:
        train = SeriesDataset(
            dataset.name, [s.slice(0, offset) for s in dataset], dataset.freq, season_length,
            dict(dataset.meta),
        )
    return EvalTask(name, horizon, season_length, dataset.freq, test_data, train, scaler,
                    info or {})


SPLITS = ("test", "val")


def _check_split(name: str, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"{name}: split must be one of {SPLITS}, got {split!r}")


def m4_hourly_task(dataset: SeriesDataset, split: str = "test") -> EvalTask:
    """Protocol A: M4 Hourly, the last 48 points of each series are its one test window.

    ``dataset`` holds train + test concatenated (as ``load_dataset("m4_hourly")``).
    Training set: each series minus its last 48 points. MASE seasonality 24.

    ``split="val"``: the validation window is the last 48 points of each *training* series
    (the 48 before the test window), and the training set is each series minus its last 96
    points; the test window is never read. Settings are chosen here (``tsdb tune``).
    """
    horizon = M4_HOURLY_HORIZON
    _check_split("m4_hourly", split)
    held = horizon * (1 + SPLITS.index(split))   # points after the training part
    for s in dataset:
        if len(s) <= held:
            raise DataError(f"m4_hourly: series {s.item_id!r} has {len(s)} points, need > {held}")
    if split == "val":
        dataset = SeriesDataset(dataset.name, [s.slice(0, len(s) - horizon) for s in dataset], dataset.freq,
                                dataset.season_length, dict(dataset.meta))
    return rolling_task("m4_hourly", dataset, horizon, M4_HOURLY_SEASON, offset=-horizon,
                        info={"protocol": "A", "split": split})


def rolling_protocol_task(dataset: SeriesDataset, horizon: int, windows: int = 1, stride: int | None = None,
                          split: str = "test") -> EvalTask:
    """The last ``windows`` windows of ``horizon`` points of every series, ``stride`` apart
    (default ``horizon``; e.g. exchange rate: 5 windows of 30, the GluonTS recipe).

    ``split="val"``: one validation window, the ``horizon`` points right before the first test
    window; the training set is every series cut before it (test windows never read).
    """
    _check_split(dataset.name, split)
    stride = stride or horizon
    test_offset = -horizon - (windows - 1) * stride
    info = {"protocol": "rolling", "windows": windows, "split": split}
    if split == "test":
        return rolling_task(dataset.name, dataset, horizon, dataset.season_length, offset=test_offset,
                            windows=windows, stride=stride, info=info)
    cut = SeriesDataset(dataset.name, [s.slice(0, len(s) + test_offset) for s in dataset], dataset.freq,
                        dataset.season_length, dict(dataset.meta))
    return rolling_task(dataset.name, cut, horizon, dataset.season_length, offset=-horizon,
                        info={**info, "windows": 1})


def etth1_task(
    dataset: SeriesDataset,
    horizon: int,
    lookback: int = 512,
    stride: int = 1,
    split: str = "test",
) -> EvalTask:
    """Protocol B: ETTh1 long horizon, scored in standardized space.

    Per-variable StandardScaler fit on train rows ``[0, 8640)``. Windows forecast every
    ``stride``-th start in ``[8640, 11520)`` (``split="val"``) or ``[11520, 14400)``
    (``split="test"``); their inputs are the ``lookback`` points before (so the first
    window reads rows from ``8640 - L`` resp. ``11520 - L``). Each variable is a separate
    univariate series. ``stride=1`` is the published protocol; a larger stride is a quick
    tier and is reported in the metrics. Keep it coprime to 24: a multiple of 24 starts
    every window at the same hour and biases the numbers (repeat-last MSE at H=96: 1.294
    at stride 1, 1.299 at stride 7, 1.000 at stride 24).

    Training set: the scaled rows ``[0, 8640)``. MASE here uses seasonality 24 over the
    lookback window only (no published anchor).
    """
    bounds = {"val": (ETT_TRAIN_END, ETT_VAL_END), "test": (ETT_VAL_END, ETT_TEST_END)}
    if split not in bounds:
        raise ValueError(f"etth1: split must be 'val' or 'test', got {split!r}")
    first, end = bounds[split]
    if not 0 < lookback <= first:
        raise ValueError(f"etth1: lookback must be in [1, {first}], got {lookback}")
    if not 0 < horizon <= end - first or stride < 1:
        raise ValueError(f"etth1: bad horizon {horizon} or stride {stride}")
    for s in dataset:
        if len(s) < end:
            raise DataError(f"etth1: series {s.item_id!r} has {len(s)} rows, need {end}")

    scaler = StandardScaler.fit([s.target[:ETT_TRAIN_END] for s in dataset])
    scaled = SeriesDataset(dataset.name, [
        Series(s.item_id, scaler.transform(s.target[:end], i), s.start, s.freq)
        for i, s in enumerate(dataset)
    ], dataset.freq, ETT_SEASON, dict(dataset.meta))
    train = SeriesDataset(dataset.name, [s.slice(0, ETT_TRAIN_END) for s in scaled],
                          dataset.freq, ETT_SEASON, dict(dataset.meta))
    return rolling_task(
        f"etth1_{horizon}", scaled, horizon, ETT_SEASON, offset=first,
        windows=(end - first - horizon) // stride + 1, stride=stride, max_history=lookback,
        train=train, scaler=scaler,
        info={"protocol": "B", "lookback": lookback, "stride": stride, "split": split},
    )
