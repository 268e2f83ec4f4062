"""``tsdb bench streamed-accuracy``'s comparison on the tiny exported depth model (random
weights, ``conftest.tiny_run``) and synthetic trending series: the runtime fed one value at
a time and refreshed before each forecast must agree with the cold ``strategy.forecast``
samples and scores at every origin; frozen statistics must not (the comparison sees it)."""

import numpy as np
import pandas as pd
import pytest
import torch

from tsdb.bench.streamed_accuracy import (Policy, Stream, cold_forecasts, compare, draw_noise,
                                          parity_at_first_origin, rolling_stream, streamed_forecasts)
from conftest import forecasts_after_different_pasts
from tsdb.config import ExperimentConfig
from tsdb.data.series import Series, SeriesDataset
from tsdb.errors import TsdbError
from tsdb.evaluation.tasks import rolling_task
from tsdb.strategies import get_strategy

FIRST, LOOKBACK, STRIDE = 120, 60, 13   # origins off the patch grid (patch 4) too
OFFSETS = [k * STRIDE for k in range(4)]
SAMPLES = 16


@pytest.fixture(scope="module")
def bench(tiny_run):
    cfg = ExperimentConfig.from_yaml(tiny_run / "config.yaml").model
    strategy = get_strategy(cfg)
    model = strategy.build().eval()
    model.load_state_dict(torch.load(tiny_run / "model.pt", weights_only=True))
    rng = np.random.default_rng(0)
    t = np.arange(200)
    # a level that drifts by several of the context's standard deviations over the stream
    targets = [(50 + 0.4 * (i + 1) * t + 3 * np.sin(2 * np.pi * t / 12) + rng.normal(0, 0.5, 200)).astype(np.float32)
               for i in range(3)]
    ds = SeriesDataset("drift", [Series(f"s{i}", x, pd.Period("2021-01-01 00:00", "h"), "h")
                                 for i, x in enumerate(targets)], "h", 12)
    task = rolling_task("drift", ds, cfg.horizon, 12, offset=FIRST, windows=len(OFFSETS), stride=STRIDE)
    task.window_scores = True
    stream = rolling_stream(task, targets, [s.item_id for s in ds], FIRST, LOOKBACK, OFFSETS)
    noise = draw_noise(0, task.num_windows, SAMPLES, cfg.horizon)
    cold = cold_forecasts(strategy, model, task, noise, SAMPLES, seed=0)
    return tiny_run / "onnx", cfg, stream, noise, cold


def test_runtime_started_from_the_cold_context_gives_the_cold_samples(bench):
    """Each series initialised from exactly its cold context at the first origin: the same
    samples up to float rounding (so the noise rows and the window order line up)."""
    model_dir, cfg, stream, noise, cold = bench
    assert parity_at_first_origin(model_dir, stream, cfg, cold, noise, SAMPLES, len(stream.ids)) < 1e-4


def test_stream_reinitialised_from_the_context_gives_the_cold_forecasts_and_scores(bench):
    """Streamed one value at a time by the runtime with ``refresh="context"`` (each series
    rebuilt from exactly its cold context inside each forecast): the cold samples and scores
    at every origin, on and off the patch grid."""
    model_dir, cfg, stream, noise, cold = bench
    samples, _ = streamed_forecasts(model_dir, stream, Policy(refresh="context"), cfg, SAMPLES, 0, noise)
    scale = np.array([np.std(c) for c in stream.task.contexts(cfg.context_length)])[:, None, None]
    assert np.max(np.abs(samples - cold) / scale) < 1e-4
    cold_m, streamed_m = stream.task.evaluate(cold), stream.task.evaluate(samples)
    assert compare(stream, [cold_m], [streamed_m])["verdict"] == "equal (float rounding)"


def test_refreshed_stream_agrees_with_cold_forecasts_and_scores(bench):
    """Streamed one value at a time and refreshed before each forecast (statistics of the
    same last values as cold): the forecasts agree at every origin, on and off the patch
    grid, within the cache's receptive field beyond the context (the re-initialised state
    spans more tokens than the context; under 1% of the scale here)."""
    model_dir, cfg, stream, noise, cold = bench
    samples, cost = streamed_forecasts(model_dir, stream, Policy(at_forecast="refresh"), cfg, SAMPLES, 0, noise)
    scale = np.array([np.std(c) for c in stream.task.contexts(cfg.context_length)])[:, None, None]
    assert np.max(np.abs(samples - cold) / scale) < 2e-2
    assert cost["values_streamed"] == OFFSETS[-1] and cost["refreshes_per_series"] >= len(OFFSETS)
    cold_m, streamed_m = stream.task.evaluate(cold), stream.task.evaluate(samples)
    assert streamed_m["crps"] == pytest.approx(cold_m["crps"], rel=1e-2)
    assert compare(stream, [cold_m], [streamed_m])["crps_ratio"] == pytest.approx(1, abs=1e-2)


