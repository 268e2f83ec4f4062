"""Baseline arms, run side by side with ours and scored by the same ``EvalTask.evaluate``.

``seasonal_naive`` and ``repeat_last`` are point forecasts returned as ``num_samples``
identical paths: every quantile equals the point, so their "CRPS" is the weighted
quantile loss of the point forecast (it equals the normalized absolute error), not the
CRPS of a calibrated distribution, and their coverage80 is near 0. GIFT-Eval's seasonal
naive CRPS (0.0376 on M4 Hourly) uses statsforecast intervals and is lower.

``fit_deepar`` trains GluonTS's DeepAR (a real probabilistic peer) on ``task.train``; the
bench runs it as a peer (``tsdb.evaluation.peers.deepar_peer``) at the library's defaults.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import lightning.pytorch as pl
import numpy as np
import pandas as pd
from gluonts.model.predictor import Predictor
from gluonts.time_feature import get_lags_for_frequency
from gluonts.torch import DeepAREstimator
from tqdm.auto import tqdm

from tsdb.evaluation.tasks import EvalTask, SamplePredictor


def _forward_fill(contexts: np.ndarray) -> np.ndarray:
    """Replace NaN by the last observed value along time (leading NaN stay NaN)."""
    return pd.DataFrame(contexts.T).ffill().to_numpy(dtype=np.float32).T


def _as_samples(point: np.ndarray, num_samples: int) -> np.ndarray:
    """``[N, H]`` point forecast -> ``[N, S, H]`` identical samples (a read-only view)."""
    return np.broadcast_to(point[:, None, :], (point.shape[0], num_samples, point.shape[1]))


def seasonal_naive(season_length: int, horizon: int) -> SamplePredictor:
    """Repeat the last observed season: ``y[T + h] = y[T + h - m * ceil((h+1)/m)]``."""

    def predict(contexts: np.ndarray, num_samples: int) -> np.ndarray:
        if contexts.shape[1] < season_length:
            raise ValueError(f"seasonal_naive needs context >= {season_length}")
        last_season = _forward_fill(contexts)[:, -season_length:]
        return _as_samples(last_season[:, np.arange(horizon) % season_length], num_samples)

    return predict


def repeat_last(horizon: int) -> SamplePredictor:
    """Repeat the last observed value over the whole horizon."""

    def predict(contexts: np.ndarray, num_samples: int) -> np.ndarray:
        last = _forward_fill(contexts)[:, -1:]
        return _as_samples(np.repeat(last, horizon, axis=1), num_samples)

    return predict


@dataclass
class GluonTSArm:
    """A trained GluonTS predictor; it reads each window's full input entry (timestamps
    included, which DeepAR's time features need), so it is evaluated through
    :meth:`evaluate` rather than the contexts-only :data:`SamplePredictor` contract."""

    predictor: Predictor
    train_seconds: float

    def evaluate(self, task: EvalTask, num_samples: int = 100) -> dict:
        """Metrics from ``task.evaluate`` plus ``train_seconds`` and ``predict_seconds``."""
        timer = {"seconds": 0.0}

        def timed() -> Iterator[np.ndarray]:
            forecasts = self.predictor.predict(task.test_data.input, num_samples=num_samples)
            with tqdm(total=task.num_windows, desc=f"forecasting {task.name}", unit="window", leave=False) as bar:
                while True:
                    t0 = time.perf_counter()
                    forecast = next(forecasts, None)
                    timer["seconds"] += time.perf_counter() - t0
                    if forecast is None:
                        return
                    bar.update(1)
                    yield forecast.samples[None]

        metrics = task.evaluate(timed())
        return {
            **metrics,
            "train_seconds": self.train_seconds,
            "predict_seconds": timer["seconds"],
            "num_samples": num_samples,
        }


def fit_deepar(
    task: EvalTask,
    context_length: int,
    epochs: int = 100,
    num_batches_per_epoch: int = 50,
    seed: int = 0,
    batch_size: int = 32,
    max_lag: int | None = 169,
    **estimator_kwargs,
) -> GluonTSArm:
    """Train ``gluonts.torch.DeepAREstimator`` on ``task.train`` on CPU.

    The defaults are GluonTS's (100 epochs x 50 batches of 32). ``max_lag`` drops the
    frequency's default lags beyond it: for hourly data they reach 721 steps back, past a
    512-point context and most of an M4 series (``None`` keeps them all). Extra keyword
    arguments go to the estimator (``hidden_size``, ``num_layers``, ``lr``, ...). GluonTS
    writes a weights-only checkpoint; it goes to a temporary directory.
    """
    if max_lag is not None and "lags_seq" not in estimator_kwargs:
        estimator_kwargs["lags_seq"] = [lag for lag in get_lags_for_frequency(task.freq) if lag <= max_lag]
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    pl.seed_everything(seed, verbose=False)
    with tempfile.TemporaryDirectory(prefix="tsdb-deepar-") as root:
        estimator = DeepAREstimator(
            freq=task.freq,
            prediction_length=task.horizon,
            context_length=context_length,
            batch_size=batch_size,
            num_batches_per_epoch=num_batches_per_epoch,
            trainer_kwargs={
                "max_epochs": epochs,
                "accelerator": "cpu",
                "enable_progress_bar": False,
                "enable_model_summary": False,
                "logger": False,
                "default_root_dir": root,
            },
            **estimator_kwargs,
        )
        t0 = time.perf_counter()
        predictor = estimator.train(task.train.to_gluonts())
        train_seconds = time.perf_counter() - t0
    return GluonTSArm(predictor, train_seconds)
