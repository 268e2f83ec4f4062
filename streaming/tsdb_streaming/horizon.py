"""Streaming forecasts for ``horizon`` exports (staircase noise over lead time), numpy + onnxruntime.

Mirrors ``tsdb.streaming_horizon`` (the PyTorch reference) operation for operation. The
state of a series is its context cache (per block and layer, the keys/values of the last
``W`` context tokens), frozen ``loc``/``scale``, ``S`` noisy windows over the ``H`` steps
after the last chunk boundary (staircase phase 0: chunk ``j`` at block ``j``'s noise level)
and the values observed since that boundary (fewer than ``c = H / B``).

- ``update``: values are buffered; each time ``c`` of them complete a chunk, one observed
  *roll*: every window moves one band down (the metadata's ``roll_sigmas`` sub-step grid,
  Euler/Heun on the host, the last sub-step Euler, each block's ``denoise_<j>`` graph
  providing chunk ``j`` of the denoised window), chunk 0 is dropped, a fresh chunk of
  ``sigma_max`` noise is appended and the observed chunk enters the cache (``update`` graph).
- ``forecast``: ``B`` free rolls (``B + 1`` with pending values) from a copy of the
  windows, every emitted chunk entering a per-trajectory copy of the cache; returns the
  ``S`` samples of the ``H`` steps after the last observation. The state is unchanged.

The number of samples is fixed per forecaster (``num_samples``): trajectory ``s`` of every
forecast continues window ``s``. The noise of the rolls an update performs is drawn from
``seed``, the series and its observation count, so a stream replayed after a restart
(``save_state``/``load_state``) gives the same numbers whatever the batching.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .runtime import (DEFAULT_QUANTILES, HORIZON_FORMAT, Forecast, StreamingError, StreamingForecaster,
                      _check_files, _check_version, _read_metadata, align, features, forecast_noise,
                      instance_stats, series_seed)

HORIZON_FORMAT_VERSION = 1
DENOISE_INPUTS = ("cache_k", "cache_v", "tokens", "z", "sigma")
_INIT, _ROLL, _REFRESH = 0, 1, 2      # noise streams of a series


def load_horizon_metadata(model_dir: str | os.PathLike) -> dict:
    """Read and validate the ``tsdb_model.json`` of a horizon export."""
    model_dir = Path(model_dir)
    path, meta = _read_metadata(model_dir)
    _check_version(path, meta, HORIZON_FORMAT, HORIZON_FORMAT_VERSION,
                   ("strategy", "shapes", "roll_sigmas", "substeps", "last_substep", "sigma_data", "normalization",
                    "graphs", "sampler", "model_id"))
    if meta["strategy"] != "horizon":
        raise StreamingError(f"{path}: format {HORIZON_FORMAT!r} is for the horizon strategy, not "
                             f"{meta['strategy']!r}")
    sh = meta["shapes"]
    nb, h, p, c = sh["n_blocks"], sh["horizon"], sh["patch_length"], sh["chunk_length"]
    if len(meta["graphs"]["denoise"]) != nb or len(sh["layers_per_block"]) != nb:
        raise StreamingError(f"{path}: {nb} blocks but inconsistent graphs / layers")
    if h != nb * c or c % p or sh["context_length"] != sh["window_tokens"] * p:
        raise StreamingError(f"{path}: inconsistent shapes {sh}")
    grid = meta["roll_sigmas"]
    if len(grid) != meta["substeps"] + 1 or any(len(row) != h or min(row) <= 0 for row in grid):
        raise StreamingError(f"{path}: roll_sigmas must be {meta['substeps'] + 1} rows of {h} positive sigmas")
    if meta["last_substep"] != "euler":
        raise StreamingError(f"{path}: unknown last_substep {meta['last_substep']!r}")
    _check_files(model_dir, meta)
    return meta


class HorizonStreamingForecaster(StreamingForecaster):
    """Online forecasts for many series from a ``horizon`` export.

    Parameters
    ----------
    model_dir: directory written by ``tsdb export`` for a horizon run.
    num_samples: S, the noisy windows kept per series; every forecast returns S samples.
    seed: seed of the noise the updates' rolls draw (per series and observation count).
    intra_op_num_threads, refresh, refresh_every, providers: as ``StreamingForecaster``
        (a refresh re-initialises the series from its recent values with fresh windows).

    ``StreamingForecaster(model_dir)`` returns this class for a horizon export.
    """

    def __init__(self, model_dir: str | os.PathLike, intra_op_num_threads: int = 1, refresh: str = "warmup",
                 refresh_every: int | None = None, providers: Sequence[str] | None = None,
                 num_samples: int = 100, seed: int = 0):
        self.model_dir = Path(model_dir)
        self.meta = meta = load_horizon_metadata(self.model_dir)
        if int(num_samples) < 1:
            raise StreamingError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self._set_common(meta, refresh, refresh_every)
        sh = meta["shapes"]
        self.n_blocks = int(sh["n_blocks"])
        self.chunk_length = int(sh["chunk_length"])
        self.grid = np.asarray(meta["roll_sigmas"], dtype=np.float32)     # [substeps + 1, H]
        self._open_graphs(intra_op_num_threads, providers)

    # -- storage ---------------------------------------------------------------------------
    _STATE_FIELDS = ("tokens", "loc", "scale", "windows", "pending", "pending_count", "count", "recent")

    @property
    def _FIELDS(self) -> tuple:
        return self._STATE_FIELDS

    def _alloc(self, capacity: int) -> None:
        w, r, p, h = self.window, self.init_tokens, self.patch_length, self.horizon
        self.k = [np.zeros((nl, capacity, self.heads, w, self.head_dim), np.float32) for nl in self.layers]
        self.v = [np.zeros_like(k) for k in self.k]
        self.tokens = np.zeros(capacity, np.int64)
        self.loc = np.zeros((capacity, 1), np.float32)
        self.scale = np.ones((capacity, 1), np.float32)
        self.windows = np.zeros((capacity, self.num_samples, h), np.float32)
        self.pending = np.full((capacity, self.chunk_length), np.nan, np.float32)
        self.pending_count = np.zeros(capacity, np.int64)
        self.count = np.zeros(capacity, np.int64)
        self.recent = np.full((capacity, r * p + h), np.nan, np.float32)   # enough to re-initialise

    def _check_loaded(self, path: Path, data: dict) -> None:
        s = data["windows"].shape[1] if data["windows"].ndim == 3 else None
        if s != self.num_samples:
            raise StreamingError(f"{path} holds {s} sample windows per series; open the model with "
                                 f"num_samples={s}")

    def _noise(self, item, slot: int, stream: int, shape: tuple[int, ...]) -> np.ndarray:
        rng = np.random.default_rng((*series_seed(self.seed, item, int(self.count[slot])), stream))
        return rng.standard_normal(shape, dtype=np.float32)

    # -- the roll ----------------------------------------------------------------------------
    def _denoise_window(self, z: np.ndarray, sigma: np.ndarray, ks: list, vs: list, tokens: np.ndarray) -> np.ndarray:
        """Chunk ``j`` of ``z [N, S', H]`` denoised by block ``j`` (caches ``[.., N, ..]``)."""
        n, c = z.shape[0], self.chunk_length
        sig = np.ascontiguousarray(np.broadcast_to(sigma, (n, self.horizon)), np.float32)
        return np.concatenate([
            sess.run(["denoised"], {"cache_k": ks[j], "cache_v": vs[j], "tokens": tokens, "z": z,
                                    "sigma": sig})[0][..., j * c:(j + 1) * c]
            for j, sess in enumerate(self._denoise)], axis=-1)

    def _roll(self, z: np.ndarray, fresh: np.ndarray, ks: list, vs: list, tokens: np.ndarray):
        """One roll of windows ``z [N, S', H]`` at phase 0; ``fresh [N, S', c]`` standard normal.
        Returns the emitted chunk (normalized, at sigma_min) and the next windows."""
        g, c = self.grid, self.chunk_length
        for i in range(len(g) - 1):
            s, s_next = g[i], g[i + 1]
            d = (z - self._denoise_window(z, s, ks, vs, tokens)) / s
            z_euler = z + (s_next - s) * d
            if self.sampler == "euler" or i == len(g) - 2:   # the sub-step landing on sigma_min is Euler
                z = z_euler
            else:
                d_next = (z_euler - self._denoise_window(z_euler, s_next, ks, vs, tokens)) / s_next
                z = z + (s_next - s) * (d + d_next) / np.float32(2)
        return z[..., :c], np.concatenate([z[..., c:], g[0, -c:] * fresh], axis=-1)

    def _ingest(self, raw: np.ndarray, loc, scale, ks: list, vs: list, tokens: np.ndarray):
        """Whole patches of raw ``[N, m P]`` into the caches."""
        ks, vs = self._run_update(features(raw, loc, scale, self.patch_length), tokens, ks, vs)
        return ks, vs, tokens + raw.shape[1] // self.patch_length

    def _observed_rolls(self, slots: np.ndarray, raws: list[np.ndarray], fresh: list[np.ndarray]) -> None:
        """For each slot, one observed roll per complete chunk of ``raws[j]`` (values after its
        last chunk boundary), with ``fresh[j] [S, >= m c]``; writes the storage."""
        c = self.chunk_length
        m = np.asarray([len(r) // c for r in raws])
        for i in range(int(m.max(initial=0))):
            act = np.flatnonzero(m > i)
            s = slots[act]
            ks, vs = [k[:, s] for k in self.k], [v[:, s] for v in self.v]
            noise = np.stack([fresh[j][:, i * c:(i + 1) * c] for j in act])
            _, self.windows[s] = self._roll(self.windows[s], noise, ks, vs, self.tokens[s])
            chunk = np.stack([raws[j][i * c:(i + 1) * c] for j in act])
            ks, vs, self.tokens[s] = self._ingest(chunk, self.loc[s], self.scale[s], ks, vs, self.tokens[s])
            for b in range(len(self.layers)):
                self.k[b][:, s] = ks[b]
                self.v[b][:, s] = vs[b]

    # -- init / refresh ------------------------------------------------------------------------
    def _init_slots(self, slots: np.ndarray, histories: list[np.ndarray], covs=None,
                    noise: list[np.ndarray] | None = None) -> None:
        """Cold start: the windows over the last H values (truth + staircase noise), then B
        observed rolls replaying them (``noise[j] [S, 2H]``; drawn per series if omitted)."""
        p, w, r, h = self.patch_length, self.window, self.init_tokens, self.horizon
        padded = [np.concatenate([np.full(max(h - len(x), 0), np.nan, np.float32), x]) for x in histories]
        if noise is None:
            ids = list(self._slot)
            noise = [self._noise(ids[s], int(s), _REFRESH if self.count[s] else _INIT, (self.num_samples, 2 * h))
                     for s in slots]
        groups: dict[int, list[int]] = {}
        for j, x in enumerate(padded):
            groups.setdefault(min(max(w, -(-(len(x) - h) // p)), r), []).append(j)
        for n, js in groups.items():
            s = slots[js]
            loc, scale = instance_stats(np.stack([align(padded[j], p, w, w) for j in js]))
            ctx = np.stack([align(padded[j][:-h], p, n, n) for j in js])
            ks, vs = self._run_update(features(ctx, loc, scale, p), np.zeros(len(js), np.int64),
                                      *self._empty_cache(len(js)))
            for b in range(len(self.layers)):
                self.k[b][:, s] = ks[b]
                self.v[b][:, s] = vs[b]
            self.tokens[s] = n
            self.loc[s], self.scale[s] = loc, scale
            truth = np.stack([padded[j][-h:] for j in js])
            y = np.nan_to_num((truth - loc) / scale, nan=0.0).astype(np.float32)
            self.windows[s] = y[:, None, :] + self.grid[0] * np.stack([noise[j][:, :h] for j in js])
            self.pending[s] = np.nan
            self.pending_count[s] = 0
        self._observed_rolls(slots, [x[-h:] for x in padded], [nz[:, h:] for nz in noise])
        for slot, x in zip(slots, histories):
            self.count[slot] = len(x)
            self.recent[slot] = np.nan
            keep = min(len(x), self.recent.shape[1])
            if keep:
                self.recent[slot, -keep:] = x[len(x) - keep:]

    # -- public API ----------------------------------------------------------------------------
    def values_pending(self, item_id) -> int:
        """Values of ``item_id`` observed since its last chunk boundary (``< c``): the next
        ``c - values_pending`` values complete a chunk and trigger an observed roll."""
        return int(self.pending_count[self._slots([item_id])[0]])

    def update(self, item_ids: Sequence, values: Iterable, covariates: Iterable | None = None,
               noise: Sequence[np.ndarray] | None = None, init_noise: Sequence[np.ndarray] | None = None) -> None:
        """Ingest new values per series: ``values[j]`` is a number or a 1-D array (NaN = missing).

        Unknown series are initialised from their values (their history; ``init_noise[j]
        [S, 2H]`` overrides the drawn noise). Every ``c`` values of a known series complete a
        chunk and cost one observed roll (``noise[j] [S, >= rolls * c]`` overrides the drawn
        noise of its rolls, in order); other values are only buffered. The cost per series
        does not depend on how much history it has seen.
        """
        if covariates is not None:
            raise StreamingError("horizon exports do not take covariates")
        item_ids = list(item_ids)
        values = list(values)
        if len(values) != len(item_ids):
            raise StreamingError(f"{len(item_ids)} series but {len(values)} value arrays")
        if len(set(item_ids)) != len(item_ids):
            raise StreamingError("item_ids must be unique within one update")
        arrays = [np.atleast_1d(np.asarray(v, dtype=np.float32)).reshape(-1) for v in values]
        new = [j for j, i in enumerate(item_ids) if i not in self._slot]
        shape = (self.num_samples, 2 * self.horizon)
        if init_noise is not None and any(np.shape(init_noise[j]) != shape for j in new):
            raise StreamingError(f"init noise must be {list(shape)} per new series")   # before any state changes
        if new:
            self._grow(self._n + len(new))
            slots = np.arange(self._n, self._n + len(new))
            for j, s in zip(new, slots):
                self._slot[item_ids[j]] = int(s)
            self._n += len(new)
            self._init_slots(slots, [arrays[j] for j in new],
                             noise=None if init_noise is None else [np.asarray(init_noise[j], np.float32)
                                                                    for j in new])
        fresh_ids = set(new)
        old = [j for j in range(len(item_ids)) if j not in fresh_ids and len(arrays[j])]
        if not old:
            return
        c = self.chunk_length
        slots = self._slots([item_ids[j] for j in old])
        raws = [np.concatenate([self.pending[s, :self.pending_count[s]], arrays[j]]) for s, j in zip(slots, old)]
        fresh = []
        for s, j, raw in zip(slots, old, raws):
            need = len(raw) // c * c
            f = (self._noise(item_ids[j], int(s), _ROLL, (self.num_samples, need)) if noise is None
                 else np.asarray(noise[j], np.float32))
            if f.ndim != 2 or f.shape[0] != self.num_samples or f.shape[1] < need:
                raise StreamingError(f"update noise of series {item_ids[j]!r} must be [{self.num_samples}, >= {need}], "
                                     f"got {f.shape}")
            fresh.append(f)
        self._observed_rolls(slots, raws, fresh)
        refresh = []
        for s, j, raw in zip(slots, old, raws):
            rest = raw[len(raw) // c * c:]
            self.pending[s] = np.nan
            self.pending[s, :len(rest)] = rest
            self.pending_count[s] = len(rest)
            before = int(self.count[s])
            self.count[s] = before + len(arrays[j])
            self.recent[s] = np.concatenate([self.recent[s], arrays[j]])[-self.recent.shape[1]:]
            if self._refresh_points(before, int(self.count[s])):
                refresh.append(s)
        if refresh:
            self._reinit(np.asarray(refresh))

    def forecast(self, item_ids: Sequence, num_samples: int | None = None, seed=None,
                 quantiles: Sequence[float] = DEFAULT_QUANTILES, noise: np.ndarray | None = None,
                 normalized: bool = False, **unsupported: Any) -> Forecast:
        """The ``S`` samples per series of the ``H`` steps after its last observation, and
        their quantiles; the state is not modified.

        ``noise [b, S, H + c]`` standard normal (the chunk appended by each free roll)
        overrides ``seed`` (an int, one seed per series, or None, as ``StreamingForecaster``).
        """
        if unsupported:
            raise StreamingError(f"horizon forecasts run the exported roll grid; {sorted(unsupported)} "
                                 "do not apply")
        if num_samples is not None and int(num_samples) != self.num_samples:
            raise StreamingError(f"this forecaster keeps {self.num_samples} noisy windows per series, so forecasts "
                                 f"have {self.num_samples} samples, not {num_samples}; open the model with "
                                 f"num_samples={num_samples}")
        item_ids = list(item_ids)
        s = self._slots(item_ids)
        b, h, c, S = len(s), self.horizon, self.chunk_length, self.num_samples
        if noise is not None and np.shape(noise)[2:] == (h,) and not (self.pending_count[s] > 0).any():
            noise = np.concatenate([np.asarray(noise, np.float32), np.zeros((b, S, c), np.float32)], -1)
        noise = forecast_noise(noise, seed, b, S, h + c)
        if noise.shape[1] != S:
            raise StreamingError(f"noise must be [{b}, {S}, {h + c}], got {noise.shape}")
        x = np.zeros((b, S, h), np.float32)
        pend = self.pending_count[s]
        for group in (np.flatnonzero(pend == 0), np.flatnonzero(pend > 0)):
            if len(group):
                x[group] = self._free_rolls(s[group], noise[group])
        return self._summarize(item_ids, s, x, quantiles, normalized)

    def _free_rolls(self, s: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """Series with the same number of rolls (``B``, or ``B + 1`` when values are pending)."""
        b, S, h, c = len(s), self.num_samples, self.horizon, self.chunk_length
        r = self.pending_count[s]
        rolls = self.n_blocks + int(r[0] > 0)
        rep = lambda a: np.repeat(a, S, axis=0)  # noqa: E731  one row per trajectory, series-major
        ks = [np.repeat(k[:, s], S, axis=1) for k in self.k]
        vs = [np.repeat(v[:, s], S, axis=1) for v in self.v]
        tokens, loc, scale = rep(self.tokens[s]), rep(self.loc[s]), rep(self.scale[s])
        z = self.windows[s].reshape(b * S, 1, h)
        out = []
        for i in range(rolls):
            emitted, z = self._roll(z, noise[:, :, i * c:(i + 1) * c].reshape(b * S, 1, c), ks, vs, tokens)
            out.append(emitted[:, 0])
            if i < rolls - 1:
                raw = emitted[:, 0] * scale + loc
                if i == 0:   # observed values enter the context as themselves
                    pending = rep(self.pending[s])
                    raw = np.where(np.arange(c) < rep(r)[:, None], pending, raw)
                ks, vs, tokens = self._ingest(raw, loc, scale, ks, vs, tokens)
        y = np.concatenate(out, axis=-1).reshape(b, S, rolls * c)
        return np.stack([y[j, :, r[j]:r[j] + h] for j in range(b)])


__all__ = ["HORIZON_FORMAT_VERSION", "HorizonStreamingForecaster", "load_horizon_metadata"]
