"""Format ``tsdb-streaming-onnx``: depth, e2e and looped exports (one noise level per step).

Mirrors ``tsdb.streaming`` (the PyTorch reference) operation for operation:

- ``update`` graph: new complete patches (normalized features) attend to the cached
  window and return the updated caches; initialisation is the same graph with an empty
  cache; a forecast's partial token is its last output entry for the NaN-padded
  unfinished patch.
- ``denoise_<i>`` graphs: one preconditioned denoiser call of block ``i``; the Euler/Heun
  sampler (``sampler.sample``) loops on the host and takes each step with the block the
  exported schedule names (``step_blocks``, or ``schedules[K]["blocks"]`` for another K).
- covariates (models exported with ``shapes.num_covariates = n > 0``): ``update`` takes the
  covariates of the new values (extra feature channels), ``forecast`` the known-future
  covariates of the horizon (the ``future_covariates`` graph input).

State per series: per block and layer the keys/values of the last ``W`` context tokens,
the values of the unfinished patch, the frozen normalization statistics, the observation
count and the last raw values needed to re-initialise it (plus the covariates' versions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..core import DEFAULT_QUANTILES, Field, Forecast, StreamingForecaster
from ..errors import StreamingError
from ..metadata import RECENT_LOCATION
from ..numerics import align, features, forecast_noise, instance_stats, normalize_covariates
from ..registry import register_format
from ..sampler import StepCallback, sample

FORMAT = "tsdb-streaming-onnx"
FORMAT_VERSION = 2


@register_format(FORMAT)
class DepthStreamingForecaster(StreamingForecaster):
    """Online forecasts from a depth / e2e / looped export (see ``StreamingForecaster`` for
    the parameters). Models exported with covariates take them in ``update`` and
    ``forecast``."""

    FORMAT_VERSION = FORMAT_VERSION
    METADATA_KEYS = ("sigmas", "step_blocks", "schedules")

    @classmethod
    def check_metadata(cls, path: Path, meta: dict) -> None:
        sh = meta["shapes"]
        nb = sh["n_blocks"]
        for sched in [{"sigmas": meta["sigmas"], "blocks": meta["step_blocks"]}, *meta["schedules"].values()]:
            sig, blocks = sched["sigmas"], sched["blocks"]
            if len(sig) < 2 or sig[-1] != 0 or any(a <= b for a, b in zip(sig, sig[1:])):
                raise StreamingError(f"{path}: the sigma grid must be strictly descending and end in 0")
            if len(blocks) != len(sig) - 1 or any(not 0 <= i < nb for i in blocks):
                raise StreamingError(f"{path}: a schedule needs one block in [0, {nb}) per step")
        if sh["horizon"] % sh["patch_length"]:
            raise StreamingError(f"{path}: inconsistent shapes {sh}")
        norm = meta["normalization"]
        k = norm.get("location_window", 0)
        recent = norm["rule"] == RECENT_LOCATION
        if recent != bool(k) or not isinstance(k, int) or not 0 <= k <= sh["context_length"]:
            raise StreamingError(f"{path}: normalization rule {norm['rule']!r} with location_window {k!r} "
                                 f"(a recent-location rule needs one in 1..{sh['context_length']})")

    def _configure(self, meta: dict) -> None:
        self.location_window = int(meta["normalization"].get("location_window", 0))
        self.sigmas = np.asarray(meta["sigmas"], dtype=np.float32)
        self.step_blocks = [int(i) for i in meta["step_blocks"]]

    def _layout(self) -> dict[str, Field]:
        p, r, n = self.patch_length, self.init_tokens, self.num_covariates
        fields = {"tokens": Field((), np.int64, 0), "pending": Field((p,), np.float32, np.nan),
                  "pending_count": Field((), np.int64, 0), "loc": Field((1,), np.float32, 0, True),
                  "scale": Field((1,), np.float32, 1, True), "count": Field((), np.int64, 0),
                  "recent": Field((r * p,), np.float32, np.nan)}
        if n:
            fields.update(cov_pending=Field((n, p), np.float32, np.nan), cov_loc=Field((n, 1), np.float32, 0, True),
                          cov_scale=Field((n, 1), np.float32, 1, True),
                          cov_recent=Field((n, r * p), np.float32, np.nan))
        return fields

    # -- covariates ----------------------------------------------------------------------------
    def _covariate_arrays(self, covariates, arrays: list[np.ndarray]) -> list[np.ndarray] | None:
        """``covariates[j]`` as float32 ``[n_cov, len(arrays[j])]``, checked; None without covariates."""
        n = self.num_covariates
        if covariates is None:
            if n:
                raise StreamingError(f"this model takes {n} covariate(s): pass covariates=[...] with one "
                                     f"[{n}, len(values)] array per series")
            return None
        if not n:
            raise StreamingError("covariates given, but this model was exported without covariates")
        covariates = list(covariates)
        if len(covariates) != len(arrays):
            raise StreamingError(f"{len(arrays)} series but {len(covariates)} covariate arrays")
        out = []
        for c, a in zip(covariates, arrays):
            c = np.asarray(c, dtype=np.float32)
            if c.ndim <= 1 and c.size == n * len(a) and (n == 1 or len(a) == 1):  # one covariate's values, or one step's covariates
                c = c.reshape(n, len(a))
            if c.shape != (n, len(a)):
                raise StreamingError(f"covariates must be [{n}, {len(a)}] for {len(a)} value(s), got shape "
                                     f"{np.shape(c)}")
            if not np.isfinite(c).all():
                raise StreamingError("covariates must be finite numbers (they are known at every step)")
            out.append(c.astype(np.float32))
        return out

    def _check_new_values(self, slots: np.ndarray, arrays: list[np.ndarray], covs: list | None) -> None:
        super()._check_new_values(slots, arrays, covs)
        for s, c in zip(slots, covs or []):
            if c.shape[1]:
                self._guard(np.asarray([s]), c[None], self.cov_loc[s:s + 1], self.cov_scale[s:s + 1], "covariate")

    def _recent_covariates(self, slots: np.ndarray) -> list | None:
        if not self.num_covariates:
            return None
        out = []
        for s in slots:
            n = int(min(self.count[s], self.recent.shape[1]))
            out.append(self.cov_recent[s, :, self.recent.shape[1] - n:].copy())
        return out

    # -- init / update ---------------------------------------------------------------------------
    def _init_slots(self, slots: np.ndarray, histories: list[np.ndarray], covs: list | None = None) -> None:
        """(Re)initialise the given slots from their full (or recent) raw histories (and
        their covariates ``[n_cov, T]``)."""
        p, w, r = self.patch_length, self.window, self.init_tokens
        groups: dict[int, list[int]] = {}
        for j, h in enumerate(histories):
            groups.setdefault(min(max(w, -(-len(h) // p)), r), []).append(j)
        for n, js in groups.items():
            s = slots[js]
            aligned = np.stack([align(histories[j], p, n, n) for j in js])
            stats = np.stack([align(histories[j], p, w, w) for j in js])
            loc, scale = instance_stats(stats, self.location_window)   # as tsdb's training did
            self._guard(s, aligned, loc, scale)
            if covs is None:
                feats = features(aligned, loc, scale, p)
            else:
                cov_aligned = np.stack([[align(row, p, n, n) for row in covs[j]] for j in js])
                cov_loc, cov_scale = instance_stats(np.stack([[align(row, p, w, w) for row in covs[j]] for j in js]))
                self._guard(s, cov_aligned, cov_loc, cov_scale, "covariate")
                feats = features(aligned, loc, scale, p, cov_aligned, cov_loc, cov_scale)
            ks, vs = self._run_update(feats, np.zeros(len(js), np.int64), *self._empty_cache(len(js)))
            self._set_caches(s, ks, vs)
            self.tokens[s] = n
            self.pending[s] = np.nan
            self.pending_count[s] = 0
            self.loc[s], self.scale[s] = loc, scale
            if covs is not None:
                self.cov_pending[s] = np.nan
                self.cov_loc[s], self.cov_scale[s] = cov_loc, cov_scale
            for jj, slot in zip(js, s):
                h = histories[jj]
                self.count[slot] = len(h)
                self.recent[slot] = np.nan
                keep = min(len(h), r * p)
                if keep:
                    self.recent[slot, r * p - keep:] = h[len(h) - keep:]
                if covs is not None:
                    self.cov_recent[slot] = np.nan
                    if keep:
                        self.cov_recent[slot, :, r * p - keep:] = covs[jj][:, len(h) - keep:]

    def update(self, item_ids: Sequence, values: Iterable, covariates: Iterable | None = None) -> None:
        """Ingest new values per series: ``values[j]`` is a number or a 1-D array (NaN = missing).

        ``covariates[j]`` (models with covariates): the covariates of those values,
        ``[n_cov, len(values[j])]``. Unknown series are initialised from their values (their
        history). The cost per series does not depend on how much history it has seen.
        Atomic per series (``SeriesRefused`` names the refused ones; see ``tsdb_streaming.core``).
        """
        super().update(item_ids, values, covariates)

    def _apply(self, item_ids: list, arrays: list[np.ndarray], covs: list | None, new: list[int]) -> None:
        if new:
            self._init_slots(self._slots([item_ids[j] for j in new]), [arrays[j] for j in new],
                             None if covs is None else [covs[j] for j in new])
        fresh = set(new)
        old = [(self._slot[item_ids[j]], arrays[j], None if covs is None else covs[j])
               for j in range(len(item_ids)) if j not in fresh and len(arrays[j])]
        if not old:
            return
        p = self.patch_length
        groups: dict[int, list[tuple[int, np.ndarray, Any]]] = {}
        rests = []
        for slot, a, c in old:
            raw = np.concatenate([self.pending[slot, : self.pending_count[slot]], a])
            craw = None if c is None else np.concatenate([self.cov_pending[slot, :, : self.pending_count[slot]], c], 1)
            m = len(raw) // p
            if m:
                groups.setdefault(m, []).append((slot, raw[: m * p], None if c is None else craw[:, : m * p]))
            rests.append((slot, raw[m * p:], a, None if c is None else craw[:, m * p:], c))
        for m, items in groups.items():
            s = np.asarray([slot for slot, _, _ in items])
            raw = np.stack([r for _, r, _ in items])
            if covs is None:
                feats = features(raw, self.loc[s], self.scale[s], p)
            else:
                feats = features(raw, self.loc[s], self.scale[s], p, np.stack([c for _, _, c in items]),
                                 self.cov_loc[s], self.cov_scale[s])
            ks, vs = self._run_update(feats, self.tokens[s], *self._caches(s))
            self._set_caches(s, ks, vs)
            self.tokens[s] += m
        refresh = []
        for slot, rest, a, crest, c in rests:
            self.pending[slot] = np.nan
            self.pending[slot, : len(rest)] = rest
            self.pending_count[slot] = len(rest)
            before = int(self.count[slot])
            self.count[slot] = before + len(a)
            self.recent[slot] = np.concatenate([self.recent[slot], a])[-self.recent.shape[1]:]
            if c is not None:
                self.cov_pending[slot] = np.nan
                self.cov_pending[slot, :, : len(rest)] = crest
                self.cov_recent[slot] = np.concatenate([self.cov_recent[slot], c], 1)[:, -self.recent.shape[1]:]
            if self._refresh_points(before, before + len(a)):
                refresh.append(slot)
        if refresh:
            self._reinit(np.asarray(refresh))

    # -- forecast --------------------------------------------------------------------------------
    def _partial(self, s: np.ndarray) -> tuple[list, list, np.ndarray]:
        """The partial token of each series' unfinished patch (zeros and ``has = False`` if none)."""
        b = len(s)
        has = self.pending_count[s] > 0
        kp = [np.zeros((nl, b, self.heads, 1, self.head_dim), np.float32) for nl in self.layers]
        vp = [a.copy() for a in kp]
        if has.any():
            sp = s[has]
            if self.num_covariates:
                feats = features(self.pending[sp], self.loc[sp], self.scale[sp], self.patch_length,
                                 self.cov_pending[sp], self.cov_loc[sp], self.cov_scale[sp])
            else:
                feats = features(self.pending[sp], self.loc[sp], self.scale[sp], self.patch_length)
            ks, vs = self._run_update(feats, self.tokens[sp], *self._caches(sp))
            for i in range(len(self.layers)):
                kp[i][:, has] = ks[i][:, :, :, -1:]
                vp[i][:, has] = vs[i][:, :, :, -1:]
        return kp, vp, has

    def schedule(self, num_steps: int | None = None) -> tuple[np.ndarray, list[int]]:
        """The sigma grid and the block of each step: the default, or the exported ``num_steps`` one."""
        if num_steps is None:
            return self.sigmas, self.step_blocks
        schedules = self.meta["schedules"]
        if str(num_steps) not in schedules:
            raise StreamingError(f"num_steps={num_steps} not in the exported schedules {sorted(schedules, key=int)}")
        sched = schedules[str(num_steps)]
        return np.asarray(sched["sigmas"], dtype=np.float32), [int(i) for i in sched["blocks"]]

    def forecast(self, item_ids: Sequence, num_samples: int | None = None, seed=None,
                 quantiles: Sequence[float] = DEFAULT_QUANTILES, noise: np.ndarray | None = None,
                 num_steps: int | None = None, sampler: str | None = None, normalized: bool = False,
                 covariates: np.ndarray | None = None, callback: StepCallback | None = None) -> Forecast:
        """Sample ``num_samples`` futures per series (default: the forecaster's) and their quantiles.

        ``covariates [b, n_cov, H]`` (models with covariates): the known-future covariates
        of the H steps after each series' last observed value.

        ``seed``: an int (one generator for the batch), a list with one seed (int or tuple of
        ints) per series (reproducible whatever the batch), or None. ``noise [b, S, H]``
        (standard normal) overrides it. ``num_steps`` picks another of the exported schedules
        (the sigma grid and the block of each step). ``callback(step, sigma, block)`` is
        called before each sampler step.
        """
        item_ids = list(item_ids)
        s = self._forecast_slots(item_ids)
        b, hz = len(s), self.horizon
        noise = forecast_noise(noise, seed, b, self.num_samples if num_samples is None else num_samples, hz)
        sig, step_blocks = self.schedule(num_steps)
        sampler = sampler or self.sampler
        extra = {}
        if self.num_covariates or covariates is not None:
            n = self.num_covariates
            if covariates is None or not n or np.shape(covariates) != (b, n, hz):
                raise StreamingError(f"this model takes {n} covariate(s): forecast needs covariates "
                                     f"[{b}, {n}, {hz}] (the known future), got "
                                     f"{None if covariates is None else np.shape(covariates)}")
            covariates = np.asarray(covariates, dtype=np.float32)
            if not np.isfinite(covariates).all():
                raise StreamingError("future covariates must be finite numbers")
            extra["future_covariates"] = normalize_covariates(covariates, self.cov_loc[s], self.cov_scale[s])
        kp, vp, has = self._partial(s)
        ks, vs = self._caches(s)
        tokens = self.tokens[s]

        def block_denoiser(i: int):
            def denoise(z: np.ndarray, sigma: np.float32) -> np.ndarray:
                return self._denoise[i].run(["denoised"], {
                    "cache_k": ks[i], "cache_v": vs[i], "partial_k": kp[i], "partial_v": vp[i],
                    "has_partial": has, "tokens": tokens, "z": z, "sigma": np.full(b, sigma, np.float32),
                    **extra})[0]
            return denoise

        try:
            x = sample(sampler, [block_denoiser(i) for i in range(len(self._denoise))], noise * sig[0], sig,
                       step_blocks, callback)
        except ValueError as e:
            if isinstance(e, StreamingError):
                raise
            raise StreamingError(str(e)) from None
        return self._summarize(item_ids, s, x, quantiles, normalized)


__all__ = ["DepthStreamingForecaster", "FORMAT", "FORMAT_VERSION"]
