"""Streaming forecasts from an exported tsdb model with onnxruntime and numpy only.

Mirrors ``tsdb.streaming`` (the PyTorch reference) operation for operation:

- ``update`` graph: new complete patches (normalized features) attend to the cached
  window and return the updated caches; initialisation is the same graph with an empty
  cache; a forecast's partial token is its last output entry for the NaN-padded
  unfinished patch.
- ``denoise_<i>`` graphs: one preconditioned denoiser call of block ``i``; the Euler/Heun
  sampler loops on the host and routes each sigma to the block owning it.
- covariates (models exported with ``shapes.num_covariates = n > 0``): ``update`` takes the
  covariates of the new values (extra feature channels), ``forecast`` the known-future
  covariates of the horizon (the ``future_covariates`` graph input).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import onnxruntime as ort

FORMAT = "tsdb-streaming-onnx"
HORIZON_FORMAT = "tsdb-streaming-onnx-horizon"
FORMAT_VERSION = 2
METADATA_FILE = "tsdb_model.json"
STATE_FORMAT = "tsdb-streaming-state"
STATE_VERSION = 1
DEFAULT_QUANTILES = (0.1, 0.5, 0.9)


class StreamingError(ValueError):
    """Bad model directory, state file or input."""


# ---------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_metadata(model_dir: str | os.PathLike) -> tuple[Path, dict]:
    """``tsdb_model.json`` of ``model_dir`` as a dict (not yet validated)."""
    path = Path(model_dir) / METADATA_FILE
    if not path.exists():
        raise StreamingError(f"{model_dir} has no {METADATA_FILE}; export the model with `tsdb export RUN_DIR`")
    try:
        return path, json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StreamingError(f"{path} is not valid JSON: {e}") from None


def _check_version(path: Path, meta: dict, fmt: str, version: int, keys: Sequence[str]) -> None:
    if meta.get("format") != fmt:
        raise StreamingError(f"{path}: format {meta.get('format')!r} is not {fmt!r}")
    if meta.get("format_version") != version:
        raise StreamingError(f"{path}: format version {meta.get('format_version')} is not supported "
                             f"(this runtime reads version {version}); upgrade tsdb-streaming or re-export")
    missing = [k for k in keys if k not in meta]
    if missing:
        raise StreamingError(f"{path}: missing keys {missing}")
    if meta["normalization"].get("rule") != "frozen-at-init":
        raise StreamingError(f"{path}: unknown normalization rule {meta['normalization'].get('rule')!r}")
    if meta["sampler"] not in ("euler", "heun"):
        raise StreamingError(f"{path}: unknown sampler {meta['sampler']!r}")


def _check_files(model_dir: Path, meta: dict) -> None:
    """Every graph file exists and matches its checksum."""
    for entry in [meta["graphs"]["update"], *meta["graphs"]["denoise"]]:
        f = model_dir / entry["file"]
        if not f.exists():
            raise StreamingError(f"{f} is missing")
        if _sha256(f) != entry["sha256"]:
            raise StreamingError(f"{f} does not match the checksum in {METADATA_FILE}; re-export the model")


def model_format(model_dir: str | os.PathLike) -> str:
    """The ``format`` of an exported model directory (``FORMAT`` or ``HORIZON_FORMAT``)."""
    return _read_metadata(model_dir)[1].get("format")


def load_metadata(model_dir: str | os.PathLike) -> dict:
    """Read ``tsdb_model.json`` and check it against the graph files it describes (any
    export: depth/e2e/looped, or horizon)."""
    model_dir = Path(model_dir)
    path, meta = _read_metadata(model_dir)
    if meta.get("format") == HORIZON_FORMAT:
        from .horizon import load_horizon_metadata
        return load_horizon_metadata(model_dir)
    _check_version(path, meta, FORMAT, FORMAT_VERSION, ("strategy", "shapes", "sigmas", "step_blocks", "schedules", "sigma_data",
                                                        "normalization", "graphs", "sampler", "model_id"))
    if meta["strategy"] not in ("depth", "e2e", "looped", "looped-bptt"):
        raise StreamingError(f"{path}: strategy {meta['strategy']!r} is not supported by this runtime")
    sh = meta["shapes"]
    nb = sh["n_blocks"]
    if len(meta["graphs"]["denoise"]) != nb or len(sh["layers_per_block"]) != nb:
        raise StreamingError(f"{path}: {nb} blocks but inconsistent graphs / layers")
    for sched in [{"sigmas": meta["sigmas"], "blocks": meta["step_blocks"]}, *meta["schedules"].values()]:
        sig, blocks = sched["sigmas"], sched["blocks"]
        if sig[-1] != 0 or any(a <= b for a, b in zip(sig, sig[1:])):
            raise StreamingError(f"{path}: the sigma grid must be strictly descending and end in 0")
        if len(blocks) != len(sig) - 1 or any(not 0 <= i < nb for i in blocks):
            raise StreamingError(f"{path}: a schedule needs one block in [0, {nb}) per step")
    if sh["context_length"] != sh["window_tokens"] * sh["patch_length"] or sh["horizon"] % sh["patch_length"]:
        raise StreamingError(f"{path}: inconsistent shapes {sh}")
    _check_files(model_dir, meta)
    return meta


def _check_io(sess: ort.InferenceSession, names: Sequence[str], fixed: dict[str, Sequence], what: str) -> None:
    got = {i.name: i.shape for i in sess.get_inputs()}
    if list(got) != list(names):
        raise StreamingError(f"{what}: graph inputs {list(got)} differ from the metadata {list(names)}")
    for name, shape in fixed.items():
        actual = got[name]
        if len(actual) != len(shape) or any(s is not None and a != s for a, s in zip(actual, shape)):
            raise StreamingError(f"{what}: input {name} has shape {actual}, metadata implies {list(shape)}")


# ---------------------------------------------------------------------------------------
# Numerics shared with tsdb (numpy versions)
# ---------------------------------------------------------------------------------------

def instance_stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NaN-aware mean/std over the last axis, ``[batch, 1]`` (scale 1 for constant rows)."""
    observed = ~np.isnan(values)
    n = np.maximum(observed.sum(-1, keepdims=True), 1).astype(np.float32)
    filled = np.where(observed, values, np.float32(0))
    loc = filled.sum(-1, keepdims=True, dtype=np.float32) / n
    var = np.where(observed, (values - loc) ** 2, np.float32(0)).sum(-1, keepdims=True, dtype=np.float32) / n
    scale = np.sqrt(var)
    scale = np.where(scale > np.float32(1e-6) * (np.float32(1) + np.abs(loc)), scale, np.float32(1))
    return loc.astype(np.float32), scale.astype(np.float32)


