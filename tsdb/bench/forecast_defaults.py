"""``tsdb bench forecast-defaults``: ``tsdb forecast`` with its defaults, as a stranger runs it.

For each dataset of ``configs/bench/forecast-defaults.yaml`` (vic_elec, M4 Hourly, ETTh1), the
last ``horizon`` points of every series are held out (the test window: for M4 Hourly, whose
file holds train then test, exactly the official test window). The rest is written as a long
CSV (``item_id, timestamp, target``) and handed to ``tsdb forecast`` in a subprocess with no
setting but ``--horizon`` and ``--seed``: it chooses its context, patch, size and steps from
the CSV, carves its own validation window from it (the ``horizon`` points before the test
window) and writes ``forecast.csv``. Those quantiles (what the user gets) are scored on the
held-out window by the benchmarks' gluonts.ev code, beside statsforecast's seasonal naive
(with its intervals) and AutoETS fitted on the same CSV's histories (their last
``PEER_HISTORY`` points, as in ``tsdb forecast``'s own validation table).

Seeds: each seed is a full ``tsdb forecast`` run (training seed and sample seed). The report
gives mean ± std over seeds and a paired bootstrap over series of tsdb (numerators averaged
over seeds) against each peer; a difference whose interval holds 0 is a tie.

The data files are read where the benchmarks read them (``--data-root``, ``../shared/datasets``);
the CSVs and runs go to ``--work`` (default ``runs/forecast-defaults``), never into the report.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
from pydantic import Field

from tsdb.bench.stats import paired_bootstrap, spread
from tsdb.cli.autoconfig import PEER_HISTORY, validation_task
from tsdb.config import ExperimentConfig, _Strict, packaged
from tsdb.data.series import SeriesDataset
from tsdb.evaluation.tasks import EvalTask

CONFIG = packaged("configs", "bench", "forecast-defaults.yaml")
PEERS = {"seasonal naive": "seasonal-naive", "AutoETS": "auto-ets"}
MIN_BOOTSTRAP_SERIES = 5   # fewer: the verdict is read from the seeds, not a bootstrap over series
QUANTILE_COLUMNS = [f"q{k / 10}" for k in range(1, 10)]


class DefaultsDataset(_Strict):
    dataset: str               # a registry name (`tsdb datasets`)
    horizon: int = Field(gt=0)


class ForecastDefaultsSpec(_Strict):
    name: str = "forecast-defaults"
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    num_samples: int = 100
    steps: int | None = None   # None: tsdb forecast's own choice (tests pass a tiny budget)
    datasets: dict[str, DefaultsDataset]


def held_out(dataset: SeriesDataset, horizon: int) -> tuple[SeriesDataset, EvalTask]:
    """The histories given to ``tsdb forecast`` (each series without its last ``horizon``
    points, target only) and the task scoring the held-out window."""
    task = validation_task(dataset, horizon, PEER_HISTORY)
    task.window_scores = True
    task.info["protocol"] = "test: the last window of every series, held out of the CSV"
    history = SeriesDataset(dataset.name, [s.slice(0, len(s) - horizon) for s in dataset], dataset.freq,
                            dataset.season_length, dict(dataset.meta))
    return history, task


def long_frame(dataset: SeriesDataset) -> pl.DataFrame:
    """``item_id, timestamp, target`` rows of every series (a missing value: an empty target)."""
    parts = []
    for s in dataset:
        stamps = pd.period_range(s.start, periods=len(s), freq=s.start.freq).to_timestamp()
        parts.append(pl.DataFrame({"item_id": [str(s.item_id)] * len(s), "timestamp": stamps.to_numpy(),
                                   "target": s.target.astype(np.float64)}))
    return pl.concat(parts).with_columns(pl.col("target").fill_nan(None))


def forecast_samples(csv: Path, task: EvalTask, item_ids: list[str]) -> np.ndarray:
    """``forecast.csv``'s quantiles and mean as ``[N, 11, H]`` samples in the task's window
    order (:func:`tsdb.evaluation.peers.quantiles_as_samples`: gluonts reads the quantiles back
    exactly and the sample mean is the CSV's mean)."""
    from tsdb.evaluation.peers import quantiles_as_samples

    table = pl.read_csv(csv).with_columns(pl.col("item_id").cast(pl.String)).sort("item_id", "timestamp",
                                                                                     maintain_order=True)
    by_item = {key[0]: part for key, part in table.group_by("item_id", maintain_order=True)}
    missing = [i for i in item_ids if i not in by_item or len(by_item[i]) != task.horizon]
    if missing:
        raise RuntimeError(f"{csv}: no {task.horizon}-step forecast for series {missing[0]!r}")
    q = np.stack([by_item[i].select(QUANTILE_COLUMNS).to_numpy().T for i in item_ids])
    mean = np.stack([by_item[i]["mean"].to_numpy() for i in item_ids])
    return quantiles_as_samples(q, mean)


def run_forecast(csv: Path, horizon: int, out: Path, seed: int, spec: ForecastDefaultsSpec, threads: int | None,
                 log) -> dict:
    """One ``tsdb forecast`` run (reused when its forecast exists); its log is ``out.log``."""
    argv = [sys.executable, "-m", "tsdb.cli", "forecast", "--input", str(csv), "--item-id", "item_id",
            "--horizon", str(horizon), "--out", str(out), "--seed", str(seed), "--no-progress"]
    if spec.num_samples != 100:
        argv += ["--num-samples", str(spec.num_samples)]
    if spec.steps:
        argv += ["--steps", str(spec.steps)]
    if threads:
        argv += ["--threads", str(threads)]
    record_path = out.with_suffix(".json")
    if (out / "forecast.csv").exists() and record_path.exists():
        log(f"  seed {seed}: reusing {out}")
        return json.loads(record_path.read_text())
    log(f"  seed {seed}: tsdb forecast -> {out}")
    from tsdb.evaluation.peers import clock
    timing: dict = {}
    with clock(timing, "run"), open(out.with_suffix(".log"), "w") as f:   # CPU time includes the child's
        done = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"tsdb forecast failed (exit {done.returncode}); see {out.with_suffix('.log')}")
    cfg = ExperimentConfig.from_yaml(out / "run" / "config.yaml")
    record = {"command": " ".join(["tsdb", *argv[3:]]), "wall_seconds": timing["run_seconds"],
              "cpu_seconds": timing["cpu_seconds"],
              "chosen": {"context_length": cfg.model.context_length, "patch_length": cfg.model.patch_length,
                         "horizon": cfg.model.horizon, "d_model": cfg.model.d_model, "n_layers": cfg.model.n_layers,
                         "n_blocks": cfg.model.n_blocks, "steps_per_block": cfg.train.steps_per_block,
                         "location_window": cfg.model.location_window},
              "validation": json.loads((out / "validation.json").read_text())["models"]}
    record_path.write_text(json.dumps(record, indent=2))
    return record


