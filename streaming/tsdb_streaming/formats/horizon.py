"""Format ``tsdb-streaming-onnx-horizon``: horizon exports (staircase noise over lead time).

Mirrors ``tsdb.streaming_horizon`` (the PyTorch reference) operation for operation. The
state of a series is its context cache (per block and layer, the keys/values of the last
``W`` context tokens), frozen ``loc``/``scale``, ``S`` noisy windows over the ``H`` steps
after the last chunk boundary (staircase phase 0: chunk ``j`` at block ``j``'s noise level)
and the values observed since that boundary (fewer than ``c = H / B``).

- ``update``: values are buffered; each time ``c`` of them complete a chunk, one observed
  *roll*: every window moves one band down (``sampler.sample`` over the metadata's
  ``roll_sigmas`` per-position sub-step grid, Euler/Heun, the last sub-step Euler, each
  block's ``denoise_<j>`` graph providing chunk ``j`` of the denoised window), chunk 0 is
  dropped, a fresh chunk of ``sigma_max`` noise is appended and the observed chunk enters
  the cache (``update`` graph).
- ``forecast``: ``B`` free rolls (``B + 1`` with pending values) from a copy of the
  windows, every emitted chunk entering a per-trajectory copy of the cache; returns the
  ``S`` samples of the ``H`` steps after the last observation. The state is unchanged.

The number of samples is fixed per forecaster (``num_samples``): trajectory ``s`` of every
forecast continues window ``s``. The noise of the rolls an update performs is drawn from
``seed``, the series and its observation count, so a stream replayed after a restart
(``save_state``/``load_state``) gives the same numbers whatever the batching.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..core import DEFAULT_QUANTILES, Field, Forecast, StreamingForecaster
from ..errors import StreamingError
from ..metadata import FROZEN_AT_INIT
from ..numerics import align, features, forecast_noise, instance_stats, normalize, series_seed
from ..registry import register_format
from ..sampler import sample

FORMAT = "tsdb-streaming-onnx-horizon"
FORMAT_VERSION = 1
DENOISE_INPUTS = ("cache_k", "cache_v", "tokens", "z", "sigma")
_INIT, _ROLL, _REFRESH = 0, 1, 2      # noise streams of a series


@register_format(FORMAT)
class HorizonStreamingForecaster(StreamingForecaster):
    """Online forecasts for many series from a ``horizon`` export.

    Parameters as ``StreamingForecaster``; here ``num_samples`` is S, the noisy windows kept
    per series (every forecast returns S samples), and ``seed`` seeds the noise of the
    updates' rolls (per series and observation count). A refresh re-initialises the series
    from its recent values with fresh windows.
    """

    FORMAT_VERSION = FORMAT_VERSION
    METADATA_KEYS = ("roll_sigmas", "substeps", "last_substep")

    @classmethod
    def check_metadata(cls, path: Path, meta: dict) -> None:
        sh = meta["shapes"]
        nb, h, p, c = sh["n_blocks"], sh["horizon"], sh["patch_length"], sh["chunk_length"]
        if h != nb * c or c % p:
            raise StreamingError(f"{path}: inconsistent shapes {sh}")
        grid = meta["roll_sigmas"]
        if len(grid) != meta["substeps"] + 1 or any(len(row) != h or min(row) <= 0 for row in grid):
            raise StreamingError(f"{path}: roll_sigmas must be {meta['substeps'] + 1} rows of {h} positive sigmas")
        if meta["last_substep"] != "euler":
            raise StreamingError(f"{path}: unknown last_substep {meta['last_substep']!r}")
        if meta["normalization"]["rule"] != FROZEN_AT_INIT:
            raise StreamingError(f"{path}: the horizon format takes only the frozen-at-init normalization rule")

    def _configure(self, meta: dict) -> None:
        self.n_blocks = int(meta["shapes"]["n_blocks"])
        self.chunk_length = int(meta["shapes"]["chunk_length"])
        self.grid = np.asarray(meta["roll_sigmas"], dtype=np.float32)     # [substeps + 1, H]

    def _layout(self) -> dict[str, Field]:
        r, p, h = self.init_tokens, self.patch_length, self.horizon
        return {"tokens": Field((), np.int64, 0), "loc": Field((1,), np.float32, 0, True),
                "scale": Field((1,), np.float32, 1, True),
                "windows": Field((self.num_samples, h), np.float32, 0, True),
                "pending": Field((self.chunk_length,), np.float32, np.nan), "pending_count": Field((), np.int64, 0),
                "count": Field((), np.int64, 0),
                "recent": Field((r * p + h,), np.float32, np.nan)}   # enough to re-initialise

    def _check_loaded(self, path: Path, data: dict) -> None:
        w = data.get("windows")
        s = w.shape[1] if w is not None and w.ndim == 3 else None
        if s != self.num_samples:
            raise StreamingError(f"{path} holds {s} sample windows per series; open the model with "
                                 f"num_samples={s}")

    def _noise(self, slot: int, stream: int, shape: tuple[int, ...]) -> np.ndarray:
        rng = np.random.default_rng((*series_seed(self.seed, self._items[slot], int(self.count[slot])), stream))
        return rng.standard_normal(shape, dtype=np.float32)

    # -- the roll ----------------------------------------------------------------------------
    def _window_denoiser(self, ks: list, vs: list, tokens: np.ndarray):
        """``(z [N, S', H], sigma [H]) ->`` chunk ``j`` of ``z`` denoised by block ``j``."""
        c = self.chunk_length

        def denoise(z: np.ndarray, sigma: np.ndarray) -> np.ndarray:
            sig = np.ascontiguousarray(np.broadcast_to(sigma, (z.shape[0], self.horizon)), np.float32)
            return np.concatenate([
                sess.run(["denoised"], {"cache_k": ks[j], "cache_v": vs[j], "tokens": tokens, "z": z,
                                        "sigma": sig})[0][..., j * c:(j + 1) * c]
                for j, sess in enumerate(self._denoise)], axis=-1)
        return denoise

    def _roll(self, z: np.ndarray, fresh: np.ndarray, ks: list, vs: list, tokens: np.ndarray):
        """One roll of windows ``z [N, S', H]`` at phase 0; ``fresh [N, S', c]`` standard normal.
        Returns the emitted chunk (normalized, at sigma_min) and the next windows."""
        c = self.chunk_length
        z = sample(self.sampler, self._window_denoiser(ks, vs, tokens), z, self.grid)
        return z[..., :c], np.concatenate([z[..., c:], self.grid[0, -c:] * fresh], axis=-1)

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
            ks, vs = self._caches(s)
            noise = np.stack([fresh[j][:, i * c:(i + 1) * c] for j in act])
            _, self.windows[s] = self._roll(self.windows[s], noise, ks, vs, self.tokens[s])
            chunk = np.stack([raws[j][i * c:(i + 1) * c] for j in act])
            ks, vs, self.tokens[s] = self._ingest(chunk, self.loc[s], self.scale[s], ks, vs, self.tokens[s])
            self._set_caches(s, ks, vs)

    # -- init / update -------------------------------------------------------------------------
    def _init_slots(self, slots: np.ndarray, histories: list[np.ndarray], covs=None,
                    noise: list[np.ndarray] | None = None) -> None:
        """Cold start: the windows over the last H values (truth + staircase noise), then B
        observed rolls replaying them (``noise[j] [S, 2H]``; drawn per series if omitted)."""
        p, w, r, h = self.patch_length, self.window, self.init_tokens, self.horizon
        padded = [np.concatenate([np.full(max(h - len(x), 0), np.nan, np.float32), x]) for x in histories]
        if noise is None:
            noise = [self._noise(int(s), _REFRESH if self.count[s] else _INIT, (self.num_samples, 2 * h))
                     for s in slots]
        groups: dict[int, list[int]] = {}
        for j, x in enumerate(padded):
            groups.setdefault(min(max(w, -(-(len(x) - h) // p)), r), []).append(j)
        for n, js in groups.items():
            s = slots[js]
            loc, scale = instance_stats(np.stack([align(padded[j], p, w, w) for j in js]))
            ctx = np.stack([align(padded[j][:-h], p, n, n) for j in js])
            truth = np.stack([padded[j][-h:] for j in js])
            self._guard(s, np.concatenate([ctx, truth], axis=1), loc, scale)
            ks, vs = self._run_update(features(ctx, loc, scale, p), np.zeros(len(js), np.int64),
                                      *self._empty_cache(len(js)))
            self._set_caches(s, ks, vs)
            self.tokens[s] = n
            self.loc[s], self.scale[s] = loc, scale
            y = normalize(truth, loc, scale)
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

    def _rebuild_length(self) -> int:
        # a cold start reads the last H values as the windows' truth and the context before them
        return self.context_length + self.horizon

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
        does not depend on how much history it has seen. Atomic per series
        (``SeriesRefused`` names the refused ones; see ``tsdb_streaming.core``).
        """
        if covariates is not None:
            raise StreamingError("horizon exports do not take covariates")
        options = {k: v for k, v in (("noise", noise), ("init_noise", init_noise)) if v is not None}
        super().update(item_ids, values, None, **options)

    def _check_options(self, item_ids: list, arrays: list[np.ndarray], new: list[int], noise=None,
                       init_noise=None) -> None:
        shape = (self.num_samples, 2 * self.horizon)
        for name, given in (("noise", noise), ("init_noise", init_noise)):
            if given is not None and len(given) != len(item_ids):
                raise StreamingError(f"{len(item_ids)} series but {len(given)} {name} arrays")
        if init_noise is not None and any(np.shape(init_noise[j]) != shape for j in new):
            raise StreamingError(f"init noise must be {list(shape)} per new series")
        if noise is None:
            return
        c = self.chunk_length
        for j, (item, a) in enumerate(zip(item_ids, arrays)):
            if j in new or not len(a):
                continue
            need = (int(self.pending_count[self._slot[item]]) + len(a)) // c * c
            f = np.asarray(noise[j], np.float32)
            if f.ndim != 2 or f.shape[0] != self.num_samples or f.shape[1] < need:
                raise StreamingError(f"update noise of series {item!r} must be [{self.num_samples}, >= {need}], "
                                     f"got {f.shape}")

    def _apply(self, item_ids: list, arrays: list[np.ndarray], covs, new: list[int],
               noise: Sequence[np.ndarray] | None = None, init_noise: Sequence[np.ndarray] | None = None) -> None:
        if new:
            self._init_slots(self._slots([item_ids[j] for j in new]), [arrays[j] for j in new],
                             noise=None if init_noise is None else [np.asarray(init_noise[j], np.float32)
                                                                    for j in new])
        fresh_ids = set(new)
        old = [j for j in range(len(item_ids)) if j not in fresh_ids and len(arrays[j])]
        if not old:
            return
        c = self.chunk_length
        slots = self._slots([item_ids[j] for j in old])
        raws = [np.concatenate([self.pending[s, :self.pending_count[s]], arrays[j]]) for s, j in zip(slots, old)]
        fresh = [self._noise(int(s), _ROLL, (self.num_samples, len(raw) // c * c)) if noise is None
                 else np.asarray(noise[j], np.float32) for s, j, raw in zip(slots, old, raws)]
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

    # -- forecast --------------------------------------------------------------------------------
    def forecast(self, item_ids: Sequence, num_samples: int | None = None, seed=None,
                 quantiles: Sequence[float] = DEFAULT_QUANTILES, noise: np.ndarray | None = None,
                 normalized: bool = False, **unsupported: Any) -> Forecast:
        """The ``S`` samples per series of the ``H`` steps after its last observation, and
        their quantiles; the state is not modified (except under ``refresh="context"``, which
        first rebuilds each series from its last ``context_length + H`` values).

        ``noise [b, S, H + c]`` standard normal (the chunk appended by each free roll)
        overrides ``seed`` (an int, one seed per series, or None, as the depth format).
        """
        if unsupported:
            raise StreamingError(f"horizon forecasts run the exported roll grid; {sorted(unsupported)} "
                                 "do not apply")
        if num_samples is not None and int(num_samples) != self.num_samples:
            raise StreamingError(f"this forecaster keeps {self.num_samples} noisy windows per series, so forecasts "
                                 f"have {self.num_samples} samples, not {num_samples}; open the model with "
                                 f"num_samples={num_samples}")
        item_ids = list(item_ids)
        s = self._forecast_slots(item_ids)
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


__all__ = ["DENOISE_INPUTS", "FORMAT", "FORMAT_VERSION", "HorizonStreamingForecaster"]