def test_frozen_statistics_drift_away_from_cold(bench):
    """Never refreshed, the stream normalises the drifting series with the statistics of its
    initial history: forecasts after the first origin are far from cold, and worse."""
    model_dir, cfg, stream, noise, cold = bench
    samples, _ = streamed_forecasts(model_dir, stream, Policy(refresh="none"), cfg, SAMPLES, 0, noise)
    last = [stream.window(i, len(OFFSETS) - 1) for i in range(len(stream.ids))]
    scale = np.array([np.std(c) for c in stream.task.contexts(cfg.context_length)[last]])[:, None, None]
    assert np.min(np.max(np.abs(samples[last] - cold[last]) / scale, axis=(1, 2))) > 0.5
    verdict = compare(stream, [stream.task.evaluate(cold)], [stream.task.evaluate(samples)])
    assert verdict["crps_ratio"] > 1.2 and verdict["windows_worse"] > 0.5


def test_a_stream_out_of_window_order_is_refused(bench):
    _, cfg, stream, _, _ = bench
    swapped = Stream(stream.ids[::-1], stream.history[::-1], stream.values[::-1], stream.offsets, stream.task)
    with pytest.raises(TsdbError, match="does not end with the input of window 0"):
        swapped.check(cfg.context_length)


def test_context_refresh_forgets_everything_before_the_context(tiny_run):
    """``refresh="context"``: a forecast reads only the last ``context_length`` values, as the
    cold path does; the default sliding state still carries the older past (and its frozen
    statistics) into the forecast."""
    cfg = ExperimentConfig.from_yaml(tiny_run / "config.yaml").model
    recent = cfg.context_length + cfg.patch_length + 1
    bounded = forecasts_after_different_pasts(tiny_run / "onnx", "context", recent)
    assert np.abs(bounded[0] - bounded[1]).max() < 1e-4
    sliding = forecasts_after_different_pasts(tiny_run / "onnx", "warmup", recent)
    assert np.abs(sliding[0] - sliding[1]).max() > 1e-2


def _has_etth1() -> bool:
    from tsdb.data.registry import data_dirs
    return any((d / "ETTh1.csv").exists() for d in data_dirs())


@pytest.mark.skipif(not _has_etth1(), reason="benchmark files absent")
def test_bench_scores_each_strategy_at_its_seeds_and_reuses_scored_seeds(tmp_path):
    """The whole bench on ETTh1 with tiny models: a strategy with its own seeds runs only those;
    a second run reuses every seed's scores (nothing retrained or streamed) and reports the same."""
    from tsdb.bench.streamed_accuracy import StreamedAccuracySpec, run_streamed_accuracy

    spec = StreamedAccuracySpec.model_validate({
        "num_samples": 4, "seeds": [0, 1], "strategy_seeds": {"depth": [1]}, "parity_series": 2,
        "datasets": {"etth1": {"task": {"protocol": "etth1", "dataset": "etth1", "horizon": 16, "lookback": 64,
                                        "stride": 1200}, "model": {"context_length": 64, "horizon": 16}}},
        "base": {"model": {"patch_length": 8, "d_model": 16, "n_heads": 2, "n_layers": 2, "n_blocks": 2,
                           "num_steps": 2, "core_layers": 1},
                 "train": {"steps_per_block": 2, "batch_size": 8, "warmup_steps": 0}},
        "strategies": {"depth": {"model": {"strategy": "depth"}}},
        "policies": {"context": {"refresh": "context"}}})
    lines = []
    first = run_streamed_accuracy(tmp_path / "out", spec, work=tmp_path / "work", log=lines.append)
    assert [sorted(r["seeds"]) for r in first["rows"]] == [["1"]]
    assert all(r["policies"]["context"]["verdict"] == "equal (float rounding)" for r in first["rows"])
    lines.clear()
    again = run_streamed_accuracy(tmp_path / "out2", spec, work=tmp_path / "work", log=lines.append)
    assert sum("scores reused" in line for line in lines) == 1
    assert [r["policies"] for r in again["rows"]] == [r["policies"] for r in first["rows"]]
    # into the first report's folder: its finished row is kept as it is, nothing is scored again
    lines.clear()
    kept = run_streamed_accuracy(tmp_path / "out", spec, work=tmp_path / "work", log=lines.append)
    assert sum("row reused" in line for line in lines) == 1 and not any("scores reused" in x for x in lines)
    assert kept["rows"][0]["reused"] and kept["rows"][0]["policies"] == first["rows"][0]["policies"]
    assert "kept from an earlier run" in (tmp_path / "out" / "report.md").read_text()
