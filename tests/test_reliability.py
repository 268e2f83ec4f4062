"""Silent-wrong-output fixes: timestamps keep their offset, a tiny-scale series gets intervals
on its own scale, huge values stay finite, `--out` holding another input's model is refused,
`tsdb evaluate` writes evaluation.json on the run's own data, training never sees a protocol's
test part, the window stream is addressable by position, the thread default."""

import json
from argparse import Namespace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from tsdb.cli import preflight
from tsdb.cli.main import resolve_threads
from tsdb.data import SeriesDataset, load_dataset, read_long
from tsdb.data.series import Series
from tsdb.data.windows import TrainingWindows
from tsdb.errors import DataError, TsdbError
from tsdb.evaluation.run import evaluate_run
from tsdb.cli.forecast import forecast_csv
from tsdb.nn import instance_stats


def write_csv(path, values, start="2024-01-01 00:30", freq="h", item="s"):
    pd.DataFrame({"id": item, "ts": pd.date_range(start, periods=len(values), freq=freq), "y": values}
                 ).to_csv(path, index=False)
    return path


def forecast(csv, out, run, horizon=8):
    forecast_csv(Namespace(input=str(csv), item_id="id", timestamp="ts", target="y", freq="h", horizon=horizon,
                           out=str(out), run=str(run), num_samples=50, steps=1, covariates=None))
    return pd.read_csv(out / "forecast.csv", parse_dates=["timestamp"])


def test_forecast_keeps_the_series_offset(tiny_run, tmp_path):
    csv = write_csv(tmp_path / "s.csv", 10 + np.sin(np.arange(60) / 3))
    table = forecast(csv, tmp_path / "out", tiny_run)
    last = pd.Timestamp("2024-01-01 00:30") + pd.Timedelta(hours=59)
    assert list(table["timestamp"]) == list(pd.date_range(last + pd.Timedelta(hours=1), periods=8, freq="h"))
    assert (table["timestamp"].dt.minute == 30).all()


def test_tiny_scale_series_gets_intervals_on_its_own_scale(tiny_run, tmp_path):
    values = 1e-7 * (1 + 0.1 * np.sin(np.arange(60) / 3))
    loc, scale = instance_stats(torch.tensor(values[None], dtype=torch.float32))
    assert scale.item() == pytest.approx(values.std(), rel=1e-3)     # not the old absolute floor of 1
    table = forecast(write_csv(tmp_path / "s.csv", values), tmp_path / "out", tiny_run)
    width = (table["q0.9"] - table["q0.1"]).to_numpy()
    assert (width > 0).all() and width.max() < 1e-5
    assert (table["mean"] - 1e-7).abs().max() < 1e-5


def test_constant_series_scales():
    loc, scale = instance_stats(torch.tensor([[5e-8] * 8, [100.0] * 8, [0.0] * 8, [float("nan")] * 8]))
    assert torch.allclose(scale[:, 0], torch.tensor([5e-8, 1.0, 1.0, 1.0]))


def test_a_huge_outlier_gives_a_finite_forecast(tiny_run, tmp_path):
    values = 100 + np.sin(np.arange(60) / 3)
    values[40] = 1e20
    table = forecast(write_csv(tmp_path / "s.csv", values), tmp_path / "out", tiny_run)
    assert np.isfinite(table.drop(columns=["item_id", "timestamp"]).to_numpy()).all()
    loc, scale = instance_stats(torch.tensor(values[None], dtype=torch.float32))
    assert torch.isfinite(scale).all() and scale.item() > 1e18


def test_out_holding_another_inputs_model_is_refused(tmp_path):
    a = write_csv(tmp_path / "a.csv", np.arange(60.0))
    b = write_csv(tmp_path / "b.csv", np.arange(60.0) * 2)
    args = Namespace(input=str(a), item_id="id", timestamp="ts", target="y", freq="h", covariates=None)
    run = tmp_path / "out" / "run"
    preflight.record_training_data(run, preflight.input_fingerprint(args) | {"held_out": 0})
    preflight.check_reuse(run, preflight.input_fingerprint(args))            # same input: reused
    moved = tmp_path / "moved.csv"
    moved.write_bytes(a.read_bytes())
    preflight.check_reuse(run, preflight.input_fingerprint(Namespace(**{**vars(args), "input": str(moved)})))
    with pytest.raises(TsdbError, match="trained on other input"):
        preflight.check_reuse(run, preflight.input_fingerprint(Namespace(**{**vars(args), "input": str(b)})))
    with pytest.raises(TsdbError, match="trained on other input"):
        preflight.check_reuse(run, preflight.input_fingerprint(Namespace(**{**vars(args), "target": "id"})))


def test_evaluate_scores_the_runs_own_data_into_evaluation_json(tiny_run, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("onnx"))
    csv = write_csv(tmp_path / "s.csv", 10 + np.sin(np.arange(120) / 3))
    args = Namespace(input=str(csv), item_id="id", timestamp="ts", target="y", freq="h", covariates=None)
    preflight.record_training_data(run, preflight.input_fingerprint(args) | {"held_out": 0})
    (run / "metrics.json").write_text('{"crps": 0.123}')
    path, metrics = evaluate_run(run, num_samples=8, windows=2)
    assert path == run / "evaluation.json" and json.loads(path.read_text()) == metrics
    assert json.loads((run / "metrics.json").read_text()) == {"crps": 0.123}    # training metrics untouched
    assert metrics["task"] == "s" and metrics["num_windows"] == 2 and np.isfinite(metrics["crps"])
    assert metrics["in_sample"] and "every point" in metrics["in_sample_reason"]


