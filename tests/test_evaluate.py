"""Evaluation protocols: metric formulas by hand, published anchors on real data, DeepAR."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from conftest import SHARED_DATA

from tsdb.evaluation.baselines import fit_deepar, repeat_last, seasonal_naive
from tsdb.data.series import Series, SeriesDataset
from tsdb.evaluation.tasks import (
    QUANTILE_LEVELS,
    StandardScaler,
    etth1_task,
    evaluate_predictor,
    m4_hourly_task,
    rolling_task,
)

DATASETS = SHARED_DATA   # ../shared/datasets, or $TSDB_DATA_DIR (a worktree)
needs_data = pytest.mark.skipif(not DATASETS.is_dir(), reason=f"no benchmark files at {DATASETS}")


def _load(name: str) -> SeriesDataset:
    from tsdb.data.registry import load_dataset

    return load_dataset(name, root=DATASETS)


# --- metric formulas on a tiny example -------------------------------------------------

# Two series, history of 4 points (seasonal error with m=1 is 2 for both), horizon 2.
TINY_TARGETS = [[0, 2, 4, 6, 10, 10], [3, 1, 3, 1, 2, 2]]
TINY_SAMPLES = np.array([
    [[8, 9], [10, 12], [12, 6]],   # series 0: median [10, 9], mean [10, 9]
    [[2, 3], [0, 4], [1, 5]],      # series 1: median [1, 4], mean [1, 4]
], dtype=np.float32)


@pytest.fixture
def tiny_task():
    start = pd.Period("2020-01-01 00:00", "h")
    series = [Series(f"s{i}", np.array(t, np.float32), start, "h") for i, t in enumerate(TINY_TARGETS)]
    return rolling_task("tiny", SeriesDataset("tiny", series, "h"), horizon=2, season_length=1,
                        offset=-2)


def _weighted_quantile_loss_by_hand(labels: np.ndarray, samples: np.ndarray) -> float:
    """Mean over q of 2 * sum |(y - q_hat)(1{q_hat >= y} - q)| / sum |y|; q_hat is the
    order statistic round((S-1) q) of the samples (GluonTS SampleForecast)."""
    ordered = np.sort(samples, axis=1)
    losses = []
    for q in QUANTILE_LEVELS:
        q_hat = ordered[:, int(np.round((samples.shape[1] - 1) * q)), :]
        losses.append(2 * np.abs((labels - q_hat) * ((q_hat >= labels) - q)).sum() / np.abs(labels).sum())
    return float(np.mean(losses))


def test_metrics_match_hand_computation(tiny_task):
    metrics = tiny_task.evaluate(TINY_SAMPLES)
    labels = np.array([[10, 10], [2, 2]], dtype=np.float64)
    # |median - y| = [[0, 1], [1, 2]]; seasonal error 2 for both series.
    assert metrics["mase"] == pytest.approx((0 + 1 + 1 + 2) / 2 / 4)
    assert metrics["mae"] == pytest.approx(1.0)
    assert metrics["mse"] == pytest.approx((0 + 1 + 1 + 4) / 4)
    # [q0.1, q0.9] = [min, max]: only series 1, step 2 (interval [3, 5], y = 2) misses.
    assert metrics["coverage80"] == pytest.approx(0.75)
    assert metrics["crps"] == pytest.approx(_weighted_quantile_loss_by_hand(labels, TINY_SAMPLES))
    assert metrics["num_windows"] == 2


def test_evaluate_accepts_batches_and_checks_counts(tiny_task):
    whole = tiny_task.evaluate(TINY_SAMPLES)
    assert tiny_task.evaluate(iter([TINY_SAMPLES[:1], TINY_SAMPLES[1:]])) == whole
    with pytest.raises(ValueError, match="1 windows"):
        tiny_task.evaluate(TINY_SAMPLES[:1])
    with pytest.raises(ValueError, match=r"\[N, S, 2\]"):
        tiny_task.evaluate(TINY_SAMPLES[:, :, :1])


def test_window_scores_add_up_to_the_metrics():
    """Per-window scores (what the paired bootstrap resamples) rebuild the headline metrics:
    CRPS as a ratio of sums, MASE/MSE/MAE as means over windows of equal length."""
    rng = np.random.default_rng(0)
    start = pd.Period("2020-01-01 00:00", "h")
    series = [Series(f"s{i}", rng.normal(10 + i, 1 + i, 40).astype(np.float32), start, "h") for i in range(5)]
    task = rolling_task("w", SeriesDataset("w", series, "h"), horizon=4, season_length=2, offset=-12,
                        windows=3, stride=4)
    samples = rng.normal(10, 2, (task.num_windows, 30, 4)).astype(np.float32)
    plain = task.evaluate(samples)
    task.window_scores = True
    metrics = task.evaluate(samples)
    w = {k: np.asarray(v) for k, v in metrics.pop("window_scores").items()}
    assert metrics == plain and all(len(v) == task.num_windows == 15 for v in w.values())
    assert w["crps_num"].sum() / w["abs_target"].sum() == pytest.approx(plain["crps"], rel=1e-6)  # float32 labels
    for key in ("mase", "mse", "mae"):
        assert w[key].mean() == pytest.approx(plain[key], rel=1e-6)
    # window 0 by hand: |y| summed, and MSE of the sample mean
    label = next(iter(task.test_data.label))["target"]
    assert w["abs_target"][0] == pytest.approx(np.abs(label).sum(), rel=1e-6)
    assert w["mse"][0] == pytest.approx(((samples[0].astype(np.float64).mean(0) - label) ** 2).mean(), rel=1e-5)


def test_contexts_left_pad_and_train_split(tiny_task):
    contexts = tiny_task.contexts(6)
    assert contexts.dtype == np.float32 and contexts.shape == (2, 6)
    assert np.isnan(contexts[:, :2]).all()
    np.testing.assert_array_equal(contexts[:, 2:], [[0, 2, 4, 6], [3, 1, 3, 1]])
    assert [len(s) for s in tiny_task.train] == [4, 4]


def test_point_baselines_on_contexts():
    contexts = np.array([[np.nan, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, np.nan]], dtype=np.float32)
    samples = seasonal_naive(2, 3)(contexts, 4)
    assert samples.shape == (2, 4, 3)
    # A missing value is carried forward from the last observation.
    np.testing.assert_array_equal(samples[:, 0], [[4, 5, 4], [5, 5, 5]])
    np.testing.assert_array_equal(repeat_last(2)(contexts, 3)[:, 1], [[5, 5], [5, 5]])


def test_scaler_round_trip():
    values = [np.array([1.0, 3.0]), np.array([5.0, 5.0])]
    scaler = StandardScaler.fit(values)
    np.testing.assert_allclose(scaler.transform(values[0], 0), [-1, 1])
    np.testing.assert_allclose(scaler.transform(values[1], 1), [0, 0])  # constant: std -> 1
    np.testing.assert_allclose(scaler.inverse_transform(np.array([-1.0, 1.0]), 0), values[0])


# --- protocol anchors on the real files (benchmarks.md) --------------------------------

@needs_data
def test_m4_hourly_seasonal_naive_anchor():
    m4 = _load("m4_hourly")
    m4_task = m4_hourly_task(m4)
    assert m4_task.num_windows == 414
    assert [len(s) for s in m4_task.train] == [len(s) - 48 for s in m4]
    metrics = evaluate_predictor(m4_task, seasonal_naive(24, 48), context_length=24,
                                 num_samples=1)
    assert round(metrics["mase"], 3) == 1.193  # GIFT-Eval
    # Identical samples: the weighted quantile loss is the normalized absolute error.
    labels = np.stack([entry["target"] for entry in m4_task.test_data.label])
    nd = metrics["mae"] * labels.size / np.abs(labels).sum()
    assert metrics["crps"] == pytest.approx(nd, rel=1e-6)


@needs_data
def test_etth1_96_anchors():
    task = etth1_task(_load("etth1"), horizon=96, lookback=512, stride=1)
    assert task.num_windows == 7 * (2880 - 96 + 1)
    assert [len(s) for s in task.train] == [8640] * 7
    train = np.stack([s.target for s in task.train])
    np.testing.assert_allclose(train.mean(axis=1), 0, atol=1e-4)
    np.testing.assert_allclose(train.std(axis=1), 1, atol=1e-4)
    contexts = task.contexts(512)
    assert not np.isnan(contexts).any()

    last = evaluate_predictor(task, repeat_last(96), context_length=512, num_samples=1)
    assert (round(last["mse"], 3), round(last["mae"], 3)) == (1.294, 0.713)
    assert last["stride"] == 1 and last["lookback"] == 512
    naive = evaluate_predictor(task, seasonal_naive(24, 96), context_length=512, num_samples=1)
    assert (round(naive["mse"], 3), round(naive["mae"], 3)) == (0.512, 0.433)


@needs_data
def test_etth1_val_split_and_stride():
    task = etth1_task(_load("etth1"), horizon=192, lookback=336, stride=24, split="val")
    assert task.num_windows == 7 * ((2880 - 192) // 24 + 1)
    first = next(iter(task.test_data.input))
    assert len(first["target"]) == 336
    assert first["start"] == task.train.series[0].start + 8640 - 336


# --- DeepAR peer ------------------------------------------------------------------------

@pytest.fixture
def one_torch_thread():
    """Two torch threads on a shared 2-core machine can be 50x slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@needs_data
