"""Seeds and intervals for benchmark reports: spread over seeds and a paired bootstrap over
test windows.

- :func:`spread`: mean, sample std, min and max of one figure over an arm's seeds.
- :func:`paired_bootstrap`: the CI of the CRPS difference (and ratio) of two arms scored on
  the same windows. CRPS is a ratio of sums (``sum(crps_num) / sum(abs_target)``, see
  ``tsdb.evaluation.tasks``), so every resample recomputes it from the resampled windows'
  numerators and the shared denominator, as gluonts would on that set of windows. A tsdb
  arm's numerators are averaged over its seeds per window first, so the interval covers
  the test windows' sampling variation around the seed-averaged arm.
- Windows of one series that overlap in time (rolling origins with a stride below the
  horizon, e.g. ETTh1's quick tier) are not independent: they are resampled in blocks of
  ``ceil(horizon / stride)`` consecutive windows of the same series
  (:func:`bootstrap_blocks`), a non-overlapping block bootstrap; M4's one window per series
  gives one window per block.
- :func:`verdict`: a difference whose percentile interval contains 0 is a tie.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def spread(values: Sequence[float]) -> dict:
    """``{"mean", "std", "min", "max", "n"}`` of one figure over seeds (std with ddof 1; 0 for
    a single seed). NaN and None entries are ignored."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}


def bootstrap_blocks(items: Sequence, horizon: int, stride: int | None) -> list[int]:
    """A block id per window (windows in ``test_data`` order, ``items`` their series ids):
    runs of ``ceil(horizon / stride)`` consecutive windows of one series share a block."""
    size = max(1, math.ceil(horizon / stride)) if stride else 1
    blocks, seen, last, k = [], 0, object(), 0
    for item in items:
        k = k + 1 if item == last else 0
        if k % size == 0:
            seen += 1
        blocks.append(seen - 1)
        last = item
    return blocks


def paired_bootstrap(num_a: Sequence[float], num_b: Sequence[float], den: Sequence[float],
                     blocks: Sequence[int] | None = None, resamples: int = RESAMPLES, level: float = LEVEL,
                     seed: int = 0) -> dict:
    """Percentile CI of ``crps_a - crps_b`` and of ``crps_a / crps_b`` over block resamples.

    ``num_a``/``num_b``: per-window CRPS numerators of the two arms (same windows, same
    order); ``den``: the windows' ``abs_target``; ``blocks``: block id per window (default:
    one block per window). Deterministic for a given ``seed``.
    """
    num_a, num_b, den = (np.asarray(x, dtype=np.float64) for x in (num_a, num_b, den))
    if not num_a.shape == num_b.shape == den.shape or num_a.ndim != 1:
        raise ValueError(f"window scores of different lengths: {num_a.shape}, {num_b.shape}, {den.shape}")
    ids = np.arange(len(den)) if blocks is None else np.unique(np.asarray(blocks), return_inverse=True)[1]
    n = int(ids.max()) + 1
    sums = np.stack([np.bincount(ids, weights=x, minlength=n) for x in (num_a, num_b, den)])  # [3, blocks]
    rng = np.random.default_rng(seed)
    draws = []
    for start in range(0, resamples, 250):  # chunks keep the [resamples, blocks] index matrix small
        idx = rng.integers(0, n, (min(250, resamples - start), n))
        draws.append(sums[:, idx].sum(-1))  # [3, chunk]
    a, b, d = np.concatenate(draws, axis=1)
    diff, ratio = (a - b) / d, a / b
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    point_a, point_b = num_a.sum() / den.sum(), num_b.sum() / den.sum()
    out = {"crps_a": float(point_a), "crps_b": float(point_b), "diff": float(point_a - point_b),
           "diff_ci": [float(np.percentile(diff, lo)), float(np.percentile(diff, hi))],
           "ratio": float(point_a / point_b), "ratio_ci": [float(np.percentile(ratio, lo)),
                                                          float(np.percentile(ratio, hi))],
           "resamples": resamples, "level": level, "blocks": n, "windows": int(len(den))}
    out["verdict"] = verdict(out["diff_ci"])
    return out


def metric_bootstrap(metric: str, a: Sequence[float], b: Sequence[float], abs_target: Sequence[float],
                     blocks: Sequence[int] | None = None, resamples: int = RESAMPLES) -> dict:
    """:func:`paired_bootstrap` of a seed-averaged figure from per-window scores: ``crps``
    (numerators over the windows' summed ``abs_target``) or ``mase`` (the mean of per-window
    MASE: every window weighs 1)."""
    den = abs_target if metric == "crps" else np.ones(len(abs_target))
    return paired_bootstrap(a, b, den, blocks, resamples=resamples)


def verdict(diff_ci: Sequence[float]) -> str:
    """``"a"`` (a's CRPS lower), ``"b"`` or ``"tie"`` (the interval contains 0)."""
    lo, hi = diff_ci
    return "a" if hi < 0 else "b" if lo > 0 else "tie"


# -- report text (bench reports and the README) ---------------------------------------------

def mean_std_text(f: dict, key: str, digits: int) -> str:
    """An arm's figure as ``mean ± std`` over seeds (results.json schema 2, several seeds),
    else the plain figure."""
    sp = (f.get("spread") or {}).get(key)
    if sp and sp["n"] > 1:
        return f"{sp['mean']:.{digits}f} ± {sp['std']:.{digits}f}"
    v = f.get(key)
    return "n/a" if v is None else f"{v:.{digits}f}"


def min_max_text(f: dict, key: str, digits: int) -> str:
    sp = (f.get("spread") or {}).get(key)
    return f"{sp['min']:.{digits}f}-{sp['max']:.{digits}f}" if sp and sp["n"] > 1 else "n/a"


def crps_ratio(f: dict, ref: dict) -> tuple[float | None, tuple[float, float] | None]:
    """Mean CRPS of arm ``f`` over that of ``ref``, and the range of the per-seed ratios over
    the seeds both ran (seed s against seed s: same data stream and initialisation seed)."""
    if not ref.get("crps") or f.get("crps") is None:
        return None, None
    a, b = f.get("per_seed") or {}, ref.get("per_seed") or {}
    per = [a[s]["crps"] / b[s]["crps"] for s in a if s in b]
    return f["crps"] / ref["crps"], ((min(per), max(per)) if len(per) > 1 else None)


def ratio_text(ratio: float | None, rng: tuple[float, float] | None) -> str:
    if ratio is None:
        return "n/a"
    return f"{ratio:.3f}" + (f" ({rng[0]:.3f}-{rng[1]:.3f})" if rng else "")
