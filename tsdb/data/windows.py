"""Training windows: random (context, target) pairs cut from a SeriesDataset."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch.utils.data import IterableDataset

from tsdb.errors import DataError
from tsdb.data.series import SeriesDataset


def last_context(target: np.ndarray, context_length: int) -> np.ndarray:
    """The last ``context_length`` values, left-padded with NaN when the series is shorter."""
    out = np.full(context_length, np.nan, dtype=np.float32)
    tail = target[-context_length:]
    out[context_length - len(tail):] = tail
    return out


def padded_context(values: np.ndarray, context_length: int, pad: int = 0) -> np.ndarray:
    """``last_context`` of ``context_length - pad`` values followed by ``pad`` NaN slots (a
    context that ends inside its last patch)."""
    context = last_context(values, context_length - pad)
    return np.concatenate([context, np.full(pad, np.nan, dtype=np.float32)]) if pad else context


def default_min_context(context_length: int, horizon: int) -> int:
    """Observed context points a training window needs unless told otherwise."""
    return min(context_length, 2 * horizon)


def window_cut(length: int, rng: np.random.Generator, horizon: int, min_context: int,
               patch_length: int = 1, partial_patch_prob: float = 0.0) -> tuple[int, int]:
    """A random window of a series of ``length`` points: ``(split, pad)``, the target being
    ``[split, split + horizon)`` and the context ending ``pad`` NaN slots after ``split``.
    Needs ``length >= min_context + horizon``."""
    end = int(rng.integers(min_context + horizon, length + 1))  # exclusive end of target
    pad = 0
    if partial_patch_prob and rng.random() < partial_patch_prob:
        pad = int(rng.integers(1, patch_length))
    return end - horizon, pad


def diffusion_draws(rng: np.random.Generator, horizon: int) -> np.ndarray:
    """The diffusion step's random numbers of one window: u ~ U[0,1), then eps ~ N(0,1) per
    lead time, float32 ``[1 + horizon]``."""
    return np.concatenate([rng.random(1), rng.standard_normal(horizon)]).astype(np.float32)


def series_scales(targets: list[np.ndarray]) -> np.ndarray:
    """Mean |value| of every series (NaN ignored), floored at a millionth of the largest so
    that a series of zeros keeps a small share."""
    scales = np.array([np.nanmean(np.abs(t)) if np.isfinite(t).any() else 0.0 for t in targets])
    return np.maximum(scales, 1e-6 * max(scales.max(), 1e-12))


class PositionedStream(IterableDataset):
    """A seeded window stream that data-parallel processes share and a resumed run restarts
    at a position (what ``tsdb.training.resume.ResumableWindows`` asks of its windows).

    ``rank``/``world_size`` split the one global stream between processes, ``worker_batch``
    is a process's batch (DataLoader workers take whole batches in turn) and ``position``
    counts the global windows already consumed.
    """

    rank, world_size, worker_batch, position = 0, 1, 1, 0

    def shard(self, rank: int, world_size: int, batch_size: int = 1):
        """The same stream, this process's share of it (``rank`` of ``world_size``);
        ``batch_size`` is this process's batch."""
        out = copy.copy(self)
        out.rank, out.world_size, out.worker_batch = rank, world_size, batch_size
        return out

    def start_at(self, position: int):
        """The same stream after its first ``position`` windows (a multiple of ``world_size``:
        whole global batches)."""
        if position % self.world_size:
            raise ValueError(f"position {position} is not a multiple of world_size {self.world_size}")
        out = copy.copy(self)
        out.position = position
        return out


