"""A pipeline API for pretrained models, in the spirit of Chronos'::

    from tsdb.pretrain import TsdbPipeline
    pipeline = TsdbPipeline.from_pretrained("reports/pretrain-quick/model")
    samples = pipeline.predict([series_a, series_b], horizon=24, num_samples=100)  # [2, 100, 24]
    quantiles, mean = pipeline.predict_quantiles([series_a], horizon=24)           # [1, 24, 9], [1, 24]

Series are 1-D arrays (NaN = missing) of any length: the last ``context_length`` values are the
context (shorter ones are NaN-padded on the left and masked). A horizon beyond the model's is
reached by autoregressive rollout of each sample path (:func:`sample_paths`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from tsdb.data.windows import last_context
from tsdb.errors import DataError, TsdbError

QUANTILE_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def sample_paths(strategy, model, contexts: np.ndarray, num_samples: int, horizon: int,
                 num_steps: int | None = None, generator: torch.Generator | None = None,
                 max_contexts: int = 2048) -> np.ndarray:
    """Samples ``[N, num_samples, horizon]`` for contexts ``[N, C]`` (C = the model's context
    length, NaN = missing).

    Up to the model's horizon H this is one call of the sampler. Beyond it, every sample path
    is continued on its own: its context becomes the last C values of (context, path so far)
    and one new sample of H values is drawn from it, until ``horizon`` values exist (an
    autoregressive rollout; each path is a joint sample of the whole horizon).
    """
    model_horizon = model.horizon
    context_length = contexts.shape[1]

    def forecast(ctx: np.ndarray, n: int) -> np.ndarray:
        out = []
        for start in range(0, len(ctx), max_contexts):
            with torch.inference_mode():
                out.append(strategy.forecast(model, torch.from_numpy(ctx[start:start + max_contexts]), n,
                                             num_steps=num_steps, generator=generator).numpy())
        return np.concatenate(out) if out else np.zeros((0, n, model_horizon), np.float32)

    paths = forecast(np.ascontiguousarray(contexts, dtype=np.float32), num_samples)
    if horizon > model_horizon:
        n = len(contexts)
        history = np.repeat(contexts.astype(np.float32), num_samples, axis=0)     # [N * S, C], series-major
        flat = paths.reshape(n * num_samples, model_horizon)
        while flat.shape[1] < horizon:
            ctx = np.concatenate([history, flat], axis=1)[:, -context_length:]
            flat = np.concatenate([flat, forecast(np.ascontiguousarray(ctx), 1)[:, 0]], axis=1)
        paths = flat.reshape(n, num_samples, -1)
    return paths[:, :, :horizon]


def as_contexts(series: Sequence | np.ndarray | torch.Tensor, context_length: int) -> np.ndarray:
    """Contexts ``[N, C]`` float32 from a list of 1-D series (or one 1-D / a 2-D array); a one-
    line `DataError` names the first series that cannot be forecast."""
    if isinstance(series, (np.ndarray, torch.Tensor)) and np.ndim(series) == 1:
        series = [series]
    rows = []
    for i, s in enumerate(series):
        values = s.detach().cpu().numpy() if isinstance(s, torch.Tensor) else np.asarray(s)
        if values.ndim != 1:
            raise DataError(f"series {i}: expected a 1-D array of values, got shape {values.shape}")
        try:
            values = values.astype(np.float64)
        except (TypeError, ValueError):
            raise DataError(f"series {i}: values are not numeric; pass numbers (NaN marks a missing value)") from None
        if np.isinf(values).any():
            raise DataError(f"series {i}: contains inf; replace it by NaN (missing) or a finite value")
        if not np.isfinite(values[-context_length:]).any():
            raise DataError(f"series {i}: no observed value in its last {context_length} points "
                            f"(empty or all NaN); give it history")
        rows.append(last_context(values.astype(np.float32), context_length))
    if not rows:
        raise DataError("no series given; pass a list of 1-D arrays")
    return np.stack(rows)


class TsdbPipeline:
    """A pretrained (or any trained) tsdb model behind ``predict`` / ``predict_quantiles``."""

    def __init__(self, cfg, strategy, model):
        if cfg.model.num_covariates:
            raise TsdbError("TsdbPipeline serves models without covariates; this one takes "
                            f"{cfg.model.num_covariates} (use strategy.forecast with covariates)")
        self.cfg, self.strategy, self.model = cfg, strategy, model.eval()

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "TsdbPipeline":
        """Load a checkpoint folder (``model.safetensors`` + ``config.yaml``) or a run directory."""
        from tsdb.pretrain.checkpoint import load_pretrained

        return cls(*load_pretrained(path))

    @property
    def context_length(self) -> int:
        return self.cfg.model.context_length

    @property
    def model_horizon(self) -> int:
        """The horizon of one sampler call; longer horizons are rolled out."""
        return self.cfg.model.horizon

    def predict(self, series, horizon: int | None = None, num_samples: int | None = None,
                num_steps: int | None = None, seed: int = 0) -> np.ndarray:
        """Sample paths ``[len(series), num_samples, horizon]`` (float32, the series' scale)."""
        horizon = horizon or self.model_horizon
        if horizon < 1:
            raise TsdbError(f"horizon must be at least 1, got {horizon}")
        contexts = as_contexts(series, self.context_length)
        return sample_paths(self.strategy, self.model, contexts, num_samples or self.cfg.model.num_samples,
                            horizon, num_steps, torch.Generator().manual_seed(seed))

    def predict_quantiles(self, series, horizon: int | None = None,
                          quantile_levels: Sequence[float] = QUANTILE_LEVELS, **kwargs) -> tuple[np.ndarray, np.ndarray]:
        """``(quantiles [N, horizon, len(quantile_levels)], mean [N, horizon])`` from the samples."""
        samples = self.predict(series, horizon, **kwargs)
        quantiles = np.quantile(samples, list(quantile_levels), axis=1).transpose(1, 2, 0)
        return quantiles.astype(np.float32), samples.mean(axis=1)
