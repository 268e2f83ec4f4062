"""Forecast a user's table: quantiles per lead time as CSV plus a fan chart PNG.

With ``--covariates a,b``, the columns are known-future covariates: the table carries, after
each series' last observed target, at least ``--horizon`` more rows whose target is empty
and whose covariates are given (e.g. the weather forecast of the next day).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import torch

import tsdb.evaluation.plots as plots
from tsdb.cli.autoconfig import choose_config, choose_patch, train_and_validate
from tsdb.config import ExperimentConfig
from tsdb.data.readers import read_long
from tsdb.data.series import SeriesDataset
from tsdb.data.validate import validate_dataset
from tsdb.data.windows import last_context
from tsdb.errors import TsdbError
from tsdb.training.loop import load_model

QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def quick_patch(horizon: int) -> tuple[int, int]:
    """Patch length of the quick model (:func:`tsdb.cli.autoconfig.choose_patch`) and its horizon in
    whole patches."""
    patch = choose_patch(horizon)
    return patch, -(-horizon // patch) * patch


def quick_config(dataset: SeriesDataset, horizon: int, steps: int | None, num_covariates: int = 0) -> ExperimentConfig:
    """A depth-split model sized to the data (:func:`tsdb.cli.autoconfig.choose_config`)."""
    return choose_config(dataset, horizon, steps, num_covariates)


def sample_dataset(strategy, model, dataset: SeriesDataset, context_length: int, num_samples: int,
                   seed: int = 0, future_covariates: list[np.ndarray] | None = None) -> np.ndarray:
    """Samples ``[series, S, H]`` from the last ``context_length`` values of each series
    (and, for a model with covariates, their covariates and ``future_covariates[i] [n, H]``)."""
    contexts = torch.from_numpy(np.stack([last_context(s.target, context_length) for s in dataset]))
    covariates = None
    if future_covariates is not None:
        covariates = torch.from_numpy(np.stack([
            np.concatenate([np.stack([last_context(row, context_length) for row in s.past_covariates]), future], 1)
            for s, future in zip(dataset, future_covariates)]))
    with torch.inference_mode():
        return strategy.forecast(model, contexts, num_samples, generator=torch.Generator().manual_seed(seed),
                                 covariates=covariates).numpy()


def split_known_future(data: SeriesDataset, horizon: int, model_horizon: int) -> tuple[SeriesDataset, list]:
    """Cut each series after its last observed target; the covariates of the rows after it
    are the known future ``[n, model_horizon]`` (rows past ``horizon`` repeat the last one)."""
    history, futures = [], []
    for s in data:
        observed = np.flatnonzero(~np.isnan(s.target))
        end = int(observed[-1]) + 1 if len(observed) else 0
        future = s.past_covariates[:, end:end + model_horizon]
        if future.shape[1] < horizon:
            raise TsdbError(f"series {s.item_id!r} has {future.shape[1]} row(s) after its last observed target; "
                            f"--horizon {horizon} needs {horizon} rows there with the covariates given and the "
                            "target empty (the known future)")
        pad = np.repeat(future[:, -1:], model_horizon - future.shape[1], axis=1)
        futures.append(np.concatenate([future, pad], axis=1))
        history.append(s.slice(0, end))
    return SeriesDataset(data.name, history, data.freq, data.season_length, dict(data.meta)), futures


def quantile_table(dataset: SeriesDataset, samples: np.ndarray, horizon: int) -> pl.DataFrame:
    """Long table: item_id, timestamp, mean, q0.1..q0.9 for the first ``horizon`` steps."""
    frames = []
    for s, paths in zip(dataset, samples[:, :, :horizon]):
        stamps = pd.period_range(s.start + len(s), periods=horizon, freq=s.start.freq).to_timestamp()
        q = np.quantile(paths, QUANTILES, axis=0)
        frames.append(pl.DataFrame({"item_id": [s.item_id] * horizon, "timestamp": stamps.to_numpy(),
                                    "mean": paths.mean(0), **{f"q{lvl}": q[i] for i, lvl in enumerate(QUANTILES)}}))
    return pl.concat(frames)


def forecast_csv(args) -> dict:
    """Entry point of ``tsdb forecast``."""
    if not args.input:
        raise TsdbError("tsdb forecast needs --input FILE (a long-format CSV or Parquet)")
    names = [c for c in (getattr(args, "covariates", None) or "").split(",") if c]
    data = read_long(args.input, item_id=args.item_id, timestamp=args.timestamp, target=args.target,
                     covariates=names, freq=args.freq)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.run:
        cfg, strategy, model = load_model(args.run)
        if args.horizon > cfg.model.horizon:
            raise TsdbError(f"--horizon {args.horizon} exceeds the trained model's horizon "
                            f"{cfg.model.horizon}; retrain with model.horizon >= {args.horizon}")
        if cfg.model.num_covariates != len(names):
            raise TsdbError(f"the model in {args.run} takes {cfg.model.num_covariates} covariate(s), "
                            f"--covariates names {len(names)}")
    futures = None
    if names:   # the known-future rows leave the histories
        model_horizon = cfg.model.horizon if args.run else quick_patch(args.horizon)[1]
        data, futures = split_known_future(data, args.horizon, model_horizon)
    if not args.run:
        cfg = quick_config(data, args.horizon, args.steps, len(names))
        validate_dataset(data, min_length=cfg.model.horizon + cfg.model.patch_length)
        strategy, model, _ = train_and_validate(cfg, data, args.horizon, out / "run", out, args.num_samples)
    samples = sample_dataset(strategy, model, data, cfg.model.context_length, args.num_samples, cfg.train.seed,
                             futures)
    table = quantile_table(data, samples, args.horizon)
    csv = out / "forecast.csv"
    table.write_csv(csv)
    panels = [{"item_id": s.item_id, "history": s.target, "samples": samples[i, :, :args.horizon]}
              for i, s in enumerate(list(data)[:6])]
    png = plots.fan_chart(panels, out / "forecast.png", title=f"{args.horizon}-step forecast")
    return {"csv": csv, "png": png}