def test_training_on_a_benchmark_never_sees_its_test_part():
    from tsdb.cli.main import _training_data
    from tsdb.config import ExperimentConfig
    try:
        full = load_dataset("m4_hourly")
    except DataError as e:
        pytest.skip(str(e))
    cfg = ExperimentConfig().with_overrides(data={"dataset": "m4_hourly"})
    train, record = _training_data(Namespace(input=None, data_root=None), cfg)
    assert record == {"source": "dataset", "dataset": "m4_hourly", "protocol": "m4-hourly", "held_out": 48}
    horizon = full.meta["prediction_length"]
    assert horizon == 48 and len(train) == len(full)
    for s, whole in zip(train, full):
        assert len(s) == len(whole) - horizon and np.array_equal(s.target, whole.target[:-horizon], equal_nan=True)


def windows():
    rng = np.random.default_rng(0)
    data = SeriesDataset("d", [Series(str(i), rng.normal(size=n).astype(np.float32), pd.Period("2020-01-01", "h"),
                                      "h") for i, n in enumerate((50, 90, 70))], "h")
    return TrainingWindows(data, 16, 8, seed=3, patch_length=4, partial_patch_prob=0.5)


def take(dataset, n, **loader) -> torch.Tensor:
    """The first ``n`` windows of a stream (context, target and draws side by side; NaN -> -99)."""
    batches = iter(DataLoader(dataset, batch_size=4, **loader))
    return torch.cat([torch.cat(next(batches), dim=1) for _ in range(n // 4)]).nan_to_num(-99.0)


def test_window_stream_is_addressable_by_position():
    w = windows()
    stream = take(w, 24)
    assert torch.equal(take(w.start_at(8), 16), stream[8:])                    # resume at a position
    ranks = [take(w.shard(r, 2, 2), 12) for r in range(2)]                     # data parallel: r, r + 2, ...
    assert torch.equal(torch.stack(ranks, 1).reshape(stream.shape), stream)
    workers = take(w.shard(0, 1, 4), 24, num_workers=2)                        # DataLoader workers
    assert torch.equal(workers, stream)
    assert (stream == -99).any() and len(set(stream[:, -1].tolist())) == 24   # padding seen; windows differ


def test_thread_default_leaves_busy_cores_alone(monkeypatch):
    monkeypatch.delenv("TSDB_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.getloadavg", lambda: (5.0, 5.0, 5.0))
    assert resolve_threads(None) == 1
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))
    assert resolve_threads(None) >= 1
    assert resolve_threads(3) == 3
    monkeypatch.setenv("TSDB_NUM_THREADS", "2")
    assert resolve_threads(None) == 2
    monkeypatch.setenv("TSDB_NUM_THREADS", "lots")
    with pytest.raises(TsdbError, match="TSDB_NUM_THREADS"):
        resolve_threads(None)


def test_stream_read_long_of_an_offset_series_records_it(tmp_path):
    data = read_long(write_csv(tmp_path / "s.csv", np.arange(10.0)), "id", "ts", "y")
    assert data.series[0].meta["start_offset"] == pd.Timedelta(minutes=30)


def test_a_failed_export_leaves_the_earlier_one_and_no_partial_folder(tiny_run, tmp_path, monkeypatch):
    import shutil

    import tsdb.export.onnx
    from tsdb.strategies.depth.online import DepthStreaming
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = sorted(p.name for p in (run / "onnx").iterdir())

    def fails(self, model, out, num_steps=None):
        Path(out).mkdir(parents=True)
        (Path(out) / "update.onnx").write_bytes(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(DepthStreaming, "export", fails)
    with pytest.raises(KeyboardInterrupt):
        tsdb.export.onnx.export_run(run)
    assert sorted(p.name for p in (run / "onnx").iterdir()) == before
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "model.pt", "onnx"]


@pytest.mark.parametrize("location_window", [0, 5])
def test_runtime_normalisation_matches_torch(location_window):
    """The runtime's numpy statistics follow tsdb.nn.instance_stats: relative floor, float64 sums,
    the recent location (the last row's last 5 values are missing: the whole mean stands in)."""
    from tsdb.cli.stream import import_runtime
    import_runtime()
    from tsdb_streaming.numerics import instance_stats as runtime_stats
    rows = np.array([10 + np.sin(np.arange(32.0)), 1e-7 * (1 + 0.1 * np.sin(np.arange(32.0))), np.full(32, 5e-8),
                     np.r_[np.full(31, 100.0), 1e20], np.r_[np.arange(27.0), np.full(5, np.nan)]], dtype=np.float32)
    loc, scale = instance_stats(torch.from_numpy(rows), location_window)
    with np.errstate(all="ignore"):
        rt_loc, rt_scale = runtime_stats(rows, location_window)
    assert rt_loc[-1, 0] == pytest.approx(13.0)
    assert np.allclose(rt_loc, loc.numpy(), rtol=1e-5) and np.allclose(rt_scale, scale.numpy(), rtol=1e-5)
