"""Numerics shared with ``tsdb`` (numpy versions): instance normalization, context
features, history alignment and the noise of forecasts."""

from __future__ import annotations

import zlib

import numpy as np

from .errors import StreamingError

# The largest |(x - loc) / scale| a value may have to enter a series' state. Normalized
# values of a healthy series are a few units (the statistics come from its own recent
# values; Samuelson's bound keeps those within sqrt(context_length)); values 1e4 scales away
# are unit errors or sensor faults, and far larger ones overflow float32 in the attention.
MAX_NORMALIZED = 1e4


# the statistics rule of tsdb.nn.forecaster.instance_stats (the torch side), mirrored here
SCALE_FLOOR = 1e-6     # relative: a std at most this share of |loc| counts as constant
SCALE_TINY = 1e-30     # absolute: below it float32 arithmetic loses the values


def _observed_mean(x: np.ndarray, observed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the observed entries over the last axis (0 where none is) and their count."""
    n = observed.sum(-1, keepdims=True)
    return np.where(observed, x, 0.0).sum(-1, keepdims=True) / np.maximum(n, 1), n


def instance_stats(values: np.ndarray, location_window: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """NaN-aware mean/std over the last axis, ``[batch, 1]`` float32, summed in float64 (so
    huge values do not overflow the variance). A std above ``SCALE_FLOOR * |loc|`` is kept (a
    series around 1e-7 is scaled by its own std); a constant context gets ``min(|loc|, 1)``
    (1 when all zero or missing). ``location_window = k > 0``: the location is the mean of the
    last ``k`` observed values (the whole context's where those are all missing)."""
    observed = ~np.isnan(values)
    x = values.astype(np.float64)
    loc, _ = _observed_mean(x, observed)
    with np.errstate(over="ignore", invalid="ignore"):
        var, _ = _observed_mean((x - loc) ** 2, observed)
    scale = np.sqrt(var)
    constant = np.where(np.abs(loc) > SCALE_TINY, np.minimum(np.abs(loc), 1.0), 1.0)
    scale = np.where((scale > SCALE_FLOOR * np.abs(loc)) & (scale > SCALE_TINY), scale, constant)
    if location_window:
        recent, seen = _observed_mean(x[..., -location_window:], observed[..., -location_window:])
        loc = np.where(seen > 0, recent, loc)
    return loc.astype(np.float32), scale.astype(np.float32)


def normalize(values: np.ndarray, loc: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``(values - loc) / scale`` with NaN (missing) -> 0, float32."""
    return np.where(np.isnan(values), np.float32(0), (values - loc) / scale).astype(np.float32)


def out_of_range(values: np.ndarray, loc: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Per row (axis 0): does any observed value (NaN = missing is fine) fall outside
    ``MAX_NORMALIZED`` scales of ``loc`` (or is it +-inf, or are the statistics not finite)?"""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        z = np.abs((values - loc) / scale)
        bad = ~(np.isnan(values) | (z <= MAX_NORMALIZED))
        stats = ~(np.isfinite(loc) & np.isfinite(scale) & (scale > 0))
    return bad.reshape(len(values), -1).any(-1) | stats.reshape(len(values), -1).any(-1)


def features(values: np.ndarray, loc: np.ndarray, scale: np.ndarray, p: int, cov: np.ndarray | None = None,
             cov_loc: np.ndarray | None = None, cov_scale: np.ndarray | None = None) -> np.ndarray:
    """Raw ``[batch, m*P]`` -> ``[batch, m, P, 2]`` (normalized value, observed mask), plus one
    channel per covariate when ``cov [batch, n, m*P]`` is given (normalized with ``cov_loc``/
    ``cov_scale [batch, n, 1]``, NaN -> 0)."""
    observed = ~np.isnan(values)
    f = np.stack([normalize(values, loc, scale), observed.astype(np.float32)], axis=-1)
    if cov is not None:
        f = np.concatenate([f, normalize_covariates(cov, cov_loc, cov_scale)], axis=-1)
    return f.reshape(values.shape[0], values.shape[1] // p, p, f.shape[-1])


def normalize_covariates(cov: np.ndarray, loc: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Raw ``[batch, n, T]`` -> normalized ``[batch, T, n]`` (NaN -> 0)."""
    return normalize(cov, loc, scale).transpose(0, 2, 1)


def align(history: np.ndarray, p: int, min_tokens: int, max_tokens: int) -> np.ndarray:
    """Left-pad a 1-D history with NaN to whole patches (>= min_tokens); keep <= max_tokens."""
    t = history.shape[0]
    n = min(max(min_tokens, -(-t // p)), max_tokens)
    out = np.full(n * p, np.nan, dtype=np.float32)
    keep = min(t, n * p)
    if keep:
        out[n * p - keep:] = history[t - keep:]
    return out


def forecast_noise(noise, seed, b: int, num_samples: int, width: int) -> np.ndarray:
    """Standard normal ``[b, num_samples, width]``: ``noise`` checked, or drawn from ``seed``
    (an int: one generator for the batch; a list with one seed per series: reproducible
    whatever the batch; None: fresh)."""
    if noise is None:
        if isinstance(seed, (list, tuple)) and len(seed) == b and b > 0:
            return np.stack([np.random.default_rng(sd).standard_normal((num_samples, width), dtype=np.float32)
                             for sd in seed])
        return np.random.default_rng(seed).standard_normal((b, num_samples, width), dtype=np.float32)
    noise = np.asarray(noise, dtype=np.float32)
    if noise.ndim != 3 or noise.shape[0] != b or noise.shape[2] != width:
        raise StreamingError(f"noise must be [{b}, S, {width}], got {noise.shape}")
    if not np.isfinite(noise).all():
        raise StreamingError("noise must be finite (standard normal draws)")
    return noise


def series_seed(seed: int, item_id, count: int) -> tuple[int, int, int]:
    """A per-series, per-observation seed: forecasts do not depend on batching or restarts."""
    return (int(seed), zlib.crc32(str(item_id).encode()), int(count))


__all__ = ["MAX_NORMALIZED", "align", "features", "forecast_noise", "instance_stats", "normalize",
           "normalize_covariates", "out_of_range", "series_seed"]