def features(values: np.ndarray, loc: np.ndarray, scale: np.ndarray, p: int, cov: np.ndarray | None = None,
             cov_loc: np.ndarray | None = None, cov_scale: np.ndarray | None = None) -> np.ndarray:
    """Raw ``[batch, m*P]`` -> ``[batch, m, P, 2]`` (normalized value, observed mask), plus one
    channel per covariate when ``cov [batch, n, m*P]`` is given (normalized with ``cov_loc``/
    ``cov_scale [batch, n, 1]``, NaN -> 0)."""
    observed = ~np.isnan(values)
    normed = np.where(observed, (values - loc) / scale, np.float32(0)).astype(np.float32)
    f = np.stack([normed, observed.astype(np.float32)], axis=-1)
    if cov is not None:
        f = np.concatenate([f, normalize_covariates(cov, cov_loc, cov_scale)], axis=-1)
    return f.reshape(values.shape[0], values.shape[1] // p, p, f.shape[-1])


def normalize_covariates(cov: np.ndarray, loc: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Raw ``[batch, n, T]`` -> normalized ``[batch, T, n]`` (NaN -> 0)."""
    normed = np.where(np.isnan(cov), np.float32(0), (cov - loc) / scale).astype(np.float32)
    return normed.transpose(0, 2, 1)


def align(history: np.ndarray, p: int, min_tokens: int, max_tokens: int) -> np.ndarray:
    """Left-pad a 1-D history with NaN to whole patches (>= min_tokens); keep <= max_tokens."""
    t = history.shape[0]
    n = min(max(min_tokens, -(-t // p)), max_tokens)
    out = np.full(n * p, np.nan, dtype=np.float32)
    keep = min(t, n * p)
    if keep:
        out[n * p - keep:] = history[t - keep:]
    return out


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
                 "quantiles": {_level_key(q): self.quantiles[j, i].tolist()
                               for i, q in enumerate(self.quantile_levels)}}
                for j, item in enumerate(self.item_ids)]


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
    return noise


def _level_key(q: float) -> str:
    return format(q, "g")


# ---------------------------------------------------------------------------------------
# The forecaster
# ---------------------------------------------------------------------------------------

class StreamingForecaster:
    """Online forecasts for many series from an exported model directory.

    Parameters
    ----------
    model_dir: directory written by ``tsdb export`` (``tsdb_model.json`` + graphs).
    intra_op_num_threads: onnxruntime threads per call (1 is fastest for one stream).
    refresh: ``"warmup"`` (default) re-initialises a series from its recent raw values when
        its observation count reaches 2, 4, 8, ... < context_length and context_length, so
        the frozen normalization statistics of a young series follow the data;
        ``"none"`` keeps the statistics of the first update frozen.
    refresh_every: also re-initialise every N observations (``None``: never).
    """

    def __new__(cls, model_dir: str | os.PathLike, *args, **kwargs):
        # StreamingForecaster(model_dir) serves any export: a horizon one gets its own class
        if cls is StreamingForecaster and model_format(model_dir) == HORIZON_FORMAT:
            from .horizon import HorizonStreamingForecaster
            cls = HorizonStreamingForecaster
        return super().__new__(cls)

    def __init__(self, model_dir: str | os.PathLike, intra_op_num_threads: int = 1, refresh: str = "warmup",
                 refresh_every: int | None = None, providers: Sequence[str] | None = None):
        self.model_dir = Path(model_dir)
        self.meta = meta = load_metadata(self.model_dir)
        self._set_common(meta, refresh, refresh_every)
        self.sigmas = np.asarray(meta["sigmas"], dtype=np.float32)
        self.step_blocks = [int(i) for i in meta["step_blocks"]]
        self._open_graphs(intra_op_num_threads, providers)

    def _set_common(self, meta: dict, refresh: str, refresh_every: int | None) -> None:
        if refresh not in ("warmup", "none"):
            raise StreamingError(f"refresh must be 'warmup' or 'none', got {refresh!r}")
        self.refresh = refresh
        self.refresh_every = refresh_every
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

    def _open_graphs(self, intra_op_num_threads: int, providers: Sequence[str] | None) -> None:
        """Open and check the update and denoise graphs, then start with no series."""
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_num_threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        providers = list(providers or ["CPUExecutionProvider"])
        g = self.meta["graphs"]
        p, n_cov = self.patch_length, self.num_covariates
        self._update = ort.InferenceSession(str(self.model_dir / g["update"]["file"]), opts, providers=providers)
        cache_shape = lambda nl: [nl, None, self.heads, None, self.head_dim]  # noqa: E731
        fixed = {"features": [None, None, p, 2 + n_cov]}
        for i, nl in enumerate(self.layers):
            fixed[f"cache_k_{i}"] = fixed[f"cache_v_{i}"] = cache_shape(nl)
        _check_io(self._update, g["update"]["inputs"], fixed, "update graph")
        self._update_outputs = list(g["update"]["outputs"])
        self._denoise = []
        for i, entry in enumerate(g["denoise"]):
            sess = ort.InferenceSession(str(self.model_dir / entry["file"]), opts, providers=providers)
            _check_io(sess, entry["inputs"], {"cache_k": cache_shape(self.layers[i]),
                                              "z": [None, None, self.horizon]},
                      f"denoise graph {i}")
            self._denoise.append(sess)

        # per-series state, in slots along axis 1 (caches) / 0 (the rest)
        self._slot: dict[Any, int] = {}
        self._n = 0
        self._alloc(0)

    # -- storage ---------------------------------------------------------------------------
    def _alloc(self, capacity: int) -> None:
        p, w, r = self.patch_length, self.window, self.init_tokens
        self.k = [np.zeros((nl, capacity, self.heads, w, self.head_dim), np.float32) for nl in self.layers]
        self.v = [np.zeros_like(k) for k in self.k]
        self.tokens = np.zeros(capacity, np.int64)
        self.pending = np.full((capacity, p), np.nan, np.float32)
        self.pending_count = np.zeros(capacity, np.int64)
        self.loc = np.zeros((capacity, 1), np.float32)
        self.scale = np.ones((capacity, 1), np.float32)
        self.count = np.zeros(capacity, np.int64)
        self.recent = np.full((capacity, r * p), np.nan, np.float32)
        n = self.num_covariates
        if n:
            self.cov_pending = np.full((capacity, n, p), np.nan, np.float32)
            self.cov_loc = np.zeros((capacity, n, 1), np.float32)
            self.cov_scale = np.ones((capacity, n, 1), np.float32)
            self.cov_recent = np.full((capacity, n, r * p), np.nan, np.float32)

    _STATE_FIELDS = ("tokens", "pending", "pending_count", "loc", "scale", "count", "recent")
    _COV_FIELDS = ("cov_pending", "cov_loc", "cov_scale", "cov_recent")

    @property
    def _FIELDS(self) -> tuple:
        return self._STATE_FIELDS + (self._COV_FIELDS if self.num_covariates else ())

    def _grow(self, need: int) -> None:
        cap = self.tokens.shape[0]
        if need <= cap:
            return
        new_cap = max(need, 2 * cap, 8)
        old = {f: getattr(self, f) for f in self._FIELDS}
        old_k, old_v = self.k, self.v
        self._alloc(new_cap)
        for f, a in old.items():
            getattr(self, f)[:cap] = a
        for i in range(len(self.k)):
            self.k[i][:, :cap] = old_k[i]
            self.v[i][:, :cap] = old_v[i]

    @property
    def item_ids(self) -> list:
        return list(self._slot)

    def __contains__(self, item_id) -> bool:
        return item_id in self._slot

    def __len__(self) -> int:
        return len(self._slot)

    def observation_count(self, item_id) -> int:
        return int(self.count[self._slot[item_id]])

    def _slots(self, item_ids: Sequence) -> np.ndarray:
        try:
            return np.asarray([self._slot[i] for i in item_ids], dtype=np.int64)
        except KeyError as e:
            raise StreamingError(f"unknown series {e.args[0]!r}; update it with its history first") from None

    # -- graphs ----------------------------------------------------------------------------
    def _run_update(self, feats: np.ndarray, start: np.ndarray, ks: list, vs: list) -> tuple[list, list]:
        inputs = {"features": np.ascontiguousarray(feats, np.float32), "start": start.astype(np.int64)}
        for i in range(len(self.layers)):
            inputs[f"cache_k_{i}"] = ks[i]
            inputs[f"cache_v_{i}"] = vs[i]
        out = self._update.run(self._update_outputs, inputs)
        return out[0::2], out[1::2]

    def _empty_cache(self, b: int) -> tuple[list, list]:
        z = [np.zeros((nl, b, self.heads, 0, self.head_dim), np.float32) for nl in self.layers]
        return z, [a.copy() for a in z]

    # -- init / refresh ----------------------------------------------------------------------
    def _init_slots(self, slots: np.ndarray, histories: list[np.ndarray], covs: list[np.ndarray] | None = None) -> None:
        """(Re)initialise the given slots from their full (or recent) raw histories (and
        their covariates ``[n_cov, T]``)."""
        p, w, r = self.patch_length, self.window, self.init_tokens
        groups: dict[int, list[int]] = {}
        for j, h in enumerate(histories):
            groups.setdefault(min(max(w, -(-len(h) // p)), r), []).append(j)
        for n, js in groups.items():
            aligned = np.stack([align(histories[j], p, n, n) for j in js])
            stats = np.stack([align(histories[j], p, w, w) for j in js])
            loc, scale = instance_stats(stats)
            if covs is None:
                feats = features(aligned, loc, scale, p)
            else:
                cov_aligned = np.stack([[align(row, p, n, n) for row in covs[j]] for j in js])
                cov_loc, cov_scale = instance_stats(np.stack([[align(row, p, w, w) for row in covs[j]] for j in js]))
                feats = features(aligned, loc, scale, p, cov_aligned, cov_loc, cov_scale)
            ks, vs = self._run_update(feats, np.zeros(len(js), np.int64), *self._empty_cache(len(js)))
            s = slots[js]
            for i in range(len(self.layers)):
                self.k[i][:, s] = ks[i]
                self.v[i][:, s] = vs[i]
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

    def _recent_history(self, slot: int) -> np.ndarray:
        n = int(min(self.count[slot], self.recent.shape[1]))
        return self.recent[slot, self.recent.shape[1] - n:].copy()

    def _recent_covariates(self, slot: int) -> np.ndarray:
        n = int(min(self.count[slot], self.recent.shape[1]))
        return self.cov_recent[slot, :, self.recent.shape[1] - n:].copy()

    def _reinit(self, slots: np.ndarray) -> None:
        covs = [self._recent_covariates(int(s)) for s in slots] if self.num_covariates else None
        count = self.count[slots].copy()      # observations seen, not the recent values kept
        self._init_slots(slots, [self._recent_history(int(s)) for s in slots], covs)
        self.count[slots] = count

    def refresh_series(self, item_ids: Sequence) -> None:
        """Recompute statistics and rebuild the caches from each series' recent raw values
        (equal to initialising from its whole history)."""
        self._reinit(self._slots(item_ids))

    def _refresh_points(self, before: int, after: int) -> bool:
        if self.refresh == "warmup":
            c = self.context_length
            k = 2
            while k < c:
                if before < k <= after:
                    return True
                k *= 2
            if before < c <= after:
                return True
        if self.refresh_every:
            return after // self.refresh_every > before // self.refresh_every
        return False

    # -- public API ----------------------------------------------------------------------------
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

    def update(self, item_ids: Sequence, values: Iterable, covariates: Iterable | None = None) -> None:
        """Ingest new values per series: ``values[j]`` is a number or a 1-D array (NaN = missing).

        ``covariates[j]`` (models with covariates): the covariates of those values,
        ``[n_cov, len(values[j])]``. Unknown series are initialised from their values (their
        history). The cost per series does not depend on how much history it has seen.
        """
        item_ids = list(item_ids)
        values = list(values) if not isinstance(values, np.ndarray) else list(values)
        if len(values) != len(item_ids):
            raise StreamingError(f"{len(item_ids)} series but {len(values)} value arrays")
        if len(set(item_ids)) != len(item_ids):
            raise StreamingError("item_ids must be unique within one update")
        arrays = [np.atleast_1d(np.asarray(v, dtype=np.float32)).reshape(-1) for v in values]
        covs = self._covariate_arrays(covariates, arrays)
        cov_of = {i: (None if covs is None else c) for i, c in zip(item_ids, covs or [None] * len(arrays))}
        new_ids = [(i, a) for i, a in zip(item_ids, arrays) if i not in self._slot]
        if new_ids:
            self._grow(self._n + len(new_ids))
            slots = np.arange(self._n, self._n + len(new_ids))
            for (i, _), s in zip(new_ids, slots):
                self._slot[i] = int(s)
            self._n += len(new_ids)
            self._init_slots(slots, [a for _, a in new_ids], None if covs is None else [cov_of[i] for i, _ in new_ids])
        fresh = {i for i, _ in new_ids}
        old = [(self._slot[i], a, cov_of[i]) for i, a in zip(item_ids, arrays) if i not in fresh and len(a)]
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
            ks, vs = self._run_update(feats, self.tokens[s], [k[:, s] for k in self.k], [v[:, s] for v in self.v])
            for i in range(len(self.layers)):
                self.k[i][:, s] = ks[i]
                self.v[i][:, s] = vs[i]
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

    def _partial(self, s: np.ndarray) -> tuple[list, list, np.ndarray]:
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
            ks, vs = self._run_update(feats, self.tokens[sp], [k[:, sp] for k in self.k], [v[:, sp] for v in self.v])
            for i in range(len(self.layers)):
                kp[i][:, has] = ks[i][:, :, :, -1:]
                vp[i][:, has] = vs[i][:, :, :, -1:]
        return kp, vp, has

    def forecast(self, item_ids: Sequence, num_samples: int = 100, seed=None,
                 quantiles: Sequence[float] = DEFAULT_QUANTILES, noise: np.ndarray | None = None,
                 num_steps: int | None = None,
                 sampler: str | None = None, normalized: bool = False,
                 covariates: np.ndarray | None = None) -> Forecast:
        """Sample ``num_samples`` futures per series and their quantiles.

        ``covariates [b, n_cov, H]`` (models with covariates): the known-future covariates
        of the H steps after each series' last observed value.

        ``seed``: an int (one generator for the batch), a list with one seed (int or tuple of
        ints) per series (reproducible whatever the batch), or None. ``noise [b, S, H]``
        (standard normal) overrides it. ``num_steps`` picks another of the exported schedules
        (the sigma grid and the block of each step).
        """
        item_ids = list(item_ids)
        s = self._slots(item_ids)
        b, hz = len(s), self.horizon
        noise = forecast_noise(noise, seed, b, num_samples, hz)
        sig, step_blocks = self.sigmas, self.step_blocks
        if num_steps is not None:
            schedules = self.meta["schedules"]
            if str(num_steps) not in schedules:
                raise StreamingError(f"num_steps={num_steps} not in the exported schedules {sorted(schedules, key=int)}")
            sig = np.asarray(schedules[str(num_steps)]["sigmas"], dtype=np.float32)
            step_blocks = schedules[str(num_steps)]["blocks"]
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
        ks = [k[:, s] for k in self.k]
        vs = [v[:, s] for v in self.v]
        tokens = self.tokens[s]

        def denoise(i: int, z: np.ndarray, sigma: np.float32) -> np.ndarray:
            return self._denoise[i].run(["denoised"], {
                "cache_k": ks[i], "cache_v": vs[i], "partial_k": kp[i], "partial_v": vp[i], "has_partial": has,
                "tokens": tokens, "z": z, "sigma": np.full(b, sigma, np.float32), **extra})[0]

        x = noise * sig[0]
        for i in range(len(sig) - 1):
            sc, sn, blk = sig[i], sig[i + 1], step_blocks[i]
            d = (x - denoise(blk, x, sc)) / sc
            x_euler = x + (sn - sc) * d
            if sampler == "euler" or sn == 0:
                x = x_euler
            else:
                d_next = (x_euler - denoise(blk, x_euler, sn)) / sn
                x = x + (sn - sc) * (d + d_next) / np.float32(2)
        return self._summarize(item_ids, s, x, quantiles, normalized)

    def _summarize(self, item_ids: list, s: np.ndarray, x: np.ndarray, quantiles: Sequence[float],
                   normalized: bool) -> Forecast:
        """Normalized samples ``x [b, S, H]`` of slots ``s`` -> a raw-scale ``Forecast``."""
        y = x if normalized else x * self.scale[s][:, :, None] + self.loc[s][:, :, None]
        levels = tuple(float(q) for q in quantiles)
        qs = (np.quantile(y, levels, axis=1).transpose(1, 0, 2).astype(np.float32) if levels
              else np.zeros((len(s), 0, self.horizon), np.float32))
        return Forecast(item_ids, y, levels, qs)

    # -- persistence ---------------------------------------------------------------------------
    def save_state(self, path: str | os.PathLike, extra: dict | None = None) -> None:
        """Write every series' state (and an optional JSON-able ``extra``) atomically to ``path``."""
        path = Path(path)
        n = self._n
        arrays = {f: getattr(self, f)[:n] for f in self._FIELDS}
        for i in range(len(self.layers)):
            arrays[f"k_{i}"] = self.k[i][:, :n]
            arrays[f"v_{i}"] = self.v[i][:, :n]
        header = {"format": STATE_FORMAT, "version": STATE_VERSION, "model_id": self.meta["model_id"],
                  "item_ids": list(self._slot), "refresh": self.refresh, "extra": extra or {}}
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load_state(self, path: str | os.PathLike) -> dict:
        """Replace the current state by the one saved at ``path``; returns its ``extra``."""
        path = Path(path)
        if not path.exists():
            raise StreamingError(f"state file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
            header = json.loads(bytes(data.pop("header")).decode())
        except Exception as e:  # corrupt or foreign file
            raise StreamingError(f"{path} is not a tsdb-streaming state file ({e})") from None
        if header.get("format") != STATE_FORMAT or header.get("version") != STATE_VERSION:
            raise StreamingError(f"{path}: unsupported state format {header.get('format')!r} v{header.get('version')}")
        if header["model_id"] != self.meta["model_id"]:
            raise StreamingError(f"{path} was saved for model {header['model_id']}, this is {self.meta['model_id']}")
        ids = [tuple(i) if isinstance(i, list) else i for i in header["item_ids"]]
        n = len(ids)
        self._check_loaded(path, data)
        self._alloc(max(n, 8))
        for f in self._FIELDS:
            getattr(self, f)[:n] = data[f]
        for i in range(len(self.layers)):
            self.k[i][:, :n] = data[f"k_{i}"]
            self.v[i][:, :n] = data[f"v_{i}"]
        self._slot = {item: j for j, item in enumerate(ids)}
        self._n = n
        return header.get("extra", {})

    def _check_loaded(self, path: Path, data: dict) -> None:
        """Hook: refuse a saved state whose arrays cannot fill this forecaster's storage."""


def series_seed(seed: int, item_id, count: int) -> tuple[int, int, int]:
    """A per-series, per-observation seed: forecasts do not depend on batching or restarts."""
    return (int(seed), zlib.crc32(str(item_id).encode()), int(count))


__all__ = ["DEFAULT_QUANTILES", "FORMAT", "Forecast", "HORIZON_FORMAT", "StreamingError", "StreamingForecaster",
           "forecast_noise", "load_metadata", "model_format", "series_seed"]
