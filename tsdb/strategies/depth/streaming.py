"""Online streaming inference with explicit-tensor state (``depth``, ``e2e``, ``looped``).

Observations arrive one (or a few) at a time; each should update the model cheaply and
yield a fresh probabilistic forecast. The context path of every block is causal and
sigma-free, so the keys/values of complete context patches never change once computed:
the state caches them, per block and layer, over a bounded sliding window of
``W = context_length / patch_length`` tokens. An update embeds only the newly completed
patch(es) and attends to the cache (cost independent of history length); a forecast
recomputes one *partial* token from the values of the unfinished patch (training showed
the model contexts that end inside their last patch) and runs the sampler with the
future tokens attending to the window.

Semantics (what streaming is exactly equal to)
    Streaming equals :func:`recompute_forecast`: the whole history, left-padded with NaN
    so that its complete patches are aligned with the state's patch grid (the history
    given to :func:`init_state` padded to at least ``W`` tokens, then every later value:
    pass ``init_length``), encoded by ``BlockDenoiser.encode_context(..., window=W)``
    (sliding-window causal attention), the future attending to the last ``W`` context
    tokens, normalized with the same frozen statistics. With a history of at most
    ``context_length`` values this is exactly ``DiffusionForecaster.sample``.

Patch grid
    :func:`init_state` aligns patches so that the initial history ends on a patch
    boundary (missing values pad the front, as in training); afterwards every ``P``
    values complete a patch.

Normalization rule (``frozen-at-init``)
    ``loc``/``scale`` are the NaN-aware mean/std of the last ``context_length`` values of
    the history given to :func:`init_state` (as in training) and stay frozen, because the
    cached keys/values were computed with them. :func:`refresh` recomputes them from the
    last ``context_length`` values and re-encodes the cache from the raw values the state
    keeps (``recent``: the last ``R * P`` values, ``R = layers_per_block * W`` tokens,
    enough for the cache to be exact), so ``refresh(state) == init_state(full history)``;
    it also rebases token positions to 0. The torch-free runtime refreshes automatically
    while a series is young (see ``tsdb_streaming``).

Looped models cache their prelude layers' keys/values too (the core's context path
reads the prelude's output), and forecast with Euler steps (one core application each).
The ``horizon`` strategy (rolling noisy windows) streams through ``tsdb.strategies.horizon.streaming``.

Covariates (models with ``num_covariates > 0``)
    Every call that brings values brings the covariates of the same time steps
    (``init_state(history, covariates=[b, n, T])``, ``update(values, covariates=[b, n, m])``);
    they become extra context channels, normalized with their own statistics, frozen at
    init like the target's. ``forecast(..., covariates=[b, n, H])`` takes the known-future
    covariates of the H steps after the last observed value. The unfinished patch's empty
    slots are NaN for the covariates too, as in training.

Everything here is a free function of the model and a :class:`StreamingState`; the model
holds no state. The same per-block functions (:func:`encode_tokens`,
:func:`denoise_step`) are what :mod:`tsdb.export.onnx` exports to ONNX.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from tsdb.core import SigmaSchedule
from tsdb.errors import TsdbError
from tsdb.nn.denoiser import BlockDenoiser, ContextEncoding
from tsdb.nn.denoiser import CovariateFeatures
from tsdb.nn.forecaster import DiffusionForecaster, context_features, instance_stats, normalize_covariates
from tsdb.nn.cache import BatchedState, align_history, by_group, encode_tokens, init_tokens, pick, window_tokens
from tsdb.nn.layers import KV
from tsdb.core.samplers import SAMPLERS

NORMALIZATION_RULE = "frozen-at-init"
# the same rule with the location at the mean of the last ``location_window`` values (its own
# name, so a runtime that predates it refuses the export instead of centring it wrongly)
RECENT_LOCATION_RULE = "frozen-at-init-recent-location"


# ---------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StreamingState(BatchedState):
    """Streaming state of a batch of series; tensors only.

    k, v: per block ``[layers, batch, heads, W, head_dim]`` keys/values (RoPE applied) of
        the last ``W`` complete context tokens, oldest first.
    tokens: ``[batch]`` int64, complete tokens so far = absolute position of the next token.
    pending: ``[batch, P]`` raw values of the unfinished patch (NaN past ``pending_count``).
    pending_count: ``[batch]`` int64 in ``[0, P)``.
    loc, scale: ``[batch, 1]`` frozen normalization statistics.
    count: ``[batch]`` int64, values ingested (history at init plus updates).
    recent: ``[batch, R * P]`` the last raw values (NaN-left-padded), for :func:`refresh`.
    cov_pending, cov_recent: ``[batch, n_cov, P]`` / ``[batch, n_cov, R * P]`` the raw
        covariates of ``pending`` / ``recent`` (``None`` for a model without covariates).
    cov_loc, cov_scale: ``[batch, n_cov, 1]`` frozen covariate statistics (or ``None``).
    """

    k: tuple[Tensor, ...]
    v: tuple[Tensor, ...]
    tokens: Tensor
    pending: Tensor
    pending_count: Tensor
    loc: Tensor
    scale: Tensor
    count: Tensor
    recent: Tensor
    cov_pending: Tensor | None = None
    cov_loc: Tensor | None = None
    cov_scale: Tensor | None = None
    cov_recent: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

def _check_model(model: DiffusionForecaster) -> None:
    if not isinstance(model, DiffusionForecaster):
        raise TsdbError(f"this streaming state machine needs a DiffusionForecaster; got {type(model).__name__}")
    if model.seasonal_prior:
        raise TsdbError(f"a model with model.seasonal_prior = {model.seasonal_prior} cannot be streamed yet (the "
                        "state keeps no seasonal-naive anchor); forecast it with DiffusionForecaster.sample")


# ---------------------------------------------------------------------------------------
# Per-block building blocks (exported to ONNX by tsdb.export.onnx)
# ---------------------------------------------------------------------------------------

def state_encoding(k_cache: Tensor, v_cache: Tensor, k_partial: Tensor, v_partial: Tensor,
                   has_partial: Tensor, tokens: Tensor, window: int) -> ContextEncoding:
    """The context a forecast from a streaming state sees: the cache ``[layers, batch, heads,
    c, head_dim]`` then the partial token (``[layers, batch, heads, 1, head_dim]``, from the
    unfinished patch, where ``has_partial [batch]``), of which the last ``window`` are
    visible (``window - 1`` cache tokens and the partial one, or ``window`` cache tokens)."""
    c = k_cache.shape[3]
    kv = [KV(torch.cat([k, kp], dim=2), torch.cat([v, vp], dim=2))
          for k, v, kp, vp in zip(k_cache, v_cache, k_partial, v_partial)]
    idx = torch.arange(c + 1, device=has_partial.device)[None, :]
    has = has_partial[:, None]
    mask = (has & (idx >= c + 1 - window)) | (~has & (idx < c) & (idx >= c - window))  # (ORT has no bool Where)
    return ContextEncoding(kv, tokens + has_partial.to(tokens.dtype), mask)


def denoise_step(block: BlockDenoiser, precond, k_cache: Tensor, v_cache: Tensor,
                 k_partial: Tensor, v_partial: Tensor, has_partial: Tensor, tokens: Tensor,
                 z: Tensor, sigma: Tensor, future_covariates: Tensor | None = None) -> Tensor:
    """One preconditioned denoiser call ``D(z, sigma | state)`` of one block.

    k_cache, v_cache: ``[layers, batch, heads, c, head_dim]`` (all context layers, see
    ``BlockDenoiser.context_layers``); k_partial, v_partial: ``[layers, batch, heads, 1,
    head_dim]`` (ignored where ``has_partial`` is False); tokens: ``[batch]`` complete tokens;
    z: ``[batch, S, H]`` noisy future; sigma: ``[batch]`` (one noise level for all samples
    of a series, as the samplers use); future_covariates: ``[batch, H, n_cov]`` normalized
    known-future covariates (models with covariates only).
    Returns the denoised future ``[batch, S, H]`` (normalized scale): the block's own
    future path, its S samples sharing the state's cache.
    """
    ctx = state_encoding(k_cache, v_cache, k_partial, v_partial, has_partial, tokens, block.shape.context_tokens)
    if future_covariates is not None:
        ctx.future = block.embed_future_covariates(future_covariates)
    return precond.denoise(block.denoise_future, ctx, z, sigma)


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------

def _features(values: Tensor, loc: Tensor, scale: Tensor, p: int, cov: Tensor | None = None,
              cov_loc: Tensor | None = None, cov_scale: Tensor | None = None) -> Tensor:
    """Raw values ``[batch, m*P]`` (and covariates ``[batch, n_cov, m*P]``) -> features
    ``[batch, m, P, 2 + n_cov]``."""
    f = context_features(values, loc, scale)
    if cov is not None:
        f = torch.cat([f, normalize_covariates(cov, cov_loc, cov_scale)], dim=-1)
    return f.reshape(values.shape[0], values.shape[1] // p, p, f.shape[-1])


def _align_cov(cov: Tensor, p: int, min_tokens: int, max_tokens: int) -> Tensor:
    """``align_history`` for covariates ``[batch, n_cov, T]`` (each row as its series' values)."""
    b, n, t = cov.shape
    return align_history(cov.reshape(b * n, t), p, min_tokens, max_tokens).reshape(b, n, -1)


def _check_covariates(model: DiffusionForecaster, covariates, values: Tensor, what: str,
                      finite: bool = True) -> Tensor | None:
    """``covariates`` as float32 ``[batch, n_cov, T]`` matching ``values [batch, T]``, or a
    one-line error; ``None`` for a model without covariates."""
    n = model.num_covariates
    if covariates is None:
        if n:
            raise TsdbError(f"{what}: this model takes {n} covariate(s); pass covariates [batch, {n}, T] "
                            "aligned with the values")
        return None
    covariates = torch.as_tensor(covariates, dtype=torch.float32)
    expected = [values.shape[0], n, values.shape[1]]
    if not n or list(covariates.shape) != expected:
        raise TsdbError(f"{what}: covariates must be [batch, num_covariates, T] = {expected} "
                        f"(model.num_covariates = {n}), got {list(covariates.shape)}")
    if torch.isinf(covariates).any() or (finite and torch.isnan(covariates).any()):
        raise TsdbError(f"{what}: covariates must be finite (they are known at every observed step)")
    return covariates


@torch.no_grad()
def init_state(model: DiffusionForecaster, history: Tensor, lengths: Tensor | None = None,
               covariates: Tensor | None = None) -> StreamingState:
    """State after observing ``history [batch, T]`` (raw scale, NaN = missing).

    ``lengths [batch]`` (optional) says how many trailing values of each row are real
    history (the rest is left padding); rows of different lengths are encoded separately
    so each gets exactly the state its own history gives. The history ends on a patch
    boundary (the patch grid is anchored at its end); the normalization statistics are
    computed from its last ``context_length`` values and frozen. ``covariates``
    ``[batch, n_cov, T]``: the covariates of the history's time steps (models with
    covariates).
    """
    _check_model(model)
    history = torch.as_tensor(history, dtype=torch.float32)
    if history.dim() != 2:
        raise TsdbError(f"history must be [batch, T], got shape {tuple(history.shape)}")
    # with ``lengths`` the rows' left padding may be NaN
    covariates = _check_covariates(model, covariates, history, "init_state", finite=lengths is None)
    t = history.shape[1]
    if lengths is None:
        lengths = torch.full((history.shape[0],), t, dtype=torch.long)
    lengths = torch.as_tensor(lengths, dtype=torch.long).clamp(0, t)
    return by_group(lengths.tolist(), lambda idx: _init_equal(
        model, history[idx, t - int(lengths[idx[0]]):],
        None if covariates is None else covariates[idx, :, t - int(lengths[idx[0]]):]))


def _init_equal(model: DiffusionForecaster, history: Tensor, cov: Tensor | None = None) -> StreamingState:
    b, t = history.shape
    p = model.blocks[0].shape.patch_length
    w, r = window_tokens(model), init_tokens(model)
    loc, scale = instance_stats(align_history(history, p, w, w), model.location_window)  # as in training
    values = align_history(history, p, w, r)
    n = values.shape[1] // p
    cov_state = {}
    if cov is None:
        feats = _features(values, loc, scale, p)
    else:
        cov_loc, cov_scale = instance_stats(_align_cov(cov, p, w, w))
        feats = _features(values, loc, scale, p, _align_cov(cov, p, w, r), cov_loc, cov_scale)
        cov_state = dict(cov_pending=cov.new_full((b, cov.shape[1], p), float("nan")), cov_loc=cov_loc,
                         cov_scale=cov_scale, cov_recent=_align_cov(cov, 1, r * p, r * p))
    start = torch.zeros(b, dtype=torch.long)
    ks, vs = zip(*(encode_tokens(block, feats, start) for block in model.blocks))
    recent = history.new_full((b, r * p), float("nan"))
    keep = min(t, r * p)
    if keep:
        recent[:, r * p - keep:] = history[:, t - keep:]
    return StreamingState(tuple(ks), tuple(vs), torch.full((b,), n, dtype=torch.long),
                          history.new_full((b, p), float("nan")), torch.zeros(b, dtype=torch.long),
                          loc, scale, torch.full((b,), t, dtype=torch.long), recent, **cov_state)


@torch.no_grad()
def update(model: DiffusionForecaster, state: StreamingState, new_values: Tensor,
           covariates: Tensor | None = None) -> StreamingState:
    """Ingest ``new_values [batch, n]`` (raw, NaN = missing); returns a new state.

    ``covariates [batch, n_cov, n]``: the covariates of the same time steps (models with
    covariates). Cost is O(n) and independent of the history length: only newly completed
    patches go through the layers, attending to the cached window. The input state is not
    modified.
    """
    _check_model(model)
    new_values = torch.as_tensor(new_values, dtype=torch.float32)
    if new_values.dim() == 1:
        new_values = new_values[:, None]
    if new_values.shape[0] != state.batch_size:
        raise TsdbError(f"update got {new_values.shape[0]} series for a state of {state.batch_size}")
    covariates = _check_covariates(model, covariates, new_values, "update")
    if new_values.shape[1] == 0:
        return state
    return by_group(state.pending_count.tolist(), lambda idx: _update_equal_phase(
        model, state.select(idx), new_values[idx], pick(covariates, idx)))


def _update_equal_phase(model: DiffusionForecaster, state: StreamingState, new_values: Tensor,
                        cov: Tensor | None = None) -> StreamingState:
    p = state.pending.shape[1]
    pc = int(state.pending_count[0])
    n = new_values.shape[1]
    raw = torch.cat([state.pending[:, :pc], new_values], dim=1)
    craw = None if cov is None else torch.cat([state.cov_pending[:, :, :pc], cov], dim=2)
    m = raw.shape[1] // p
    k, v, tokens = state.k, state.v, state.tokens
    if m:
        if cov is None:
            feats = _features(raw[:, : m * p], state.loc, state.scale, p)
        else:
            feats = _features(raw[:, : m * p], state.loc, state.scale, p, craw[:, :, : m * p], state.cov_loc,
                              state.cov_scale)
        k, v = zip(*(encode_tokens(block, feats, tokens, kc, vc)
                     for block, kc, vc in zip(model.blocks, state.k, state.v)))
        tokens = tokens + m
    rest = raw[:, m * p:]
    pending = state.pending.new_full(state.pending.shape, float("nan"))
    pending[:, : rest.shape[1]] = rest
    recent = torch.cat([state.recent, new_values], dim=1)[:, -state.recent.shape[1]:]
    cov_state = {}
    if cov is not None:
        cov_pending = state.cov_pending.new_full(state.cov_pending.shape, float("nan"))
        cov_pending[:, :, : rest.shape[1]] = craw[:, :, m * p:]
        cov_recent = torch.cat([state.cov_recent, cov], dim=2)[:, :, -state.cov_recent.shape[2]:]
        cov_state = dict(cov_pending=cov_pending, cov_loc=state.cov_loc, cov_scale=state.cov_scale,
                         cov_recent=cov_recent)
    return StreamingState(tuple(k), tuple(v), tokens, pending,
                          torch.full_like(state.pending_count, rest.shape[1]), state.loc, state.scale,
                          state.count + n, recent, **cov_state)


@torch.no_grad()
def refresh(model: DiffusionForecaster, state: StreamingState, history: Tensor | None = None,
            covariates: Tensor | None = None) -> StreamingState:
    """Recompute the normalization statistics and rebuild the cache.

    With ``history`` (and its ``covariates``) this is ``init_state(model, history)``.
    Without, the state's own ``recent`` values (and covariates) are used, which gives
    exactly the state ``init_state`` would build from the full history observed so far
    (positions are rebased to 0).
    """
    if history is not None:
        return init_state(model, history, covariates=covariates)
    lengths = state.count.clamp(max=state.recent.shape[1])
    fresh = init_state(model, state.recent, lengths, covariates=state.cov_recent)
    return dataclasses.replace(fresh, count=state.count.clone())


@torch.no_grad()
def partial_kv(model: DiffusionForecaster, state: StreamingState) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Per block the keys/values ``[layers, batch, heads, 1, head_dim]`` of the partial token
    (from the unfinished patch) and ``has_partial [batch]``."""
    p = state.pending.shape[1]
    feats = _features(state.pending, state.loc, state.scale, p, state.cov_pending, state.cov_loc, state.cov_scale)
    kp, vp = [], []
    for block, kc, vc in zip(model.blocks, state.k, state.v):
        k, v = encode_tokens(block, feats, state.tokens, kc, vc)
        kp.append(k[:, :, :, -1:])
        vp.append(v[:, :, :, -1:])
    return kp, vp, state.pending_count > 0


def future_covariates(model: DiffusionForecaster, state: StreamingState, covariates) -> Tensor | None:
    """Raw future covariates ``[batch, n_cov, H]`` -> normalized ``[batch, H, n_cov]`` with the
    state's frozen covariate statistics (``None`` for a model without covariates)."""
    ref = state.pending.new_zeros(state.batch_size, model.horizon)
    covariates = _check_covariates(model, covariates, ref, "forecast")
    return None if covariates is None else normalize_covariates(covariates, state.cov_loc, state.cov_scale)


@torch.no_grad()
def forecast(model: DiffusionForecaster, state: StreamingState, noise: Tensor, schedule: SigmaSchedule,
             sampler: str = "heun", normalized: bool = False, covariates: Tensor | None = None) -> Tensor:
    """Samples ``[batch, S, H]`` (raw scale, or normalized if ``normalized``) from the state.

    ``noise`` is standard normal ``[batch, S, H]``; ``schedule`` the sigma grid and the block of
    each step (``strategy.schedule(K)``). Same noise and state give the same samples.
    ``covariates [batch, n_cov, H]`` (models with covariates): the known-future covariates of
    the H steps after the last observed value.
    """
    _check_model(model)
    future = future_covariates(model, state, covariates)
    kp, vp, has_p = partial_kv(model, state)
    encodings = []
    for block, k, v, k_p, v_p in zip(model.blocks, state.k, state.v, kp, vp):
        ctx = state_encoding(k, v, k_p, v_p, has_p, state.tokens, block.shape.context_tokens)
        ctx.future = None if future is None else block.embed_future_covariates(future)
        encodings.append(ctx)
    y = SAMPLERS[sampler](model.denoisers(encodings), noise * schedule.sigmas[0], schedule.sigmas, schedule.blocks)
    if normalized:
        return y
    return y * state.scale[:, :, None] + state.loc[:, :, None]


# ---------------------------------------------------------------------------------------
# Reference: recompute from the full history (the parity invariant and benchmark baseline)
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def recompute_forecast(model: DiffusionForecaster, history: Tensor, noise: Tensor, schedule: SigmaSchedule,
                       sampler: str = "heun", pending: int = 0, loc: Tensor | None = None,
                       scale: Tensor | None = None, next_token: int | None = None,
                       normalized: bool = False, covariates: Tensor | None = None,
                       cov_loc: Tensor | None = None, cov_scale: Tensor | None = None,
                       init_length: int | None = None) -> Tensor:
    """Forecast by encoding the whole ``history [batch, T]`` with the library's own code path.

    The last ``pending`` values form the partial patch; the rest is left-padded with NaN to
    whole patches (at least ``W``). ``init_length``: the length of the history a streaming
    state was initialised with; the stream's context is that history padded to at least
    ``W`` tokens, then every later value, so pass it to reproduce a stream that started
    shorter than ``context_length`` (its leading padding outlives the sliding window
    through the deeper layers). ``loc``/``scale`` default to the statistics of the last
    ``context_length`` complete-patch values. ``next_token`` sets the absolute position of
    the token after the last complete one (default: its index), so positions can be made
    identical to a streaming state's (RoPE is relative; this only removes float rounding).
    ``covariates [batch, n_cov, T + H]`` (models with covariates): over the history and the
    horizon after it; ``cov_loc``/``cov_scale`` default like ``loc``/``scale``.
    """
    history = torch.as_tensor(history, dtype=torch.float32)
    p = model.blocks[0].shape.patch_length
    w = window_tokens(model)
    t = history.shape[1]
    full = history[:, : t - pending]
    if init_length is not None and init_length < t - pending:   # padded as the stream's init was
        values = torch.cat([align_history(full[:, :init_length], p, w, 1 << 40), full[:, init_length:]], dim=1)
    else:
        values = align_history(full, p, w, 1 << 40)
    n = values.shape[1] // p
    if loc is None or scale is None:
        loc, scale = instance_stats(values[:, -w * p:], model.location_window)
    if pending:
        tail = history.new_full((history.shape[0], p), float("nan"))
        tail[:, :pending] = history[:, -pending:]
        values = torch.cat([values, tail], dim=1)
    feats = context_features(values, loc, scale)
    if covariates is not None or model.num_covariates:
        ref = history.new_zeros(history.shape[0], t + model.horizon)
        covariates = _check_covariates(model, covariates, ref, "recompute_forecast")
        past = covariates[:, :, : t - pending]
        if init_length is not None and init_length < t - pending:
            cov = torch.cat([_align_cov(past[:, :, :init_length], p, w, 1 << 40), past[:, :, init_length:]], dim=2)
        else:
            cov = _align_cov(past, p, w, 1 << 40)
        if cov_loc is None or cov_scale is None:
            cov_loc, cov_scale = instance_stats(cov[:, :, -w * p:])
        if pending:
            cov_tail = cov.new_full((cov.shape[0], cov.shape[1], p), float("nan"))
            cov_tail[:, :, :pending] = covariates[:, :, t - pending:t]
            cov = torch.cat([cov, cov_tail], dim=2)
        feats = CovariateFeatures(torch.cat([feats, normalize_covariates(cov, cov_loc, cov_scale)], dim=-1),
                                  normalize_covariates(covariates[:, :, t:], cov_loc, cov_scale))
    offset = 0 if next_token is None else next_token - n
    encodings = [block.encode_context(feats, offset, window=w).last(w) for block in model.blocks]
    y = SAMPLERS[sampler](model.denoisers(encodings), noise * schedule.sigmas[0], schedule.sigmas, schedule.blocks)
    if normalized:
        return y
    return y * scale[:, :, None] + loc[:, :, None]


__all__ = ["NORMALIZATION_RULE", "RECENT_LOCATION_RULE", "StreamingState", "denoise_step", "encode_tokens",
           "forecast", "future_covariates", "init_state", "init_tokens", "partial_kv", "recompute_forecast",
           "refresh", "update", "window_tokens", "state_encoding"]
