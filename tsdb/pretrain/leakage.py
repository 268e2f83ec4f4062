"""Value fingerprints of series, to prove that no evaluation series is in the corpus.

Every run of ``width`` consecutive values is standardised (its own mean and std), rounded to
``decimals`` and hashed to 64 bits. Standardising makes the fingerprint blind to the units
and offset a package stores a series in (thousands vs units, a shifted index), and hashing
every offset makes it blind to where a copy starts or ends. Runs with fewer than
``min_distinct`` distinct values (zeros of an intermittent series, a flat stretch) carry no
identity and are skipped, so unrelated series do not match on them; distinct is counted
after rounding, so a flat stretch with sensor noise and one spike (one or two levels at the
fingerprint's resolution) is skipped too.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

WIDTH = 24
DECIMALS = 2
MIN_DISTINCT = 8
_BLOCK = 1 << 16
# fixed odd 64-bit multipliers: h = sum_k q_k * m_k (mod 2^64), a universal-style hash
_MULTIPLIERS = np.random.default_rng(20261201).integers(1, 2 ** 63, size=WIDTH, dtype=np.uint64) * 2 + 1


def chunk_hashes(values: np.ndarray, width: int = WIDTH, decimals: int = DECIMALS,
                 min_distinct: int = MIN_DISTINCT) -> np.ndarray:
    """uint64 fingerprints of the informative ``width``-runs of ``values`` (NaN runs skipped)."""
    if width > len(_MULTIPLIERS):
        raise ValueError(f"width {width} exceeds {len(_MULTIPLIERS)}")
    v = np.asarray(values, dtype=np.float32).astype(np.float64)  # the same bits from f32 or f64 copies
    if len(v) < width:
        return np.empty(0, dtype=np.uint64)
    runs = sliding_window_view(v, width)
    out = []
    for start in range(0, len(runs), _BLOCK):
        block = runs[start:start + _BLOCK]
        block = block[np.all(np.isfinite(block), axis=1)]
        if not len(block):
            continue
        centred = block - block.mean(axis=1, keepdims=True)
        std = np.sqrt(np.einsum("ij,ij->i", centred, centred) / width)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):  # flat runs (std 0): NaN, dropped below
            q = np.rint(centred / std * 10 ** decimals)
        ordered = np.sort(q, axis=1)
        distinct = 1 + np.count_nonzero(np.diff(ordered, axis=1), axis=1)
        keep = np.all(np.isfinite(q), axis=1) & (distinct >= min_distinct)
        q = q[keep].astype(np.int64).view(np.uint64)
        if not len(q):
            continue
        out.append((q * _MULTIPLIERS[:width]).sum(axis=1, dtype=np.uint64))
    return np.unique(np.concatenate(out)) if out else np.empty(0, dtype=np.uint64)


def fingerprints(series: Iterable[np.ndarray], **kwargs) -> np.ndarray:
    """Sorted unique fingerprints of every series."""
    parts = [chunk_hashes(s, **kwargs) for s in series]
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.uint64)


def contained(hashes: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Mask of ``hashes`` found in the sorted ``reference`` fingerprints (binary search, so a
    large reference is not re-sorted per query)."""
    if not len(reference):
        return np.zeros(len(hashes), dtype=bool)
    at = np.minimum(np.searchsorted(reference, hashes), len(reference) - 1)
    return reference[at] == hashes


def shared_chunks(series: np.ndarray, reference: np.ndarray, **kwargs) -> int:
    """How many fingerprints of ``series`` are in the sorted ``reference`` fingerprints."""
    return int(contained(chunk_hashes(series, **kwargs), reference).sum())
