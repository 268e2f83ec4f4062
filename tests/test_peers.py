"""Peers as bench arms (tsdb.evaluation.peers): each forecasts the task's windows and is
scored by EvalTask; quantile scoring checked against gluonts' own quantile forecasts; the
ridge peer checked against a direct least-squares solve and on a series it can fit exactly."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from gluonts.model.evaluation import evaluate_forecasts_raw
from gluonts.model.forecast import QuantileForecast

from conftest import SHARED_DATA
from tsdb.evaluation.baselines import seasonal_naive
from tsdb.data.series import Series, SeriesDataset
from tsdb.evaluation.tasks import METRICS, QUANTILE_LEVELS, evaluate_predictor, m4_hourly_task, rolling_task
from tsdb.evaluation import peers

pytest.importorskip("statsforecast")
pytest.importorskip("neuralforecast")

METRIC_KEYS = ("crps", "mase", "mse", "mae", "coverage80")
DATA = Path(os.environ.get("TSDB_DATA_DIR") or SHARED_DATA)   # a worktree points here at the shared files


def _require_m4() -> None:
    if not all((DATA / f).exists() for f in ("m4_hourly_train.csv", "m4_hourly_test.csv")):
        pytest.skip(f"no M4 Hourly files in {DATA}")


def _synthetic(targets: list[np.ndarray], horizon: int, **kw) -> SeriesDataset:
    start = pd.Period("2024-01-01 00:00", freq="h")
    series = [Series(f"s{i}", np.asarray(t, np.float32), start, "h") for i, t in enumerate(targets)]
    return rolling_task("synthetic", SeriesDataset("synthetic", series, "h", 24), horizon, 24,
                        offset=-horizon, **kw)


@pytest.fixture(scope="module")
def m4_tiny():
    _require_m4()
    from tsdb.data.registry import load_dataset
    m4 = load_dataset("m4_hourly", root=DATA)
    return m4_hourly_task(SeriesDataset(m4.name, m4.series[:4], m4.freq, 24))


def _check_arm(result: dict, task, budget_keys: tuple[str, ...]) -> None:
    assert result["num_windows"] == task.num_windows
    assert all(math.isfinite(result[k]) for k in METRIC_KEYS), result
    assert 0 <= result["coverage80"] <= 1
    assert result["fit_predict_seconds"] > 0 and result["cpu_seconds"] >= 0
    assert result["library"].split()[1][0].isdigit()  # "name version"
    assert set(budget_keys) <= set(result["budget"]), result["budget"]


# --- scoring quantile peers -------------------------------------------------------------

def test_quantile_samples_score_like_gluonts_quantile_forecasts():
    """11 samples from 9 quantiles + a point forecast give exactly the metrics gluonts
    computes from a QuantileForecast of the same quantiles (the point as its mean); the
    naive 10-sample layout (quantiles + point) does not."""
    rng = np.random.default_rng(0)
    horizon = 12
    task = _synthetic([rng.normal(10, 3, 100) for _ in range(5)], horizon)
    quantiles = np.sort(rng.normal(10, 3, (5, 9, horizon)), axis=1)
    point = quantiles[:, 4] + rng.normal(0, 2, (5, horizon))   # a mean away from the median
    samples = peers.quantiles_as_samples(quantiles, point)
    np.testing.assert_allclose(samples.mean(axis=1), point, rtol=1e-12)
    ours = task.evaluate(samples)

    keys = [str(q) for q in QUANTILE_LEVELS] + ["mean"]
    forecasts = [QuantileForecast(np.vstack([q, p[None]]), start_date=label["start"], forecast_keys=keys)
                 for q, p, label in zip(quantiles, point, task.test_data.label)]
    raw = evaluate_forecasts_raw(forecasts, test_data=task.test_data, metrics=METRICS, seasonality=24)
    assert ours["crps"] == pytest.approx(float(raw["mean_weighted_sum_quantile_loss"]), rel=1e-9)
    assert ours["mase"] == pytest.approx(float(raw["MASE[0.5]"]), rel=1e-9)
    assert ours["mse"] == pytest.approx(float(raw["MSE[mean]"]), rel=1e-9)
    assert ours["coverage80"] == pytest.approx(float(raw["coverage[0.9]"] - raw["coverage[0.1]"]))

    naive = task.evaluate(np.concatenate([quantiles, point[:, None]], axis=1))
    assert abs(naive["crps"] - ours["crps"]) > 1e-3 * ours["crps"]


def test_quantile_samples_reject_other_shapes():
    with pytest.raises(ValueError, match=r"\[N, 9, H\]"):
        peers.quantiles_as_samples(np.zeros((2, 5, 3)), np.zeros((2, 3)))


# --- the linear peer --------------------------------------------------------------------

def test_ridge_matches_a_direct_least_squares_solve():
    """W, b of the closed form equal numpy's lstsq on the augmented ridge system built here
    from the windows' definition (normalised by each context's last value and std)."""
    rng = np.random.default_rng(1)
    lookback, horizon, alpha = 10, 3, 0.05
    series = [np.cumsum(rng.normal(size=n)) + 5 for n in (60, 75)]
    peer = peers.LinearPeer(lookback, horizon, alphas=[alpha]).fit(series)

    rows, targets = [], []
    for s in series:
        for k in range(len(s) - lookback - horizon + 1):
            ctx, y = s[k:k + lookback], s[k + lookback:k + lookback + horizon]
            rows.append(np.append((ctx - ctx[-1]) / ctx.std(), 1.0))
            targets.append((y - ctx[-1]) / ctx.std())
    a, t = np.array(rows), np.array(targets)
    penalty = np.sqrt(alpha * len(a)) * np.eye(lookback + 1)[:lookback]   # intercept not shrunk
    coef = np.linalg.lstsq(np.vstack([a, penalty]), np.vstack([t, np.zeros((lookback, horizon))]), rcond=None)[0]
    np.testing.assert_allclose(peer.weights, coef[:-1], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(peer.bias, coef[-1], rtol=1e-8, atol=1e-10)
    assert peer.num_windows["all"] == len(a) and peer.alpha == alpha
    assert peer.residual_quantiles.shape == (9, horizon)
    assert np.all(np.diff(peer.residual_quantiles, axis=0) >= 0)


def test_linear_peer_forecasts_a_linearly_predictable_series_exactly():
    """A daily profile plus a trend, at different levels and scales, is an exact linear
    function of its last 24 + 1 points: the ridge peer's error is near zero, and it picks
    the smallest alpha on validation."""
    rng = np.random.default_rng(2)
    t = np.arange(400)
    targets = [scale * (rng.normal(size=24)[t % 24] + slope * t) + level
               for scale, slope, level in [(1, 0.01, 0), (50, -0.02, 1000), (0.1, 0.0, -3)]]
    task = _synthetic(targets, horizon=24)
    result = peers.linear_peer(task, lookback=72, alphas=[1e-10, 1e-2, 1.0])
    _check_arm(result, task, ("lookback", "alpha", "windows", "params", "val_mse_by_alpha"))
    assert result["mase"] < 1e-3 and result["crps"] < 1e-3
    assert result["budget"]["alpha"] == 1e-10 and result["params"] == 72 * 24 + 24


def test_linear_peer_needs_long_enough_series():
    task = _synthetic([np.arange(50.0)], horizon=10)
    with pytest.raises(Exception, match="lookback"):
        peers.linear_peer(task, lookback=40)


# --- statsforecast, neuralforecast, DeepAR on real data --------------------------------

@pytest.mark.parametrize("kind", peers.STATS_KINDS)
def test_statsforecast_peers(m4_tiny, kind):
    seasons = [24, 168] if kind == "mstl" else None
    result = peers.statsforecast_peer(m4_tiny, kind, seasons)
    _check_arm(result, m4_tiny, ("model", "season_lengths", "interval_levels", "n_jobs"))
    assert result["num_samples"] == 11
    if kind == "seasonal-naive":   # statsforecast's point forecast is tsdb's seasonal naive
        ours = evaluate_predictor(m4_tiny, seasonal_naive(24, 48), 24, num_samples=1)
        assert result["mase"] == pytest.approx(ours["mase"], rel=1e-6)
        assert result["coverage80"] > 0.3   # its own intervals, not a point


TINY_NETS = {"nhits": {"mlp_units": 3 * [[32, 32]]}, "patchtst": {"hidden_size": 16, "n_heads": 2,
                                                                  "linear_hidden_size": 32}}


@pytest.mark.parametrize("kind", peers.NEURAL_KINDS)
def test_neuralforecast_peers(m4_tiny, kind):
    result = peers.neuralforecast_peer(m4_tiny, kind, input_size=96, max_steps=5, seed=3, windows_batch_size=64,
                                       **TINY_NETS[kind])
    _check_arm(result, m4_tiny, ("max_steps", "input_size", "seed", "params"))
    budget = result["budget"]
    assert budget["steps_done"] == budget["max_steps"] == 5 and budget["seed"] == 3
    assert budget["library_default_max_steps"] == peers.library_default_steps(kind) >= 1000
    assert result["params"] > 0 and not budget["early_stopping"] and budget["cut_below_library_default"]


def test_deepar_peer_keeps_lags_inside_the_lookback():
    """With windows that carry 200 points, lags <= 169 leave a context of 31."""
    rng = np.random.default_rng(4)
    t = np.arange(600)
    targets = [10 + np.sin(2 * np.pi * t / 24) + rng.normal(0, 0.1, 600) for _ in range(3)]
    task = _synthetic(targets, horizon=12, max_history=200, info={"lookback": 200})
    result = peers.deepar_peer(task, context_length=336, epochs=1, num_batches_per_epoch=2, num_samples=8,
                               hidden_size=8, num_layers=1)
    _check_arm(result, task, ("epochs", "num_batches_per_epoch", "steps", "context_length", "max_lag", "params"))
    assert result["budget"]["context_length"] == 31 and result["budget"]["max_lag"] <= 169
    assert result["budget"]["cut_below_library_default"]


# --- the bench ----------------------------------------------------------------------------

def test_bench_runs_peers_as_arms_and_reports_their_budgets(tmp_path):
    _require_m4()
    from tsdb.bench.experiment import ExperimentSpec, run_experiment
    spec = ExperimentSpec.model_validate({
        "name": "m4-peers-tiny", "task": {"protocol": "m4-hourly", "dataset": "m4_hourly", "max_windows": 6},
        "base": {"model": {"context_length": 96, "horizon": 48}},
        "baselines": ["seasonal-naive"],
        "peers": {"sf-naive": {"kind": "seasonal-naive"}, "linear": {"kind": "linear", "lookback": 48, "alphas": [0.1, 1.0]}},
    })
    results = run_experiment(spec, tmp_path, root=str(DATA), log=lambda *_: None)
    assert list(results["arms"]) == ["seasonal-naive", "sf-naive", "linear"]
    assert results["arms"]["linear"]["budget"]["lookback"] == 48
    assert all(results["arms"][n]["num_windows"] == 6 for n in results["arms"])
    report = (tmp_path / "report.md").read_text()
    assert "- linear (numpy" in report and "lookback 48" in report and "- sf-naive (statsforecast" in report
    assert yaml.safe_load((tmp_path / "spec.yaml").read_text())["peers"]["sf-naive"]["kind"] == "seasonal-naive"


def test_bench_spec_rejects_a_peer_named_like_an_arm():
    from tsdb.bench.experiment import ExperimentSpec
    with pytest.raises(ValueError, match="used twice"):
        ExperimentSpec.model_validate({"name": "x", "task": {"protocol": "m4-hourly", "dataset": "m4_hourly"},
                                       "arms": {"linear": {}}, "peers": {"linear": {"kind": "linear"}}})
    with pytest.raises(ValueError, match="kind"):
        ExperimentSpec.model_validate({"name": "x", "task": {"protocol": "m4-hourly", "dataset": "m4_hourly"},
                                       "peers": {"p": {"kind": "prophet"}}})
