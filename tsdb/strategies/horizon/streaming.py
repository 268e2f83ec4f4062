"""Online streaming for the ``horizon`` strategy: the rolling state machine over explicit tensors.

The horizon sampler (:mod:`tsdb.strategies.horizon.model`) is already a state machine: a noisy window
of the next H values at staircase phase 0 plus the context right before it; one *roll*
per ``c = H / B`` new values moves every chunk one band down, emits chunk 0 and appends
a fresh ``sigma_max`` chunk. Streaming keeps that state between observations:

    state = context K/V cache (per block) + frozen loc/scale + S noisy windows per series
            + the values observed since the last roll (``pending``, ``pending_count`` < c)

- :func:`update`: values are buffered; every time ``c`` of them complete a chunk, one
  teacher-forced *observed roll* (``HorizonForecaster.observe``): the window rolls with
  the context up to the chunk boundary, the emitted chunk is dropped and the observed
  chunk enters the context cache (``tsdb.strategies.depth.streaming.encode_tokens``: only its ``c / P``
  new tokens go through the layers). Cost per roll is independent of the history.
- :func:`forecast`: free rolls from a copy of the window, each emitted chunk entering a
  per-trajectory copy of the cache (autoregressive); the state is not modified.
- :func:`init_state`: the cold start of ``HorizonForecaster.sample``: window over the last H
  values of the history as truth + staircase noise, then B observed rolls replaying them.

Number of samples
    The state holds S noisy windows per series (``window [batch, S, H]``): ``num_samples``
    is fixed at :func:`init_state` and every forecast returns exactly S samples, one per
    window (trajectory ``s`` of every forecast continues window ``s``). To change S,
    re-initialise.

Noise
    All randomness is an input (standard normal; or drawn from ``generator`` when omitted):
    ``init_state`` takes ``[batch, S, 2H]`` (the window's staircase noise, then the chunk
    appended by each of the B replay rolls: the first ``2H`` of ``HorizonForecaster.sample``'s
    ``3H``); ``update`` ``[batch, S, R * c]`` (the appended chunk of each observed roll the
    update performs, in order; ``R = rolls_due(...)``; extra columns are ignored);
    ``forecast`` ``[batch, S, H + c]`` (the appended chunk of each free roll; ``[batch, S, H]``
    is accepted when no series has pending values).

What ``forecast`` returns between chunk boundaries
    Always the H steps right after the last observation, ``[batch, S, H]``, like the other
    strategies' streaming forecasts. Let ``T`` be the last chunk boundary and ``r`` =
    ``pending_count`` the values observed since (``0 <= r < c``). The window covers
    ``[T, T + H)``; with ``r > 0`` the forecast runs ``B + 1`` free rolls (covering
    ``[T, T + H + c)``) and returns ``[T + r, T + r + H)``. Every observed value enters the
    context as itself and a sampled value only where no observation exists: the r pending
    values replace the first r values of the first emitted chunk before it becomes context
    (as ``observe`` replaces a whole chunk). Honest limitation: the first ``c - r`` returned
    steps (the rest of the current chunk) come from the roll that started at ``T`` and are
    conditioned on the observations up to ``T`` only (a window position cannot be clamped
    to an observation mid-roll without leaving the training configuration); later chunks
    see the pending values through the context. Returned samples never contain observed
    values. At ``r = 0`` this is plain ``B`` rolls, as ``HorizonForecaster.sample``.

Context semantics (what streaming is exactly equal to)
    As for ``depth`` (:mod:`tsdb.strategies.depth.streaming`): the context of every roll is the whole stream
    so far (the history given at init, NaN-left-padded to whole patches and at least
    ``W = context_length / P`` tokens, then every observed or emitted chunk), encoded with
    sliding-window causal attention of ``W`` tokens (``encode_context(..., window=W)``),
    the future attending to its last ``W`` tokens. Streaming equals :func:`recompute_forecast`,
    the replay from init of ``HorizonForecaster.observe`` / ``roll`` over the full history
    with that encoding. ``HorizonForecaster.sample`` instead re-encodes a fresh buffer of the
    last ``C`` values at every roll. For an init history of at most ``C`` values and no
    updates, ``init_state`` + ``forecast`` equals ``strategy.forecast`` on that context exactly
    when blocks have one layer each (``n_layers == n_blocks``: a token's keys/values then
    depend on nothing but the token); with deeper blocks they agree at the first roll only
    (about 1e-2 apart on the normalized scale with random weights): from the second roll
    on, a sliding window's deeper layers see further back than a fresh ``C`` buffer (the
    same trade as ``depth`` streaming beyond ``context_length`` values; it is what keeps an
    update O(1) instead of re-encoding ``C`` values per roll and per trajectory).

Normalization rule (``frozen-at-init``)
    ``loc``/``scale`` are the NaN-aware mean/std of the last ``context_length`` values of
    the history given to :func:`init_state` (those of ``HorizonForecaster.sample`` on that
    context) and stay frozen: the cache and the windows live on that scale. To renormalize,
    call :func:`init_state` again on the recent history.

Patch and chunk grid
    Anchored at the end of the init history: the window starts ``H`` before it, so chunk
    boundaries are at ``T0 + k c`` (``T0`` = init history length) and the context before the
    window always ends on a patch boundary (``c`` is a multiple of ``P``).

Batches may mix series at different ``pending_count`` / positions (e.g. after
:meth:`HorizonStreamingState.cat`); they are processed in groups. Every function is pure:
the input state is never modified, and the model holds no state.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from tsdb.errors import TsdbError
from tsdb.nn.denoiser import ContextEncoding
from tsdb.nn.forecaster import context_features, instance_stats
from tsdb.strategies.horizon.model import HorizonForecaster
from tsdb.nn.layers import KV
from tsdb.nn.cache import BatchedState, align_history, by_group, encode_tokens, init_tokens, window_tokens

NORMALIZATION_RULE = "frozen-at-init"


@dataclass(frozen=True)
class HorizonStreamingState(BatchedState):
    """Streaming state of a batch of series for a ``HorizonForecaster``; tensors only.

    k, v: per block ``[layers, batch, heads, W, head_dim]`` keys/values (RoPE applied) of the
        last ``W`` context tokens before the window (context up to the last chunk boundary).
    tokens: ``[batch]`` int64, context tokens so far = absolute position of the window's
        first token.
    loc, scale: ``[batch, 1]`` frozen normalization statistics.
    window: ``[batch, S, H]`` the S noisy sample windows (normalized, staircase phase 0)
        over the H steps after the last chunk boundary.
    pending: ``[batch, c]`` raw values observed since the last chunk boundary (NaN past
        ``pending_count``); they enter the context when the chunk completes.
    pending_count: ``[batch]`` int64 in ``[0, c)``; ``pending_count / c`` is the phase of the
        stream inside the current chunk.
    count: ``[batch]`` int64, values ingested (init history plus updates).
    """

    k: tuple[Tensor, ...]
    v: tuple[Tensor, ...]
    tokens: Tensor
    loc: Tensor
    scale: Tensor
    window: Tensor
    pending: Tensor
    pending_count: Tensor
    count: Tensor

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.window.shape[1])

    @property
    def phase(self) -> Tensor:
        """``[batch]`` position inside the current chunk, ``pending_count / c`` in ``[0, 1)``."""
        return self.pending_count.double() / self.pending.shape[1]


def _check_model(model) -> None:
    if not isinstance(model, HorizonForecaster):
        raise TsdbError(f"horizon streaming needs a HorizonForecaster (the horizon strategy); "
                        f"got {type(model).__name__}")
    if getattr(model, "num_covariates", 0):
        raise TsdbError("horizon streaming does not support covariates yet")


def sampler_kwargs(strategy, num_steps: int | None = None) -> dict:
    """``substeps``/``sampler`` of a horizon strategy's forecasts (``strategy.forecast``), to
    pass to :func:`init_state`, :func:`update` and :func:`forecast` (all three must agree)."""
    return {"substeps": strategy.substeps(num_steps), "sampler": strategy.cfg.sampler}


def rolls_due(model: HorizonForecaster, state: HorizonStreamingState, n: int) -> Tensor:
    """``[batch]`` observed rolls an update with ``n`` new values performs per series."""
    return (state.pending_count + n) // model.chunk_length


# ---------------------------------------------------------------------------------------
# Internals: the cache as ContextEncodings, chunk ingestion, grouping
# ---------------------------------------------------------------------------------------

def _encodings(k: tuple[Tensor, ...], v: tuple[Tensor, ...], tokens: Tensor) -> list[ContextEncoding]:
    """The cache as the library's per-block ``ContextEncoding``s."""
    return [ContextEncoding([KV(kb[i], vb[i]) for i in range(kb.shape[0])], tokens) for kb, vb in zip(k, v)]


