"""Forecast a user's table: quantiles per lead time as CSV plus a fan chart PNG.

With ``--covariates a,b``, the columns are known-future covariates: the table carries, after
each series' last observed target, at least ``--horizon`` more rows whose target is empty
and whose covariates are given (e.g. the weather forecast of the next day).

The input is read and checked before torch is imported and before anything is written;
``OUT/run/data.json`` records the input a model was trained on (an ``--out`` holding another
input's model is refused unless ``--run`` names it); the CSV and PNG are written through
temporary files and renamed, so a failed or interrupted run leaves no partial output, and a
forecast that is not finite is an error, never a file of NaN.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl

from tsdb.cli import preflight
from tsdb.cli.autoconfig import choose_config, choose_patch, train_and_validate
from tsdb.config import ExperimentConfig
from tsdb.data.readers import read_long
from tsdb.data.series import SeriesDataset
from tsdb.data.validate import validate_dataset
from tsdb.errors import DataError, TsdbError

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
    import torch

    from tsdb.data.windows import last_context
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
        # + the series' offset inside its period (an hourly series stamped at :30 stays at :30)
        stamps = (pd.period_range(s.start + len(s), periods=horizon, freq=s.start.freq).to_timestamp()
                  + s.meta.get("start_offset", pd.Timedelta(0)))
        q = np.quantile(paths, QUANTILES, axis=0)
        frames.append(pl.DataFrame({"item_id": [s.item_id] * horizon, "timestamp": stamps.to_numpy(),
                                    "mean": paths.mean(0), **{f"q{lvl}": q[i] for i, lvl in enumerate(QUANTILES)}}))
    return pl.concat(frames)


def prepare(args) -> tuple[SeriesDataset, list | None, ExperimentConfig]:
    """Read and check ``tsdb forecast``'s input (no torch): the histories, the known-future
    covariates (or None) and the config of the model to use (``--run``'s or a quick one)."""
    if not args.input:
        raise TsdbError("tsdb forecast needs --input FILE (a long-format CSV or Parquet)")
    if args.horizon < 1 or args.num_samples < 1:
        raise TsdbError(f"--horizon and --num-samples must be positive, got {args.horizon} and {args.num_samples}")
    names = [c for c in (getattr(args, "covariates", None) or "").split(",") if c]
    data = read_long(args.input, item_id=args.item_id, timestamp=args.timestamp, target=args.target,
                     covariates=names, freq=args.freq)
    if getattr(args, "pretrained", None):   # (--run and --covariates refused by the preflight checks)
        return data, None, None
    if args.run:
        cfg = ExperimentConfig.from_yaml(Path(args.run) / "config.yaml")
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
        cfg = cfg.with_overrides(train=dict(seed=getattr(args, "seed", 0)))
        # the last --horizon points are held out for validation; before them, one training target
        validate_dataset(data, min_length=args.horizon + cfg.model.horizon + cfg.model.patch_length)
    return data, futures, cfg


def forecast_csv(args) -> dict:
    """Entry point of ``tsdb forecast``."""
    data, futures, cfg = prepare(args)
    out = preflight.output_dir(args.out)
    if getattr(args, "pretrained", None):
        samples, title = _pretrained_samples(args, data, out), f"{args.horizon}-step forecast (pretrained)"
    else:
        samples, title = _trained_samples(args, data, futures, cfg, out), f"{args.horizon}-step forecast"
    finite = np.isfinite(samples[:, :, :args.horizon]).all(axis=(1, 2))
    if not finite.all():
        who = data.series[int(np.argmin(finite))].item_id
        raise DataError(f"series {who!r}: the forecast is not finite (values too extreme for the model's "
                        "float32 scaling); rescale the series or drop its outliers")
    table = quantile_table(data, samples, args.horizon)
    out.mkdir(parents=True, exist_ok=True)
    csv, png = out / "forecast.csv", out / "forecast.png"
    import tsdb.evaluation.plots as plots
    panels = [{"item_id": s.item_id, "history": s.target, "samples": samples[i, :, :args.horizon]}
              for i, s in enumerate(list(data)[:6])]
    try:
        table.write_csv(_partial(csv))
        plots.fan_chart(panels, _partial(png), title=title)
        os.replace(_partial(csv), csv)      # both files complete: publish them
        os.replace(_partial(png), png)
    finally:
        for path in (csv, png):
            _partial(path).unlink(missing_ok=True)
    return {"csv": csv, "png": png}


def _trained_samples(args, data: SeriesDataset, futures, cfg: ExperimentConfig, out: Path) -> np.ndarray:
    """Samples from ``--run``'s model, or from a model trained on the input into ``out/run`` with
    the last ``--horizon`` points of each series held out and scored
    (:func:`tsdb.cli.autoconfig.train_and_validate`: ``out/validation.{md,json}``)."""
    from tsdb.training.loop import load_model
    if args.run:
        cfg, strategy, model = load_model(args.run)
    else:
        fingerprint = preflight.input_fingerprint(args)
        preflight.check_reuse(out / "run", fingerprint)
        preflight.record_training_data(out / "run", fingerprint | {"held_out": args.horizon})
        cfg.train.progress = not getattr(args, "no_progress", False)
        strategy, model, _ = train_and_validate(cfg, data, args.horizon, out / "run", out, args.num_samples)
    return sample_dataset(strategy, model, data, cfg.model.context_length, args.num_samples, cfg.train.seed,
                          futures)


def _pretrained_samples(args, data: SeriesDataset, out: Path) -> np.ndarray:
    """``tsdb forecast --pretrained PATH``: zero-shot, or after ``--finetune-steps`` steps per block
    on the input (``out/run``); horizons past the model's are rolled out."""
    from tsdb.pretrain.checkpoint import load_pretrained
    from tsdb.pretrain.pipeline import TsdbPipeline
    from tsdb.training.loop import load_model

    cfg, strategy, model = load_pretrained(args.pretrained)
    if args.finetune_steps:
        from tsdb.pretrain.finetuning import finetune
        validate_dataset(data, min_length=cfg.model.horizon + cfg.model.patch_length)
        finetune(args.pretrained, data, out / "run", steps=args.finetune_steps, lr=args.finetune_lr,
                 progress=False)
        cfg, strategy, model = load_model(out / "run")
    return TsdbPipeline(cfg, strategy, model).predict([s.target for s in data], args.horizon, args.num_samples,
                                                      seed=cfg.train.seed)


def _partial(path: Path) -> Path:
    """Where ``path`` is written before it is complete (same folder, so the rename is atomic)."""
    return path.with_name(f".{path.stem}.partial{path.suffix}")
