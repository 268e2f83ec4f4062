"""The tsdb command line: outputs, run directories and one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import polars as pl
import yaml

from tsdb.cli.main import main

from conftest import require_benchmark_data


def tsdb(*args, check=True):
    """Run the CLI in a subprocess (as a user would) and return the completed process."""
    proc = subprocess.run([sys.executable, "-m", "tsdb.cli.main", *args], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


def user_csv(path, n_series=2, length=240):
    t = np.arange(length)
    frames = [pd.DataFrame({"store": f"store-{i}",
                            "ts": pd.date_range("2024-01-01", periods=length, freq="h"),
                            "sales": 100 + 10 * np.sin(2 * np.pi * t / 24) + i}) for i in range(n_series)]
    pd.concat(frames).to_csv(path, index=False)
    return path


def test_datasets_lists_the_registry(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    for name in ("m4_hourly", "etth1", "vic_elec", "exchange_rate"):
        assert name in out


def test_forecast_a_user_csv(tmp_path):
    csv = user_csv(tmp_path / "sales.csv")
    out = tmp_path / "fc"
    proc = tsdb("forecast", "--input", str(csv), "--item-id", "store", "--timestamp", "ts", "--target", "sales",
                "--freq", "h", "--horizon", "12", "--out", str(out), "--steps", "3", "--num-samples", "20",
                "--no-progress")
    assert "windows centred on their last season's mean (24 points)" in proc.stdout
    assert "it/s" not in proc.stdout + proc.stderr     # --no-progress: no training bars in a log
    table = pl.read_csv(out / "forecast.csv", try_parse_dates=True)
    assert table.columns == ["item_id", "timestamp", "mean"] + [f"q{q}" for q in
                                                                 (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)]
    assert table.height == 2 * 12
    first = table.filter(pl.col("item_id") == "store-0")["timestamp"][0]
    assert pd.Timestamp(first) == pd.Timestamp("2024-01-01") + pd.Timedelta(hours=240)
    q = table.select([f"q{v}" for v in (0.1, 0.5, 0.9)]).to_numpy()
    assert (q[:, 0] <= q[:, 1]).all() and (q[:, 1] <= q[:, 2]).all()
    assert (out / "forecast.png").stat().st_size > 10_000
    # reuse the trained run: a longer horizon than the model's is a one-line error
    proc = tsdb("forecast", "--run", str(out / "run"), "--input", str(csv), "--item-id", "store",
                "--timestamp", "ts", "--target", "sales", "--horizon", "99", "--out", str(tmp_path / "x"),
                check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "tsdb: error: --horizon 99 exceeds the trained model's horizon 12; retrain with model.horizon >= 99"]
    # the model was scored on the last 12 points of each series (held out of its training)
    # beside seasonal naive and AutoETS, by the benchmarks' code
    validation = json.loads((out / "validation.json").read_text())
    assert validation["horizon"] == 12 and validation["windows"] == 2
    assert set(validation["models"]) == {"tsdb depth-b4", "seasonal naive", "AutoETS"}
    # (a pure sinusoid: seasonal naive is exact, so MASE is 0/0 here; CRPS is defined)
    assert all(np.isfinite(m["crps"]) and m["crps"] >= 0 for m in validation["models"].values())
    assert validation["models"]["seasonal naive"]["crps"] < 1e-6   # exact: the window is on the data's phase
    assert "| AutoETS |" in (out / "validation.md").read_text()
    data = json.loads((out / "run" / "data.json").read_text())
    assert data["held_out"] == 12


def test_bad_input_is_one_line_naming_the_series(tmp_path):
    csv = tmp_path / "bad.csv"
    pd.DataFrame({"store": ["a", "a", "b", "b"],
                  "ts": ["2024-01-01 00:00", "2024-01-01 01:00", "2024-01-01 00:00", "2024-01-01 00:00"],
                  "sales": [1.0, 2.0, 3.0, 4.0]}).to_csv(csv, index=False)
    proc = tsdb("forecast", "--input", str(csv), "--item-id", "store", "--timestamp", "ts", "--target", "sales",
                "--freq", "h", "--horizon", "2", "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "'b'" in lines[0] and "duplicate" in lines[0], lines


def test_config_errors_name_the_field(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"n_blokcs": 4}}))
    proc = tsdb("train", "--config", str(cfg), "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"tsdb: error: {cfg}: model.n_blokcs: Extra inputs are not permitted"


def test_unknown_benchmark_and_dataset(tmp_path):
    proc = tsdb("bench", "nope", check=False)
    assert proc.returncode == 2 and "no benchmark 'nope'" in proc.stderr and "m4-hourly" in proc.stderr
    proc = tsdb("datasets", "nope", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_bench_writes_results_in_the_shared_schema(tmp_path):
    """A tiny benchmark through the same runner as `tsdb bench` (real M4 data, real metrics):
    every tsdb arm per seed, spread and window scores in results.json, reuse only of arms made
    from the same config and data."""
    require_benchmark_data("m4_hourly_train.csv", "m4_hourly_test.csv")
    spec = {
        "name": "m4-tiny", "task": {"protocol": "m4-hourly", "dataset": "m4_hourly", "max_windows": 24},
        "num_samples": 8, "seeds": [0, 1],
        "base": {"model": {"context_length": 96, "horizon": 48, "patch_length": 16, "d_model": 16, "n_heads": 2,
                           "n_layers": 2, "n_blocks": 2, "num_steps": 2},
                 "train": {"steps_per_block": 3, "batch_size": 8, "warmup_steps": 1}},
        "arms": {"e2e": {"model": {"strategy": "e2e"}}, "depth-b2": {"model": {"strategy": "depth"}}},
        "baselines": ["seasonal-naive"],
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    tsdb("ablate", "--config", str(path), "--out", str(out), "--no-progress")
    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == 2 and set(results["arms"]) == {"seasonal-naive", "e2e", "depth-b2"}
    for name in ("e2e", "depth-b2"):
        f = results["arms"][name]
        for key in ("crps", "mase", "mse", "mae", "train_seconds", "train_state_bytes",
                    "saved_activation_bytes", "peak_rss_bytes", "params"):
            assert np.isfinite(f[key]), (name, key)
        assert f["seeds"] == [0, 1] and set(f["per_seed"]) == {"0", "1"}
        per_seed = [f["per_seed"][s]["crps"] for s in ("0", "1")]
        assert f["crps"] == np.mean(per_seed) and f["spread"]["crps"]["max"] == max(per_seed)
        assert per_seed[0] != per_seed[1]   # a seed changes the model
        assert len(f["window_scores"]["crps_num"]) == 24 and (f["nfe"], f["layer_passes"]) in ((3, 3), (3, 6))
        seed_run = json.loads((out / "arms" / name / "seed-1" / "metrics.json").read_text())
        assert seed_run["provenance"]["config"]["train"]["seed"] == 1
    assert "seeds" not in json.dumps(results["arms"]["seasonal-naive"]["per_seed"])  # deterministic: once
    assert (out / "arms" / "seasonal-naive" / "metrics.json").exists()
    assert {c["role"] for c in results["comparisons"]} == {"best tsdb arm vs best peer", "best tsdb arm vs e2e"}
    report = (out / "report.md").read_text()
    assert "| depth-b2 | 2 |" in report and " ± " in report and "Paired bootstrap" in report
    assert (out / "crps.png").exists()
    # resumable: a finished arm is reused, not retrained
    mtime = (out / "arms" / "e2e" / "seed-0" / "metrics.json").stat().st_mtime_ns
    proc = tsdb("ablate", "--config", str(path), "--out", str(out), "--no-progress")
    assert "e2e seed 0: done earlier" in proc.stdout
    assert (out / "arms" / "e2e" / "seed-0" / "metrics.json").stat().st_mtime_ns == mtime
    # ... but never reused under another config: one line naming the field
    spec["base"]["train"]["lr"] = 0.01
    path.write_text(yaml.safe_dump(spec))   # (sorted keys: depth-b2 is the first arm)
    proc = tsdb("ablate", "--config", str(path), "--out", str(out), "--no-progress", check=False)
    where = out / "arms" / "depth-b2" / "seed-0"
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"tsdb: error: {where} holds results made with another config (train.lr: 0.001 -> 0.01); delete {where} "
        f"to rerun it, or use another --out than {out}")


def test_forecast_with_known_future_covariates(tmp_path):
    """`tsdb forecast --covariates temp`: the rows after the last observed target carry the
    known future; the forecast starts after the last observed target and follows it."""
    t = np.arange(240 + 12)
    temp = 10 + 5 * np.sin(2 * np.pi * t / 24)
    frame = pd.DataFrame({"ts": pd.date_range("2024-01-01", periods=len(t), freq="h"), "temp": temp,
                          "load": 50 + 3 * temp + np.random.default_rng(0).normal(0, 0.5, len(t))})
    frame.loc[240:, "load"] = np.nan                      # the next 12 hours: temperature known, load not
    csv = tmp_path / "load.csv"
    frame.to_csv(csv, index=False)
    out = tmp_path / "fc"
    tsdb("forecast", "--input", str(csv), "--timestamp", "ts", "--target", "load", "--covariates", "temp",
         "--freq", "h", "--horizon", "12", "--out", str(out), "--steps", "3", "--num-samples", "20")
    table = pl.read_csv(out / "forecast.csv", try_parse_dates=True)
    assert table.height == 12
    assert pd.Timestamp(table["timestamp"][0]) == pd.Timestamp("2024-01-01") + pd.Timedelta(hours=240)
    assert yaml.safe_load((out / "run" / "config.yaml").read_text())["model"]["num_covariates"] == 1
    short = tmp_path / "short.csv"
    frame.iloc[:245].to_csv(short, index=False)           # only 5 known-future rows
    proc = tsdb("forecast", "--input", str(short), "--timestamp", "ts", "--target", "load", "--covariates", "temp",
                "--freq", "h", "--horizon", "12", "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "has 5 row(s) after its last observed target" in proc.stderr


def test_forecast_settings_follow_the_data():
    """`tsdb forecast` without --run sizes the model from the data: patches that leave the
    horizon at least 3 tokens (dividing it where one does), a context of two weeks of hourly
    seasons or 4 horizons that the typical series can fill after the validation window, and
    about one training step per 100 points (500..3000)."""
    from tsdb.cli.autoconfig import choose_config
    from tsdb.data.series import Series, SeriesDataset

    def dataset(n, length, freq, season):
        start = pd.Period("2024-01-01", freq=freq)
        return SeriesDataset("d", [Series(f"s{i}", np.ones(length, np.float32), start, freq) for i in range(n)],
                             freq, season)

    lines = []
    long = choose_config(dataset(3, 2000, "h", 24), 48, log=lines.append).model
    assert (long.patch_length, long.horizon, long.context_length) == (16, 48, 336)   # 14 days of hours
    assert long.location_window == 24    # centred on the last day
    assert choose_config(dataset(3, 2000, "h", 24), 48, log=lines.append).train.steps_per_block == 500
    assert choose_config(dataset(100, 2000, "h", 24), 48, log=lines.append).train.steps_per_block == 2000
    assert any("season length 24" in line for line in lines)
    short = choose_config(dataset(2, 150, "h", 24), 24, log=lines.append).model
    assert (short.patch_length, short.context_length) == (8, 96)     # 150 - 2 x 24 points, in whole patches
    monthly = choose_config(dataset(5, 100, "M", 12), 18, log=lines.append).model
    assert (monthly.patch_length, monthly.horizon, monthly.context_length) == (6, 18, 60)
    assert monthly.location_window == 12
    assert choose_config(dataset(2, 400, "Y", 1), 4, log=lines.append).model.location_window == 0   # no season
    assert choose_config(dataset(2, 400, "D", 7), 10, log=lines.append).model.patch_length == 2
    prime = choose_config(dataset(2, 400, "D", 7), 11, log=lines.append).model
    assert (prime.patch_length, prime.horizon) == (3, 12)    # 3 or 2 do not divide 11: rounded up, not patch 1