def _ingest(model: HorizonForecaster, k, v, tokens: Tensor, values: Tensor, loc: Tensor, scale: Tensor):
    """Append whole patches of raw ``values [N, m P]`` to the caches (``tsdb.strategies.depth.streaming.encode_tokens``)."""
    p = model.blocks[0].shape.patch_length
    f = context_features(values, loc, scale)
    feats = f.reshape(values.shape[0], values.shape[1] // p, p, f.shape[-1])
    k, v = zip(*(encode_tokens(block, feats, tokens, kc, vc) for block, kc, vc in zip(model.blocks, k, v)))
    return tuple(k), tuple(v), tokens + values.shape[1] // p


def _grouped(state: HorizonStreamingState, fn, *per_series: Tensor | None) -> HorizonStreamingState | Tensor:
    """Apply ``fn(state, *per_series)`` to groups of series at the same pending count and
    position (a roll moves them together), then restore the batch order."""
    keys = list(zip(state.pending_count.tolist(), state.tokens.tolist()))
    return by_group(keys, lambda idx: fn(state.select(idx), *(None if t is None else t[idx] for t in per_series)))


def _noise(noise: Tensor | None, shape: tuple[int, ...], generator, what: str) -> Tensor:
    if noise is None:
        return torch.randn(*shape, generator=generator)
    noise = torch.as_tensor(noise, dtype=torch.float32)
    if noise.shape[:2] != shape[:2] or noise.dim() != 3 or noise.shape[2] < shape[2]:
        raise TsdbError(f"{what} noise must be [batch, samples, >= {shape[2]}] = {list(shape)}, "
                        f"got {list(noise.shape)}")
    return noise


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def init_state(model: HorizonForecaster, history: Tensor, num_samples: int, noise: Tensor | None = None, *,
               generator: torch.Generator | None = None, substeps: int = 2,
               sampler: str = "heun") -> HorizonStreamingState:
    """State after observing ``history [batch, T]`` (raw, NaN = missing), with ``num_samples``
    noisy windows per series (fixed for the life of the state).

    The cold start of ``HorizonForecaster.sample``: the window is placed over the last H
    values (normalized truth + staircase noise ``noise[..., :H]``; missing values start at
    the mean) and B observed rolls replay them (``noise[..., H:2H]``). ``noise`` is
    ``[batch, num_samples, 2H]`` standard normal (drawn from ``generator`` if omitted).
    A history shorter than H is NaN-left-padded.
    """
    _check_model(model)
    history = torch.as_tensor(history, dtype=torch.float32)
    if history.dim() != 2:
        raise TsdbError(f"history must be [batch, T], got shape {tuple(history.shape)}")
    b, t = history.shape
    h, s = model.horizon, int(num_samples)
    if s < 1:
        raise TsdbError(f"num_samples must be >= 1, got {num_samples}")
    noise = _noise(noise, (b, s, 2 * h), generator, "init_state")
    if t < h:
        history = torch.cat([history.new_full((b, h - t), float("nan")), history], dim=1)
    p = model.blocks[0].shape.patch_length
    w = window_tokens(model)
    loc, scale = instance_stats(history[:, -model.context_length:])
    values = align_history(history[:, :-h], p, w, init_tokens(model))  # the context before the window
    start = torch.zeros(b, dtype=torch.long)
    k, v, tokens = _ingest(model, [None] * len(model.blocks), [None] * len(model.blocks), start,
                           values, loc, scale)
    truth = history[:, -h:]
    y = torch.nan_to_num((truth - loc) / scale, nan=0.0).repeat_interleave(s, 0)
    window = model.staircase_window(y, noise[..., :h].reshape(b * s, h)).view(b, s, h)
    c = model.chunk_length
    state = HorizonStreamingState(k, v, tokens, loc, scale, window, history.new_full((b, c), float("nan")),
                                  torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.long))
    state = _update_group(model, state, truth, noise[..., h:2 * h], substeps, sampler)
    return replace(state, count=torch.full((b,), t, dtype=torch.long))


