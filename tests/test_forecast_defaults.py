"""`tsdb bench forecast-defaults`: `tsdb forecast` run as a user would on a dataset written as a
CSV without its last window, scored on that window beside seasonal naive and AutoETS."""

import json

import numpy as np
import polars as pl

from tsdb.bench.forecast_defaults import DefaultsDataset, ForecastDefaultsSpec, held_out, run_forecast_defaults
from tsdb.data.readers import read_long
from tsdb.data.registry import load_dataset

H = 48


def test_the_csv_is_the_dataset_without_its_last_window(tmp_path):
    full = load_dataset("vic_elec")
    history, task = held_out(full, H)
    from tsdb.bench.forecast_defaults import long_frame
    long_frame(history).write_csv(tmp_path / "v.csv")
    back = read_long(tmp_path / "v.csv", "item_id", "timestamp", "target")
    (s,), (orig,) = back.series, full.series
    assert s.start == orig.start and back.freq == "30min"
    np.testing.assert_array_equal(s.target, orig.target[:-H])
    (label,) = task.test_data.label
    np.testing.assert_array_equal(label["target"], orig.target[-H:])


def test_bench_scores_what_tsdb_forecast_wrote_on_the_held_out_window(tmp_path):
    spec = ForecastDefaultsSpec(seeds=[0, 1], num_samples=10, steps=3,
                                datasets={"vic_elec": DefaultsDataset(dataset="vic_elec", horizon=H)})
    res = run_forecast_defaults(tmp_path / "report", spec, work=tmp_path / "work", threads=1, log=lambda *a: None)
    r = res["datasets"]["vic_elec"]
    seeds = r["tsdb"]["seeds"]
    assert set(seeds) == {"0", "1"} and seeds["0"]["crps"] != seeds["1"]["crps"]   # --seed reaches the run
    assert seeds["0"]["chosen"]["steps_per_block"] == 3
    assert set(seeds["0"]["validation"]) == {"tsdb depth-b4", "seasonal naive", "AutoETS"}
    # the CRPS of seed 0 is the weighted quantile loss of its forecast.csv on the true last day,
    # computed here from the two files alone
    truth = load_dataset("vic_elec").series[0].target[-H:].astype(np.float64)
    table = pl.read_csv(tmp_path / "work" / "vic_elec" / "seed0" / "forecast.csv")
    losses = []
    for level in np.arange(1, 10) / 10:
        q = table[f"q{level}"].to_numpy()
        losses.append(2 * np.sum(np.abs((truth - q) * ((truth <= q) - level))) / np.abs(truth).sum())
    np.testing.assert_allclose(seeds["0"]["crps"], np.mean(losses), rtol=1e-6)
    for name in ("seasonal naive", "AutoETS"):
        peer = r["peers"][name]
        assert np.isfinite(peer["crps"]) and peer["bootstrap"]["windows"] == 1
    report = (tmp_path / "report" / "report.md").read_text()
    assert "too few series for a bootstrap" in report and "Target (CRPS below seasonal naive and AutoETS)" in report
    assert json.loads((tmp_path / "report" / "results.json").read_text())["spec"]["steps"] == 3