class TrainingWindows(PositionedStream):
    """An endless, seeded stream of ``(context [C], target [H], draws [sets * (1 + H)])`` float32
    windows, plus ``covariates [n_cov, C + H]`` when ``covariates = n_cov > 0``.

    ``draws`` are the diffusion step's random numbers for this window (u ~ U[0,1), then
    eps ~ N(0,1) per lead time; ``draw_sets`` independent such sets, for losses that need
    more, e.g. two trajectories per window). Drawn here, they make every arm see the same
    noise and let ``rank``/``world_size`` split one global stream exactly across
    data-parallel processes (process r keeps windows r, r + W, ...). The first set and the
    windows themselves do not depend on ``draw_sets``: the extra sets come from a child
    generator spawned per window, so arms that read more draws still see the same windows.

    The stream is addressable by position: window ``i`` of the global stream is drawn from
    its own generator seeded with ``(seed, i)`` (:meth:`window_at`), so a resumed run restarts
    it at ``position`` = windows already consumed (``global_step * batch_size``,
    :meth:`start_at`) and sees exactly the windows an uninterrupted run would, and DataLoader
    workers split it by batch without changing it.

    Series are drawn with probability proportional to their number of admissible window
    ends, times their scale (mean |value|) to the power ``scale_weighting`` (0: every window
    alike; 1: as a scale-weighted metric weighs them); a window needs at least ``min_context``
    observed context points, and contexts reaching before the series start are left-padded
    with NaN (masked in the model).

    With probability ``partial_patch_prob`` the context ends inside its last patch: the last
    ``pad`` slots (1 <= pad < patch_length) are NaN and the target starts right after the
    last observed value. This is what a streaming model sees between patch boundaries.

    Covariates (``series.past_covariates``, every series must have exactly ``covariates``
    complete rows) are cut at the same positions as context and target: the context part
    is NaN where the context is (left padding, the unobserved slots of a partial patch),
    the horizon part holds the covariates of the target's time steps. They use no random
    numbers, so the stream of windows and draws is the same with and without them.
    """

    def __init__(self, dataset: SeriesDataset, context_length: int, horizon: int,
                 seed: int = 0, min_context: int | None = None, patch_length: int = 1,
                 partial_patch_prob: float = 0.0, rank: int = 0, world_size: int = 1,
                 covariates: int = 0, draw_sets: int = 1, scale_weighting: float = 0.0):
        self.rank, self.world_size = rank, world_size
        self.draw_sets = draw_sets
        self.num_covariates = covariates
        from tsdb.data.validate import require_covariates  # (validation pulls polars: only when needed)

        self.covariates = ([require_covariates(s, covariates).astype(np.float32) for s in dataset]
                           if covariates else None)
        self.patch_length = patch_length
        self.partial_patch_prob = partial_patch_prob if patch_length > 1 else 0.0
        self.targets = [s.target.astype(np.float32) for s in dataset]
        self.context_length = context_length
        self.horizon = horizon
        self.seed = seed
        self.min_context = min_context if min_context is not None else default_min_context(context_length, horizon)
        counts = np.array([max(0, len(t) - self.min_context - horizon + 1) for t in self.targets], dtype=np.float64)
        if counts.sum() == 0:
            raise DataError(f"dataset '{dataset.name}': no series has {self.min_context + horizon} points "
                            f"(min context {self.min_context} + horizon {horizon}); use a shorter horizon or "
                            f"context")
        if scale_weighting:
            counts *= series_scales(self.targets) ** scale_weighting
        self.weights = counts / counts.sum()

    def window_at(self, index: int) -> tuple[np.ndarray, ...]:
        """Window ``index`` of the global stream."""
        return self.window(np.random.default_rng([self.seed, index]))

    def window(self, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        i = rng.choice(len(self.targets), p=self.weights)
        t = self.targets[i]
        split, pad = window_cut(len(t), rng, self.horizon, self.min_context, self.patch_length,
                                self.partial_patch_prob)
        context = padded_context(t[:split], self.context_length, pad)
        target = t[split:split + self.horizon]
        draws = diffusion_draws(rng, self.horizon)
        if self.draw_sets > 1:
            extra = rng.spawn(1)[0]   # leaves ``rng`` (the window stream) where it is
            draws = np.concatenate([draws, *(diffusion_draws(extra, self.horizon) for _ in range(self.draw_sets - 1))])
        if self.covariates is None:
            return context, target, draws
        cov = self.covariates[i]
        past = np.stack([padded_context(row[:split], self.context_length, pad) for row in cov])
        return context, target, draws, np.concatenate([past, cov[:, split:split + self.horizon]], axis=1)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        first = self.position // self.world_size     # this process's windows already consumed
        local = first
        while True:
            # worker w of n yields the process's batches w, w + n, ... (the DataLoader's round robin)
            if workers == 1 or (local - first) // self.worker_batch % workers == worker:
                yield self.window_at(local * self.world_size + self.rank)
            local += 1