@torch.no_grad()
def update(model: HorizonForecaster, state: HorizonStreamingState, new_values: Tensor,
           fresh_noise: Tensor | None = None, *, generator: torch.Generator | None = None,
           substeps: int = 2, sampler: str = "heun") -> HorizonStreamingState:
    """Ingest ``new_values [batch, n]`` (raw, NaN = missing); returns a new state.

    Every ``c = H / B`` values complete a chunk and trigger one observed roll (the window
    rolls with the context up to the chunk boundary, then the observed chunk enters the
    cache); other values are only buffered. ``fresh_noise [batch, S, >= R c]`` is the
    appended chunk of each roll, in order (``R = rolls_due(model, state, n).max()``; series
    with fewer rolls use the first ones); drawn from ``generator`` if omitted.
    """
    _check_model(model)
    new_values = torch.as_tensor(new_values, dtype=torch.float32)
    if new_values.dim() == 1:
        new_values = new_values[:, None]
    if new_values.dim() != 2 or new_values.shape[0] != state.batch_size:
        raise TsdbError(f"update needs new_values [batch={state.batch_size}, n], got {list(new_values.shape)}")
    n = new_values.shape[1]
    if n == 0:
        return state
    r = int(rolls_due(model, state, n).max())
    if r:
        fresh_noise = _noise(fresh_noise, (state.batch_size, state.num_samples, r * model.chunk_length),
                             generator, "update")

    def run(group: HorizonStreamingState, values: Tensor, fresh: Tensor | None) -> HorizonStreamingState:
        return _update_group(model, group, values, fresh, substeps, sampler)

    return _grouped(state, run, new_values, fresh_noise if r else None)