def run_dataset(key: str, entry: DefaultsDataset, spec: ForecastDefaultsSpec, work: Path, root, threads, log) -> dict:
    from tsdb.data.registry import load_dataset
    from tsdb.evaluation.peers import statsforecast_peer

    history, task = held_out(load_dataset(entry.dataset, root), entry.horizon)
    folder = work / key
    folder.mkdir(parents=True, exist_ok=True)
    csv = folder / f"{key}.csv"
    frame = long_frame(history)
    frame.write_csv(csv)   # same bytes each time, so tsdb forecast's input check lets a finished seed be reused
    log(f"{key}: {len(history)} series, {frame.height} rows -> {csv}; horizon {entry.horizon}")
    ids = [str(s.item_id) for s in history]
    seeds = {}
    for seed in spec.seeds:
        record = run_forecast(csv, entry.horizon, folder / f"seed{seed}", seed, spec, threads, log)
        metrics = task.evaluate(forecast_samples(folder / f"seed{seed}" / "forecast.csv", task, ids))
        seeds[str(seed)] = {**record, **{k: metrics[k] for k in ("crps", "mase", "mse", "mae", "coverage80")},
                            "crps_num": metrics["window_scores"]["crps_num"]}
    tsdb_num = np.mean([s["crps_num"] for s in seeds.values()], axis=0)
    peers = {}
    for name, kind in PEERS.items():
        log(f"  {name} (statsforecast)")
        r = statsforecast_peer(task, kind)
        peers[name] = {**{k: r[k] for k in ("crps", "mase", "mse", "mae", "coverage80", "train_seconds",
                                             "cpu_seconds", "budget")},
                       "bootstrap": paired_bootstrap(tsdb_num, r["window_scores"]["crps_num"],
                                                     r["window_scores"]["abs_target"])}
    per_seed = list(seeds.values())
    return {"dataset": entry.dataset, "horizon": entry.horizon, "series": len(history), "rows": frame.height,
            "tsdb": {"seeds": {s: {k: v for k, v in r.items() if k != "crps_num"} for s, r in seeds.items()},
                     "spread": {k: spread([r[k] for r in per_seed]) for k in ("crps", "mase", "mse",
                                                                              "coverage80", "cpu_seconds")}},
            "peers": peers}


def run_forecast_defaults(out: str | Path = "reports/forecast-defaults", spec: ForecastDefaultsSpec | None = None,
                          work: str | Path = "runs/forecast-defaults", root: str | None = None,
                          threads: int | None = None, command: str = "tsdb bench forecast-defaults",
                          log=print) -> dict:
    spec = spec or ForecastDefaultsSpec.from_yaml(CONFIG)
    out, work = Path(out), Path(work)
    results = {"command": command, "spec": spec.model_dump(), "datasets": {}}
    for key, entry in spec.datasets.items():
        results["datasets"][key] = run_dataset(key, entry, spec, work, root, threads, log)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, out)
    return results