def test_deepar_tiny_budget_gives_finite_metrics(one_torch_thread):
    m4 = _load("m4_hourly")
    task = m4_hourly_task(SeriesDataset(m4.name, m4.series[:8], m4.freq, 24))
    arm = fit_deepar(task, context_length=96, epochs=2, num_batches_per_epoch=5, seed=0,
                     hidden_size=16, num_layers=2)
    metrics = arm.evaluate(task, num_samples=20)
    assert metrics["num_windows"] == 8
    assert all(math.isfinite(metrics[k]) for k in ("crps", "mase", "mse", "mae", "coverage80"))
    assert metrics["train_seconds"] > 0 and metrics["predict_seconds"] > 0


@needs_data
def test_m4_hourly_validation_window_is_the_48_points_before_the_test_window():
    m4 = _load("m4_hourly")
    val, test = m4_hourly_task(m4, split="val"), m4_hourly_task(m4)
    assert val.num_windows == test.num_windows == 414 and val.info["split"] == "val"
    assert [len(s) for s in val.train] == [len(s) - 96 for s in m4]
    for series, label, test_label in zip(m4, val.test_data.label, test.test_data.label):
        np.testing.assert_array_equal(label["target"], series.target[-96:-48])
        assert label["start"] + 48 == test_label["start"]
    with pytest.raises(ValueError, match="split"):
        m4_hourly_task(m4, split="train")


@needs_data
def test_rolling_validation_window_precedes_the_test_windows():
    """Exchange rate (the GluonTS recipe): 5 test windows of 30; validation is the window of
    30 before the first, and its training part ends before it."""
    from tsdb.evaluation.tasks import rolling_protocol_task

    rates = _load("exchange_rate")
    test = rolling_protocol_task(rates, 30, windows=5, stride=30)
    val = rolling_protocol_task(rates, 30, windows=5, stride=30, split="val")
    assert test.num_windows == 8 * 5 and val.num_windows == 8
    n = len(rates.series[0])
    assert [len(s) for s in val.train] == [n - 6 * 30] * 8
    first_test = next(iter(test.test_data.label))
    first_val = next(iter(val.test_data.label))
    assert first_val["start"] + 30 == first_test["start"]
    np.testing.assert_array_equal(first_val["target"], rates.series[0].target[n - 180:n - 150])