def _update_group(model: HorizonForecaster, state: HorizonStreamingState, new_values: Tensor,
                  fresh: Tensor | None, substeps: int, sampler: str) -> HorizonStreamingState:
    """Series at the same pending count and position: observed rolls for every completed chunk."""
    b, s, h = state.window.shape
    c = model.chunk_length
    pc = int(state.pending_count[0])
    raw = torch.cat([state.pending[:, :pc], new_values], dim=1)
    m = raw.shape[1] // c
    k, v, tokens = state.k, state.v, state.tokens
    window = state.window.reshape(b * s, h)
    for i in range(m):
        encodings = [e.repeat(s) for e in _encodings(k, v, tokens)]
        _, window = model.roll(window, encodings, fresh[:, :, i * c:(i + 1) * c].reshape(b * s, c),
                               substeps, sampler)
        k, v, tokens = _ingest(model, k, v, tokens, raw[:, i * c:(i + 1) * c], state.loc, state.scale)
    rest = raw[:, m * c:]
    pending = state.pending.new_full(state.pending.shape, float("nan"))
    pending[:, :rest.shape[1]] = rest
    return replace(state, k=k, v=v, tokens=tokens, window=window.view(b, s, h), pending=pending,
                   pending_count=torch.full_like(state.pending_count, rest.shape[1]),
                   count=state.count + new_values.shape[1])