def target_met_against(r: dict, peer: dict) -> bool:
    """tsdb's CRPS below the peer's beyond the noise: by the bootstrap over series, or (too few
    series to resample, e.g. vic_elec's one) in every seed."""
    if r["series"] >= MIN_BOOTSTRAP_SERIES:
        return peer["bootstrap"]["verdict"] == "a"
    return all(s["crps"] < peer["crps"] for s in r["tsdb"]["seeds"].values())


def target_met(r: dict) -> bool:
    """The issue's target on one dataset: CRPS below every peer's (beyond the noise)."""
    return all(target_met_against(r, p) for p in r["peers"].values())


def verdict_text(r: dict, peer: dict) -> str:
    boot = peer["bootstrap"]
    if r["series"] < MIN_BOOTSTRAP_SERIES:
        below = sum(s["crps"] < peer["crps"] for s in r["tsdb"]["seeds"].values())
        return (f"{boot['ratio']:.3f} (too few series for a bootstrap; tsdb lower in {below} of "
                f"{len(r['tsdb']['seeds'])} seeds: {'tsdb lower' if target_met_against(r, peer) else 'not shown lower'})")
    lo, hi = boot["ratio_ci"]
    word = {"a": "tsdb lower", "b": "peer lower", "tie": "tie"}[boot["verdict"]]
    return f"{boot['ratio']:.3f} [{lo:.3f}, {hi:.3f}]: {word}"


def write_report(results: dict, out: Path) -> Path:
    spec = results["spec"]
    lines = ["# `tsdb forecast` defaults on held-out windows", "",
             f"Produced by: `{results['command']}` (config `configs/bench/forecast-defaults.yaml`).", "",
             "Each dataset is written as a long CSV without the last `horizon` points of every series; "
             "`tsdb forecast --input CSV --item-id item_id --horizon H --seed S` chooses everything else from the "
             "CSV and forecasts; its `forecast.csv` quantiles 0.1..0.9 and mean are scored on the held-out points "
             "with the benchmarks' gluonts.ev code (CRPS: mean weighted quantile loss), beside statsforecast's "
             "seasonal naive (its intervals) and AutoETS fitted on the same histories (last "
             f"{PEER_HISTORY} points). Seeds: {spec['seeds']} (each a whole `tsdb forecast` run). Bootstrap: "
             "paired over series, tsdb's per-series numerators averaged over seeds, 95% interval of "
             "CRPS(tsdb) / CRPS(peer).", ""]
    met_all = True
    for key, r in results["datasets"].items():
        sp, seeds = r["tsdb"]["spread"], r["tsdb"]["seeds"]
        chosen = next(iter(seeds.values()))["chosen"]
        lines += [f"## {key}: {r['dataset']}, {r['series']} series, horizon {r['horizon']}", "",
                  f"Chosen by `tsdb forecast`: context {chosen['context_length']}, patch {chosen['patch_length']}, "
                  f"d_model {chosen['d_model']}, {chosen['n_layers']} layers in {chosen['n_blocks']} blocks, "
                  f"{chosen['steps_per_block']} steps per block, windows centred on "
                  + (f"their last {chosen['location_window']} points' mean" if chosen.get("location_window")
                     else "their mean") + ". CPU per run "
                  f"{sp['cpu_seconds']['mean'] / 60:.1f} min (training, validation table, forecast).", "",
                  "| model | CRPS | MASE | MSE | coverage 80% | budget |", "|---|---|---|---|---|---|",
                  f"| tsdb forecast (defaults) | {sp['crps']['mean']:.4f} ± {sp['crps']['std']:.4f} | "
                  f"{sp['mase']['mean']:.3f} ± {sp['mase']['std']:.3f} | {sp['mse']['mean']:.4g} | "
                  f"{sp['coverage80']['mean']:.2f} | {chosen['n_blocks']} x {chosen['steps_per_block']} steps, "
                  f"{len(seeds)} seeds |"]
        for name, p in r["peers"].items():
            lines.append(f"| {name} | {p['crps']:.4f} | {p['mase']:.3f} | {p['mse']:.4g} | {p['coverage80']:.2f} | "
                         f"`{p['budget']['model']}`, {p['cpu_seconds']:.1f} CPU s |")
        lines += ["", "| seed | CRPS | MASE | its own validation CRPS (tsdb / seasonal naive / AutoETS) |",
                  "|---|---|---|---|"]
        for s, x in seeds.items():
            v = x["validation"]
            val = " / ".join(f"{v[n]['crps']:.4f}" for n in ("tsdb depth-b4", "seasonal naive", "AutoETS") if n in v)
            lines.append(f"| {s} | {x['crps']:.4f} | {x['mase']:.3f} | {val} |")
        met = target_met(r)
        met_all &= met
        lines += ["", "CRPS(tsdb) / CRPS(peer), paired bootstrap over series: "
                  + "; ".join(f"{n} {verdict_text(r, p)}" for n, p in r["peers"].items()) + ".",
                  "", f"Target (CRPS below seasonal naive and AutoETS): **{'met' if met else 'missed'}**.", ""]
    lines += [f"All targets met: **{'yes' if met_all else 'no'}**. Figures are written by "
              "`tsdb.bench.forecast_defaults` from `results.json` in this folder."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
