"""What every export format's forecaster shares: per-series slots and their batching,
the update transaction (each series applied whole or not at all), the refresh policy,
``reset_series``, checksummed state files and the ``Forecast`` a forecast returns.

A format (``formats/<name>.py``) subclasses :class:`StreamingForecaster`, registers itself
with ``@register_format(name)`` and supplies its metadata checks, its per-series state
layout, ``_init_slots`` (a series from its history), ``_apply`` (an update) and ``forecast``.
``StreamingForecaster(model_dir)`` returns an instance of the class registered for the
metadata's ``"format"``.

Reliability rules (for every format):

- A value enters a series' state only if ``|(x - loc) / scale| <= MAX_NORMALIZED`` (1e4)
  with the statistics it is normalized with (the frozen ones, or those a (re)initialisation
  computes); ``+-inf`` never does; NaN is a missing value. After an update every touched
  series' state is checked to be finite.
- ``update`` is atomic per series: a refused series keeps exactly its previous state (a new
  one stays unknown), every other series of the call is applied, then :class:`SeriesRefused`
  (a ``StreamingError``) names the refused series and why. An error about the call itself
  (lengths, shapes, ids) changes nothing.
- A forecast never contains a non-finite number: it raises a ``StreamingError`` naming the
  series instead.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .errors import SeriesRefused, StreamingError
from .graphs import open_graph, session_options
from .metadata import load_metadata, read_metadata
from .numerics import MAX_NORMALIZED, out_of_range
from .registry import format_class

STATE_FORMAT = "tsdb-streaming-state"
STATE_VERSION = 2            # 2: a sha256 checksum over the payload (version 1 files load unchecked)
DEFAULT_QUANTILES = (0.1, 0.5, 0.9)
_CHECKSUM = "sha256"


@dataclass(frozen=True)
class Field:
    """One per-series state array: its shape after the slot axis, dtype and empty value;
    ``finite``: must hold finite numbers (elsewhere NaN marks missing or padding)."""

    shape: tuple
    dtype: type
    fill: float
    finite: bool = False


@dataclass
class Forecast:
    """Raw-scale forecasts of a batch of series."""

    item_ids: list
    samples: np.ndarray            # [series, samples, horizon]
    quantile_levels: tuple
    quantiles: np.ndarray          # [series, levels, horizon]

    @property
    def mean(self) -> np.ndarray:
        return self.samples.mean(axis=1)

    def to_records(self) -> list[dict]:
        return [{"item_id": item, "mean": self.mean[j].tolist(),
                 "quantiles": {format(q, "g"): self.quantiles[j, i].tolist()
                               for i, q in enumerate(self.quantile_levels)}}
                for j, item in enumerate(self.item_ids)]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _select(rows: dict, j: np.ndarray) -> dict:
    """Entries ``j`` of saved rows (``StreamingForecaster._rows``)."""
    return {name: ([c[:, j] for c in a] if name in ("k", "v") else a[j]) for name, a in rows.items()}


def _digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the arrays' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.data)
    return h.hexdigest()


REFRESH_POLICIES = ("warmup", "none", "context")


def refresh_due(refresh: str, refresh_every: int | None, context_length: int, before: int, after: int) -> bool:
    """Whether a series whose observation count goes from ``before`` to ``after`` is
    re-initialised from its recent values by an update (the ``refresh``/``refresh_every``
    policy of :class:`StreamingForecaster`; ``tsdb bench streamed-accuracy`` scores the
    policies). ``"context"`` rebuilds at each forecast instead, never in an update."""
    if refresh == "warmup":
        k = 2
        while k < context_length:
            if before < k <= after:
                return True
            k *= 2
        if before < context_length <= after:
            return True
    if refresh_every:
        return after // refresh_every > before // refresh_every
    return False


class StreamingForecaster:
    """Online forecasts for many series from an exported model directory.

    ``StreamingForecaster(model_dir, ...)`` opens any export the runtime serves and returns
    the class registered for its format (``DepthStreamingForecaster`` for depth / e2e /
    looped exports, ``HorizonStreamingForecaster`` for horizon ones).

    Parameters
    ----------
    model_dir: directory written by ``tsdb export`` (``tsdb_model.json`` + graphs).
    intra_op_num_threads: onnxruntime threads per call (1 is fastest for one stream).
    refresh: ``"warmup"`` (default) re-initialises a series from its recent raw values when
        its observation count reaches 2, 4, 8, ... < context_length and context_length, so
        the frozen normalization statistics of a young series follow the data;
        ``"none"`` keeps the statistics of the first update frozen;
        ``"context"`` rebuilds each series from exactly its last ``context_length`` values
        (statistics over that window) right before each of its forecasts, so a streamed
        forecast is the cold forecast the model was evaluated with: the state's sliding
        caches otherwise reach back ``init_tokens`` patches, beyond any training context
        (``tsdb bench streamed-accuracy`` measures both). Costs one context pass per series
        per forecast; updates cost the same as under the other policies.
    refresh_every: also re-initialise every N observations (``None``: never).
    providers: onnxruntime execution providers (default CPU).
    num_samples: samples per forecast (a format that keeps sample trajectories in its state,
        like horizon, keeps this many per series and always returns them).
    seed: seed of the noise updates draw themselves (per series and observation count, so a
        replay gives the same numbers whatever the batching); formats whose updates are
        deterministic (depth) draw none.
    """

    FORMAT: str = ""             # set by @register_format
    FORMAT_VERSION: int = 0
    METADATA_KEYS: tuple = ()    # keys this format's metadata has beyond metadata.COMMON_KEYS

    def __new__(cls, model_dir: str | os.PathLike, *args, **kwargs):
        if cls is StreamingForecaster:
            path, meta = read_metadata(model_dir)
            cls = format_class(meta.get("format"), str(path))
        return super().__new__(cls)

    def __init__(self, model_dir: str | os.PathLike, intra_op_num_threads: int = 1, refresh: str = "warmup",
                 refresh_every: int | None = None, providers: Sequence[str] | None = None,
                 num_samples: int = 100, seed: int = 0):
        if refresh not in REFRESH_POLICIES:
            raise StreamingError(f"refresh must be one of {', '.join(map(repr, REFRESH_POLICIES))}, got {refresh!r}")
        if refresh_every is not None and (isinstance(refresh_every, bool) or int(refresh_every) != refresh_every
                                          or refresh_every < 1):
            raise StreamingError(f"refresh_every must be a positive integer or None, got {refresh_every!r}")
        if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
            raise StreamingError(f"num_samples must be >= 1, got {num_samples}")
        self.model_dir = Path(model_dir)
        self.meta = meta = load_metadata(self.model_dir)
        served_by = format_class(meta["format"])
        if not isinstance(self, served_by):
            raise StreamingError(f"{self.model_dir} is a {meta['format']!r} export, served by "
                                 f"{served_by.__name__}; open it with StreamingForecaster(model_dir)")
        self.refresh, self.refresh_every = refresh, refresh_every
        self.num_samples, self.seed = int(num_samples), int(seed)
        sh = meta["shapes"]
        self.context_length = int(sh["context_length"])
        self.horizon = int(sh["horizon"])
        self.patch_length = int(sh["patch_length"])
        self.window = int(sh["window_tokens"])
        self.init_tokens = int(sh["init_tokens"])
        self.layers = [int(n) for n in sh["layers_per_block"]]
        self.heads, self.head_dim = int(sh["n_heads"]), int(sh["head_dim"])
        self.num_covariates = int(sh.get("num_covariates", 0))
        self.sampler = meta["sampler"]
        self._configure(meta)
        self._open_graphs(intra_op_num_threads, providers)
        self._fields = self._layout()
        self._clear()

    # -- format hooks --------------------------------------------------------------------------
    @classmethod
    def check_metadata(cls, path: Path, meta: dict) -> None:
        """The format's own metadata checks (after ``metadata.check_common``)."""

    def _configure(self, meta: dict) -> None:
        """Read the format's own metadata into attributes."""

    def _layout(self) -> dict[str, Field]:
        """The per-series state arrays besides the context caches ``k``/``v``."""
        raise NotImplementedError

    def _init_slots(self, slots: np.ndarray, histories: list[np.ndarray], covs: list | None = None) -> None:
        """(Re)initialise ``slots`` from their raw histories (and covariates ``[n_cov, T]``)."""
        raise NotImplementedError

    def _apply(self, item_ids: list, arrays: list[np.ndarray], covs: list | None, new: list[int],
               **options) -> None:
        """Apply an update: series ``item_ids[j]`` for ``j in new`` are initialised from
        ``arrays[j]`` (their slots exist already), the others get ``arrays[j]`` appended."""
        raise NotImplementedError

    def _check_options(self, item_ids: list, arrays: list[np.ndarray], new: list[int], **options) -> None:
        """Refuse a call whose format options are wrong before any state changes."""
        if options:
            raise StreamingError(f"{type(self).__name__}.update takes no {sorted(options)}")

    def _covariate_arrays(self, covariates, arrays: list[np.ndarray]) -> list[np.ndarray] | None:
        """The update's covariates, checked; None without covariates."""
        if covariates is not None:
            raise StreamingError(f"{self.meta['strategy']} exports of this format take no covariates")
        return None

    # -- graphs --------------------------------------------------------------------------------
    def _open_graphs(self, intra_op_num_threads: int, providers: Sequence[str] | None) -> None:
        """Open the update graph (context tokens into the caches) and the per-block
        ``denoise`` graphs, checked against the metadata."""
        opts = session_options(intra_op_num_threads)
        providers = list(providers or ["CPUExecutionProvider"])
        g = self.meta["graphs"]
        cache_shape = lambda nl: [nl, None, self.heads, None, self.head_dim]  # noqa: E731
        fixed = {"features": [None, None, self.patch_length, 2 + self.num_covariates]}
        for i, nl in enumerate(self.layers):
            fixed[f"cache_k_{i}"] = fixed[f"cache_v_{i}"] = cache_shape(nl)
        self._update = open_graph(self.model_dir / g["update"]["file"], opts, providers, g["update"]["inputs"],
                                  fixed, "update graph")
        self._update_outputs = list(g["update"]["outputs"])
        self._denoise = [open_graph(self.model_dir / e["file"], opts, providers, e["inputs"],
                                    {"cache_k": cache_shape(self.layers[i]), "z": [None, None, self.horizon]},
                                    f"denoise graph {i}")
                         for i, e in enumerate(g["denoise"])]

    def _run_update(self, feats: np.ndarray, start: np.ndarray, ks: list, vs: list) -> tuple[list, list]:
        """New context tokens ``feats [b, m, P, F]`` at positions ``start`` into the caches."""
        inputs = {"features": np.ascontiguousarray(feats, np.float32), "start": start.astype(np.int64)}
        for i in range(len(self.layers)):
            inputs[f"cache_k_{i}"] = ks[i]
            inputs[f"cache_v_{i}"] = vs[i]
        out = self._update.run(self._update_outputs, inputs)
        return out[0::2], out[1::2]

    def _empty_cache(self, b: int) -> tuple[list, list]:
        z = [np.zeros((nl, b, self.heads, 0, self.head_dim), np.float32) for nl in self.layers]
        return z, [a.copy() for a in z]

    def _caches(self, s: np.ndarray) -> tuple[list, list]:
        return [k[:, s] for k in self.k], [v[:, s] for v in self.v]

    def _set_caches(self, s: np.ndarray, ks: list, vs: list) -> None:
        for i in range(len(self.layers)):
            self.k[i][:, s] = ks[i]
            self.v[i][:, s] = vs[i]

    # -- storage: one slot per series (axis 1 of the caches, axis 0 of the other fields) -------
    def _clear(self) -> None:
        self._slot: dict = {}        # item id -> slot
        self._items: list = []       # slot -> item id
        self._n = 0
        self._bad: dict[int, str] = {}
        self._alloc(8)

    def _alloc(self, capacity: int) -> None:
        w = self.window
        self.k = [np.zeros((nl, capacity, self.heads, w, self.head_dim), np.float32) for nl in self.layers]
        self.v = [np.zeros_like(k) for k in self.k]
        for name, f in self._fields.items():
            setattr(self, name, np.full((capacity, *f.shape), f.fill, f.dtype))

    @property
    def _FIELDS(self) -> tuple:
        return tuple(self._fields)

    def _grow(self, need: int) -> None:
        cap = self.tokens.shape[0]
        if need <= cap:
            return
        old = self._rows(np.arange(cap))
        self._alloc(max(need, 2 * cap, 8))
        self._put_rows(np.arange(cap), old)

    def _rows(self, s: np.ndarray) -> dict:
        """Copies of the state of slots ``s``."""
        rows = {name: getattr(self, name)[s].copy() for name in self._fields}
        rows["k"], rows["v"] = self._caches(s)
        return rows

    def _put_rows(self, s: np.ndarray, rows: dict) -> None:
        for name in self._fields:
            getattr(self, name)[s] = rows[name]
        self._set_caches(s, rows["k"], rows["v"])

    def _add_series(self, item_ids: list) -> np.ndarray:
        self._grow(self._n + len(item_ids))
        slots = np.arange(self._n, self._n + len(item_ids))
        for item, s in zip(item_ids, slots):
            self._slot[item] = int(s)
            self._items.append(item)
        self._n += len(item_ids)
        return slots

    def _drop_slots(self, drop: Iterable[int]) -> None:
        """Forget the series in slots ``drop``; the others keep their order (compacted)."""
        drop = set(int(s) for s in drop)
        if not drop:
            return
        keep = np.asarray([s for s in range(self._n) if s not in drop], np.int64)
        m = len(keep)
        self._put_rows(np.arange(m), self._rows(keep))
        empty = np.arange(m, self._n)
        for name, f in self._fields.items():
            getattr(self, name)[empty] = f.fill
        for i in range(len(self.layers)):
            self.k[i][:, empty] = 0
            self.v[i][:, empty] = 0
        self._items = [self._items[s] for s in keep]
        self._slot = {item: j for j, item in enumerate(self._items)}
        self._n = m

    def _finite(self, s: np.ndarray) -> np.ndarray:
        """Per slot: is every array of its state that must be finite finite?"""
        ok = np.ones(len(s), bool)
        for name, f in self._fields.items():
            if f.finite:
                ok &= np.isfinite(getattr(self, name)[s]).reshape(len(s), -1).all(-1)
        for caches in (self.k, self.v):
            for c in caches:
                ok &= np.isfinite(c[:, s]).swapaxes(0, 1).reshape(len(s), -1).all(-1)
        return ok

    @property
    def item_ids(self) -> list:
        return list(self._items)

    def __contains__(self, item_id) -> bool:
        return item_id in self._slot

    def __len__(self) -> int:
        return self._n

    def observation_count(self, item_id) -> int:
        return int(self.count[self._slots([item_id])[0]])

    def _slots(self, item_ids: Sequence) -> np.ndarray:
        try:
            return np.asarray([self._slot[i] for i in item_ids], dtype=np.int64)
        except (KeyError, TypeError) as e:
            raise StreamingError(f"unknown series {e.args[0]!r}; update it with its history first") from None

    # -- value checks --------------------------------------------------------------------------
    def _guard(self, slots: np.ndarray, values: np.ndarray, loc: np.ndarray, scale: np.ndarray,
               what: str = "value") -> None:
        """Record (in the running transaction) the slots whose ``values [b, ...]`` do not fit
        the state once normalized with ``loc``/``scale`` (``[b, 1]`` or broadcastable)."""
        bad = out_of_range(values, loc, scale)
        for j in np.flatnonzero(bad):
            s = int(slots[j])
            self._bad.setdefault(s, self._range_message(self._items[s], values[j], loc[j], scale[j], what))

    @staticmethod
    def _range_message(item, values: np.ndarray, loc: np.ndarray, scale: np.ndarray, what: str) -> str:
        loc, scale = np.broadcast_to(loc, values.shape), np.broadcast_to(scale, values.shape)
        with np.errstate(all="ignore"):
            z = np.abs((values - loc) / scale)
            bad = ~(np.isnan(values) | (z <= MAX_NORMALIZED))
            stats_bad = ~(np.isfinite(loc) & np.isfinite(scale) & (scale > 0))
        if stats_bad.any() and not np.isinf(values).any():
            big = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else float("nan")
            return (f"series {item!r}: its {what}s (up to {big:.3g} in magnitude) are too large for float32 "
                    f"statistics; rescale the series (e.g. divide it by 1e6) before streaming it")
        i = np.flatnonzero((np.isinf(values) if stats_bad.any() else bad).reshape(-1))[0]
        x, lo, sc, zz = (float(a.reshape(-1)[i]) for a in (values, loc, scale, z))
        if np.isinf(x):
            return (f"series {item!r}: {what} {x} is infinite (or beyond float32's range, 3.4e38); the series "
                    f"was left unchanged: send a finite number, or NaN for a missing reading")
        return (f"series {item!r}: {what} {x:.6g} lies {zz:.3g} scales from the series' level {lo:.6g} "
                f"(scale {sc:.6g}), beyond the {MAX_NORMALIZED:g} scales a state can hold; the series was left "
                f"unchanged: correct the {what}, send NaN for a missing reading, or call "
                f"reset_series([{item!r}]) to restart the series at a new level")

    def _check_new_values(self, slots: np.ndarray, arrays: list[np.ndarray], covs: list | None) -> None:
        """Hook: record the known series whose new values do not fit their frozen statistics."""
        for s, a in zip(slots, arrays):
            if len(a):
                self._guard(np.asarray([s]), a[None], self.loc[s:s + 1], self.scale[s:s + 1])

    # -- the update transaction -------------------------------------------------------------------
    def _transaction(self, old: np.ndarray, new_ids: list, apply: Callable[[np.ndarray], None],
                     precheck: Callable[[], None] | None = None) -> None:
        """Run ``apply(new_slots)`` over known slots ``old`` and new series ``new_ids`` so that
        each series is applied whole or not at all (see the module docstring)."""
        saved = self._rows(old)
        n0 = self._n
        self._bad = {}
        try:
            if precheck is not None:
                precheck()
            new = self._add_series(new_ids)
            with np.errstate(all="ignore"):   # refused rows may overflow; they are rolled back
                apply(new)
        except BaseException:
            self._bad = {}
            self._put_rows(old, saved)
            self._drop_slots(range(n0, self._n))
            raise
        bad, self._bad = self._bad, {}
        touched = np.concatenate([old, new]).astype(np.int64)
        for s in touched[~self._finite(touched)]:
            bad.setdefault(int(s), f"series {self._items[s]!r}: this update would leave its state non-finite, so "
                                   f"it was refused and the series left unchanged; check its values, or call "
                                   f"reset_series([{self._items[s]!r}]) and send its recent history")
        if not bad:
            return
        refused = {self._items[s]: bad[s] for s in touched if int(s) in bad}
        applied = [self._items[s] for s in touched if int(s) not in bad]
        back = np.asarray([j for j, s in enumerate(old) if int(s) in bad], np.int64)
        if len(back):
            self._put_rows(old[back], _select(saved, back))
        self._drop_slots(s for s in new if int(s) in bad)
        raise SeriesRefused(refused, applied)

    def _parse_values(self, item_ids: Sequence, values: Iterable) -> tuple[list, list[np.ndarray]]:
        item_ids = list(item_ids)
        values = list(values)
        if len(values) != len(item_ids):
            raise StreamingError(f"{len(item_ids)} series but {len(values)} value arrays")
        try:
            if len(set(item_ids)) != len(item_ids):
                raise StreamingError("item_ids must be unique within one update")
        except TypeError:
            raise StreamingError("item ids must be hashable (strings, integers or tuples)") from None
        arrays = []
        for item, v in zip(item_ids, values):
            try:
                with np.errstate(over="ignore"):    # beyond float32 -> +-inf, refused by the value checks
                    arrays.append(np.atleast_1d(np.asarray(v, dtype=np.float32)).reshape(-1))
            except (TypeError, ValueError):
                raise StreamingError(f"series {item!r}: values must be numbers (NaN for a missing reading), got "
                                     f"{str(v)[:40]!r}") from None
        return item_ids, arrays

    def update(self, item_ids: Sequence, values: Iterable, covariates: Iterable | None = None,
               **options) -> None:
        """Ingest new values per series: ``values[j]`` is a number or a 1-D array (NaN = missing).

        Unknown series are initialised from their values (their history). The cost per
        series does not depend on how much history it has seen. Atomic per series: a
        series whose values do not fit its state (``|(x - loc) / scale| > 1e4``, or +-inf)
        is refused and left unchanged, the others are applied, then ``SeriesRefused``
        names the refused ones. ``covariates`` and the format's ``options``: see the
        format's class.
        """
        item_ids, arrays = self._parse_values(item_ids, values)
        covs = self._covariate_arrays(covariates, arrays)
        new = [j for j, i in enumerate(item_ids) if i not in self._slot]
        self._check_options(item_ids, arrays, new, **options)
        known = sorted(set(range(len(item_ids))) - set(new))
        old = self._slots([item_ids[j] for j in known])

        def precheck():
            self._check_new_values(old, [arrays[j] for j in known], None if covs is None else [covs[j] for j in known])

        self._transaction(old, [item_ids[j] for j in new],
                          lambda slots: self._apply(item_ids, arrays, covs, new, **options), precheck)

    def reset_series(self, item_ids: Sequence) -> list:
        """Forget these series: the next update of one re-initialises it from the values it
        brings (its history). Ids not in the state are ignored. Returns the ids forgotten."""
        gone = [i for i in dict.fromkeys(item_ids) if i in self._slot]
        self._drop_slots(self._slot[i] for i in gone)
        return gone

    # -- refresh --------------------------------------------------------------------------------
    def _recent_history(self, slot: int, limit: int | None = None) -> np.ndarray:
        n = int(min(self.count[slot], self.recent.shape[1], limit or self.recent.shape[1]))
        return self.recent[slot, self.recent.shape[1] - n:].copy()

    def _recent_covariates(self, slots: np.ndarray) -> list | None:
        return None

    def _reinit(self, slots: np.ndarray, limit: int | None = None) -> None:
        """Rebuild ``slots`` from their recent raw values (the last ``limit`` of them)."""
        count = self.count[slots].copy()      # observations seen, not the recent values kept
        covs = self._recent_covariates(slots)
        if covs is not None and limit:
            covs = [c[:, c.shape[1] - min(c.shape[1], limit):] for c in covs]
        self._init_slots(slots, [self._recent_history(int(s), limit) for s in slots], covs)
        self.count[slots] = count

    def refresh_series(self, item_ids: Sequence) -> None:
        """Recompute statistics and rebuild the state from each series' recent raw values
        (equal to initialising it from its whole history). Atomic per series, as ``update``."""
        slots = self._slots(item_ids)
        self._transaction(slots, [], lambda _: self._reinit(slots))

    def _rebuild_length(self) -> int:
        """Raw values a series is rebuilt from before a forecast under ``refresh="context"``:
        the cold path's input."""
        return self.context_length

    def _forecast_slots(self, item_ids: list) -> np.ndarray:
        """The slots of ``item_ids``; under ``refresh="context"`` each is first rebuilt from
        its last ``_rebuild_length()`` values (atomic per series, as ``update``)."""
        slots = self._slots(item_ids)
        if self.refresh == "context":
            self._transaction(slots, [], lambda _: self._reinit(slots, self._rebuild_length()))
        return slots

    def _refresh_points(self, before: int, after: int) -> bool:
        return refresh_due(self.refresh, self.refresh_every, self.context_length, before, after)

    # -- forecasts ----------------------------------------------------------------------------------
    def _summarize(self, item_ids: list, s: np.ndarray, x: np.ndarray, quantiles: Sequence[float],
                   normalized: bool) -> Forecast:
        """Normalized samples ``x [b, S, H]`` of slots ``s`` -> a raw-scale ``Forecast``; refuses
        non-finite samples."""
        with np.errstate(all="ignore"):
            y = x if normalized else x * self.scale[s][:, :, None] + self.loc[s][:, :, None]
        bad = [item for item, ok in zip(item_ids, np.isfinite(y).reshape(len(s), -1).all(-1)) if not ok]
        if bad:
            raise StreamingError(f"the forecast of series {bad[0]!r}{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}"
                                 f" is not finite (the samples overflow float32 at the series' scale); rescale the "
                                 f"series, or call reset_series({bad[:3]!r}) and send its recent history")
        levels = tuple(float(q) for q in quantiles)
        if not all(0 <= q <= 1 for q in levels):
            raise StreamingError(f"quantile levels must lie in [0, 1], got {list(levels)}")
        qs = (np.quantile(y, levels, axis=1).transpose(1, 0, 2).astype(np.float32) if levels
              else np.zeros((len(s), 0, self.horizon), np.float32))
        return Forecast(item_ids, y, levels, qs)

    # -- persistence -------------------------------------------------------------------------------
    def save_state(self, path: str | os.PathLike, extra: dict | None = None) -> None:
        """Write every series' state (and an optional JSON-able ``extra``) atomically to
        ``path``, with a sha256 checksum over the payload."""
        path = Path(path)
        n = self._n
        arrays = {f: getattr(self, f)[:n] for f in self._fields}
        for i in range(len(self.layers)):
            arrays[f"k_{i}"] = self.k[i][:, :n]
            arrays[f"v_{i}"] = self.v[i][:, :n]
        header = {"format": STATE_FORMAT, "version": STATE_VERSION, "model_id": self.meta["model_id"],
                  "item_ids": list(self._items), "refresh": self.refresh, "extra": extra or {}}
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        arrays[_CHECKSUM] = np.frombuffer(_digest(arrays).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load_state(self, path: str | os.PathLike) -> dict:
        """Replace the current state by the one saved at ``path``; returns its ``extra``.
        A damaged file (truncated, bit-flipped: checksum mismatch) is refused with one line."""
        path = Path(path)
        if not path.exists():
            raise StreamingError(f"state file {path} does not exist")
        damaged = "restore it from a backup, or delete it to start the series afresh"
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
            header = json.loads(bytes(data["header"]).decode())
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except Exception as e:  # truncated, corrupt or foreign file
            raise StreamingError(f"{path} is not a tsdb-streaming state file or is damaged ({_one_line(e)}); "
                                 f"{damaged}") from None
        if header.get("format") != STATE_FORMAT or header.get("version") not in (1, STATE_VERSION):
            raise StreamingError(f"{path}: unsupported state format {header.get('format')!r} "
                                 f"v{header.get('version')}")
        if header["version"] >= 2:
            stored = bytes(data.pop(_CHECKSUM, np.zeros(0, np.uint8))).decode(errors="replace")
            if stored != _digest(data):
                raise StreamingError(f"{path} is damaged: its sha256 checksum does not match its contents; {damaged}")
        data.pop("header")
        if header.get("model_id") != self.meta["model_id"]:
            raise StreamingError(f"{path} was saved for model {header.get('model_id')}, this is "
                                 f"{self.meta['model_id']}")
        ids = [tuple(i) if isinstance(i, list) else i for i in header.get("item_ids", [])]
        n = len(ids)
        self._check_loaded(path, data)
        for name, f in self._fields.items():
            if name not in data or data[name].shape != (n, *f.shape):
                raise StreamingError(f"{path}: state array {name!r} does not fit this model "
                                     f"(shape {None if name not in data else data[name].shape}); it was saved with "
                                     f"other settings")
        for i, nl in enumerate(self.layers):
            want = (nl, n, self.heads, self.window, self.head_dim)
            if any(data.get(f"{c}_{i}", np.zeros(0)).shape != want for c in "kv"):
                raise StreamingError(f"{path}: cache {i} does not fit this model; it was saved for another export")
        finite = np.ones(n, bool)
        for name in [f for f in self._fields if self._fields[f].finite] + [f"{c}_{i}" for c in "kv"
                                                                             for i in range(len(self.layers))]:
            a = data[name] if name in self._fields else data[name].swapaxes(0, 1)
            finite &= np.isfinite(a).reshape(n, -1).all(-1)
        if not finite.all():
            broken = [ids[s] for s in np.flatnonzero(~finite)]
            raise StreamingError(f"{path} holds a non-finite state for series {broken[:3]!r}"
                                 f"{' and more' if len(broken) > 3 else ''} (saved by an older runtime); {damaged}")
        self._clear()
        self._grow(n)
        for name in self._fields:
            getattr(self, name)[:n] = data[name]
        for i in range(len(self.layers)):
            self.k[i][:, :n] = data[f"k_{i}"]
            self.v[i][:, :n] = data[f"v_{i}"]
        self._items = ids
        self._slot = {item: j for j, item in enumerate(ids)}
        self._n = n
        return header.get("extra", {})

    def _check_loaded(self, path: Path, data: dict) -> None:
        """Hook: refuse, with a specific message, a saved state that cannot fill this forecaster."""


__all__ = ["DEFAULT_QUANTILES", "Field", "Forecast", "STATE_FORMAT", "STATE_VERSION", "StreamingForecaster",
           "refresh_due"]