@torch.no_grad()
def forecast(model: HorizonForecaster, state: HorizonStreamingState, noise: Tensor | None = None, *,
             generator: torch.Generator | None = None, substeps: int = 2, sampler: str = "heun",
             normalized: bool = False) -> Tensor:
    """Samples ``[batch, S, H]`` for the H steps after the last observation (raw scale, or
    normalized with the state's statistics if ``normalized``); the state is not modified.

    ``B`` free rolls from the window (``B + 1`` for series with pending values, see the
    module docstring), each emitted chunk entering a per-trajectory copy of the cache.
    ``noise [batch, S, H + c]`` standard normal: the chunk appended by each roll (``[batch,
    S, H]`` suffices when no series has pending values); drawn from ``generator`` if omitted.
    """
    _check_model(model)
    b, s, h = state.window.shape
    c = model.chunk_length
    need = h + c if bool((state.pending_count > 0).any()) else h
    noise = _noise(noise, (b, s, need), generator, "forecast")

    def run(group: HorizonStreamingState, eps: Tensor) -> Tensor:
        return _forecast_group(model, group, eps, substeps, sampler)

    y = _grouped(state, run, noise)
    return y if normalized else y * state.scale[:, :, None] + state.loc[:, :, None]


def _forecast_group(model: HorizonForecaster, state: HorizonStreamingState, noise: Tensor,
                    substeps: int, sampler: str) -> Tensor:
    b, s, h = state.window.shape
    c = model.chunk_length
    r = int(state.pending_count[0])
    rolls = model.num_chunks + (r > 0)

    def rep(t: Tensor) -> Tensor:  # one row per trajectory, series-major
        return t.repeat_interleave(s, 0)

    k = tuple(kb.repeat_interleave(s, 1) for kb in state.k)
    v = tuple(vb.repeat_interleave(s, 1) for vb in state.v)
    tokens, loc, scale = rep(state.tokens), rep(state.loc), rep(state.scale)
    window = state.window.reshape(b * s, h)
    out = []
    for i in range(rolls):
        emitted, window = model.roll(window, _encodings(k, v, tokens),
                                     noise[:, :, i * c:(i + 1) * c].reshape(b * s, c), substeps, sampler)
        out.append(emitted)
        if i < rolls - 1:
            raw = emitted * scale + loc  # raw, as HorizonForecaster.forecast_rolls feeds the context
            if i == 0 and r:
                raw[:, :r] = rep(state.pending[:, :r])  # observed values enter the context as themselves
            k, v, tokens = _ingest(model, k, v, tokens, raw, loc, scale)
    return torch.cat(out, dim=-1)[:, r:r + h].reshape(b, s, h)


# ---------------------------------------------------------------------------------------
# One block's denoiser call with per-token sigma on the cache (exported by tsdb.strategies.horizon.export)
# ---------------------------------------------------------------------------------------

def denoise_tokens(block, precond, k_cache: Tensor, v_cache: Tensor, tokens: Tensor, z: Tensor,
                   sigma: Tensor) -> Tensor:
    """``D(z, sigma | cache)`` of one block for windows with one noise level per position.

    k_cache, v_cache: ``[layers, batch, heads, cache, head_dim]`` (the state's ``k[j]``/``v[j]``);
    tokens: ``[batch]`` int64, position of the window's first token; z: ``[batch, samples, H]``
    noisy windows sharing their series' cache; sigma: ``[batch, H]`` per-position noise
    levels (the staircase, the same for all samples of a series).
    Returns the denoised window ``[batch, samples, H]`` (normalized); the horizon sampler
    keeps chunk j of block j's output. Equals ``BlockDenoiser.denoise_future`` through
    ``Preconditioning.denoise`` with positions given per series.
    """
    ctx = ContextEncoding([KV(k, v) for k, v in zip(k_cache, v_cache)], tokens)
    return precond.denoise(block.denoise_future, ctx, z, sigma)


# ---------------------------------------------------------------------------------------
# Reference: replay from init over the full history (the parity invariant, benchmark baseline)
# ---------------------------------------------------------------------------------------

def sliding_replay_model(model: HorizonForecaster, position_offset: int = 0) -> HorizonForecaster:
    """A shallow copy of ``model`` (same parameters) whose ``encode`` is the sliding-window
    encoding of the whole history (``encode_context(..., window=W)``, the last ``W`` tokens'
    keys/values), so that the library's ``observe``/``roll`` run on a growing history with
    the streaming semantics. ``position_offset`` is the position of the history's first token."""
    w = window_tokens(model)
    ref = copy.copy(model)

    def encode(features: Tensor) -> list[ContextEncoding]:
        out = []
        for block in model.blocks:
            out.append(block.encode_context(features, position_offset, window=w).last(w))
        return out

    ref.encode = encode
    return ref


@torch.no_grad()
def recompute_forecast(model: HorizonForecaster, history: Tensor, init_length: int, init_noise: Tensor,
                       roll_noise: Tensor | None, forecast_noise: Tensor, substeps: int = 2,
                       sampler: str = "heun", normalized: bool = False) -> Tensor:
    """What ``init_state(history[:, :init_length])``, updates with the rest of ``history``
    and ``forecast`` give, recomputed from scratch by replaying ``HorizonForecaster.observe``
    over the full history (every roll re-encodes the whole history so far, sliding window
    ``W``), then free rolls (``HorizonForecaster.roll``) with the same pending-value rule.

    ``init_noise [b, S, 2H]`` as for :func:`init_state`; ``roll_noise [b, S, K c]`` the appended
    chunks of the ``K = (T - init_length + r0) // c`` observed rolls after init, in order;
    ``forecast_noise [b, S, >= H (+ c)]`` as for :func:`forecast`. Cost grows with the
    history (every roll re-encodes it); this is the benchmark's recompute baseline.
    """
    _check_model(model)
    history = torch.as_tensor(history, dtype=torch.float32)
    b, t = history.shape
    h, c, nb = model.horizon, model.chunk_length, model.num_chunks
    p = model.blocks[0].shape.patch_length
    s = init_noise.shape[1]
    head = history[:, :init_length]
    if init_length < h:
        head = torch.cat([head.new_full((b, h - init_length), float("nan")), head], dim=1)
    loc, scale = instance_stats(head[:, -model.context_length:])
    ctx = align_history(head[:, :-h], p, window_tokens(model), 1 << 40)
    n = ctx.shape[1] // p
    ref = sliding_replay_model(model, position_offset=min(n, init_tokens(model)) - n)  # streaming's positions
    observed = torch.cat([head[:, -h:], history[:, init_length:]], dim=1)  # values after the init context
    rolls = observed.shape[1] // c
    fresh = init_noise[..., h:2 * h] if roll_noise is None else torch.cat([init_noise[..., h:2 * h], roll_noise], -1)
    y = torch.nan_to_num((head[:, -h:] - loc) / scale, nan=0.0).repeat_interleave(s, 0)
    window = model.staircase_window(y, init_noise[..., :h].reshape(b * s, h))
    for i in range(rolls):
        chunk = observed[:, i * c:(i + 1) * c]
        window, _ = ref.observe(window, ctx, chunk, loc, scale, fresh[:, :, i * c:(i + 1) * c].reshape(b * s, c),
                                substeps, sampler)
        ctx = torch.cat([ctx, chunk], dim=1)
    r = observed.shape[1] - rolls * c
    pending = observed[:, rolls * c:].repeat_interleave(s, 0)
    ctx, loc_s, scale_s = (x.repeat_interleave(s, 0) for x in (ctx, loc, scale))
    out = []
    for i in range(nb + (r > 0)):
        encodings = ref.encode(context_features(ctx, loc_s, scale_s))
        emitted, window = ref.roll(window, encodings, forecast_noise[:, :, i * c:(i + 1) * c].reshape(b * s, c),
                                   substeps, sampler)
        out.append(emitted)
        raw = emitted * scale_s + loc_s
        if i == 0 and r:
            raw[:, :r] = pending
        ctx = torch.cat([ctx, raw], dim=1)
    y = torch.cat(out, dim=-1)[:, r:r + h].reshape(b, s, h)
    return y if normalized else y * scale[:, :, None] + loc[:, :, None]


__all__ = ["HorizonStreamingState", "NORMALIZATION_RULE", "denoise_tokens", "forecast", "init_state",
           "recompute_forecast", "rolls_due", "sampler_kwargs", "sliding_replay_model", "update"]
