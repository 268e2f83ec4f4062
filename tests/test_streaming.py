"""Streaming state (tsdb.strategies.depth.streaming): update-then-forecast equals recompute-from-full-history."""

from __future__ import annotations


import numpy as np
import pytest
from conftest import SHARED_DATA
import torch

import tsdb.strategies.depth.streaming as st

from tsdb.errors import TsdbError


from conftest import block_calls, expected_calls, random_chunks, randomized_model

SHARED = SHARED_DATA   # ../shared/datasets, or $TSDB_DATA_DIR (a worktree)
P, C, H = 4, 32, 16
TOL = 1e-4  # normalized scale: float32 rounding of x ~ 80 * noise (ulp ~1e-5) through K sampler steps


def tiny(strategy: str = "depth", seed: int = 0, **kw):
    return randomized_model(strategy, seed, context_length=C, horizon=H, patch_length=P, **kw)


def stream(model, history: torch.Tensor, t0: int, chunks) -> st.StreamingState:
    state = st.init_state(model, history[:, :t0])
    t = t0
    for n in chunks:
        state = st.update(model, state, history[:, t:t + n])
        t += n
    assert t == history.shape[1]
    return state


def reference(model, history, state, t0, noise, schedule):
    return st.recompute_forecast(model, history, noise, schedule, pending=(history.shape[1] - t0) % P,
                                 loc=state.loc, scale=state.scale, next_token=int(state.tokens[0]),
                                 normalized=True, init_length=t0)


@pytest.mark.parametrize("strategy,t0,total,linear_head", [
    ("depth", 6, 90, False), ("depth", 40, 161, False), ("depth", 150, 300, False), ("e2e", 40, 161, False),
    ("looped", 6, 90, False), ("looped", 150, 300, False),
    ("depth", 6, 90, True), ("depth", 150, 300, True), ("looped", 40, 161, True)])
def test_update_then_forecast_equals_recompute(strategy, t0, total, linear_head):
    """Short/medium/long initial histories, random chunk sizes, far past the window
    (eviction), ending mid-patch or on a boundary; with and without the linear head (its
    embeddings ride in the cache)."""
    strat, model = tiny(strategy, linear_head=linear_head)
    rng = np.random.default_rng(t0)
    history = torch.from_numpy(rng.normal(size=(3, total)).cumsum(-1).astype(np.float32)) * 3 + 10
    history[1, 20:23] = float("nan")  # missing values stream through too
    state = stream(model, history, t0, random_chunks(rng, total - t0, P))
    assert state.k[0].shape[3] == C // P  # the cache stays bounded
    schedule = strat.schedule(4)
    noise = torch.randn(3, 8, H, generator=torch.Generator().manual_seed(1))
    sampler = strat.sampler
    got = st.forecast(model, state, noise, schedule, sampler=sampler, normalized=True)
    want = st.recompute_forecast(model, history, noise, schedule, sampler=sampler, pending=(total - t0) % P,
                                 loc=state.loc, scale=state.scale, next_token=int(state.tokens[0]),
                                 normalized=True, init_length=t0)
    assert got.shape == (3, 8, H)
    err = (got - want).abs().max().item()
    assert err < TOL, err


@pytest.mark.parametrize("strategy", ["depth", "looped"])
def test_a_short_start_outlives_the_window_in_deep_blocks(strategy):
    """A stream initialised shorter than context_length keeps its leading NaN padding: once
    the window slides past it, the deeper layers still carry it (a token's keys/values
    depend on up to layers x W tokens back). recompute_forecast(init_length=t0) pads the
    same way and agrees to float rounding; padding the whole history instead does not."""
    strat, model = tiny(strategy, n_layers=8, n_blocks=2, core_layers=6)   # 4 (or 6 looped) layers per block
    history = torch.randn(2, 7 + 60, generator=torch.Generator().manual_seed(3)).cumsum(-1) * 2
    state = stream(model, history, 7, [1] * 60)       # 7 values: padded to W = 8 tokens, then evicted
    schedule = strat.schedule(4)
    noise = torch.randn(2, 6, H, generator=torch.Generator().manual_seed(4))
    kw = dict(sampler=strat.sampler, pending=60 % P, loc=state.loc, scale=state.scale,
              next_token=int(state.tokens[0]), normalized=True)
    got = st.forecast(model, state, noise, schedule, sampler=kw["sampler"], normalized=True)
    same = st.recompute_forecast(model, history, noise, schedule, init_length=7, **kw)
    padded_late = st.recompute_forecast(model, history, noise, schedule, **kw)
    assert (got - same).abs().max().item() < 1e-5
    assert (got - padded_late).abs().max().item() > 1e-5


@pytest.mark.parametrize("end", [0, 1, 3])
def test_every_phase_of_the_patch(end):
    strat, model = tiny()
    history = torch.randn(2, 100 + end).cumsum(-1)
    state = stream(model, history, 50, [1] * (50 + end))
    assert int(state.pending_count[0]) == (50 + end) % P
    schedule = strat.schedule(4)
    noise = torch.randn(2, 4, H)
    err = (st.forecast(model, state, noise, schedule, normalized=True)
           - reference(model, history, state, 50, noise, schedule)).abs().max().item()
    assert err < TOL, err


@pytest.mark.skipif(not (SHARED / "ETTh1.csv").exists(), reason="../shared/datasets/ETTh1.csv is missing")
def test_real_data_etth1():
    import pandas as pd

    strat, model = tiny("depth", seed=3)
    df = pd.read_csv(SHARED / "ETTh1.csv")
    history = torch.tensor(df[["OT", "HUFL"]].to_numpy(np.float32)[:500].T.copy())
    t0 = 333  # ends mid-patch relative to the final length: 167 updates, 167 % 4 == 3
    state = stream(model, history, t0, random_chunks(np.random.default_rng(0), 500 - t0, P))
    schedule = strat.schedule(4)
    noise = torch.randn(2, 16, H)
    got = st.forecast(model, state, noise, schedule, normalized=True)
    err = (got - reference(model, history, state, t0, noise, schedule)).abs().max().item()
    assert err < TOL, err
    raw = st.forecast(model, state, noise, schedule)
    assert torch.isfinite(raw).all()


@pytest.mark.parametrize("strategy,location_window", [("depth", 0), ("looped", 0), ("depth", 6)])
def test_short_history_equals_the_library_sampler(strategy, location_window):
    """With at most context_length values, init + forecast is exactly the strategy's own forecast
    (with a location window too: the stream's frozen location is the training one)."""
    strat, model = tiny(strategy, location_window=location_window)
    schedule = strat.schedule(4)
    noise = torch.randn(2, 5, H)
    for n in (22, 24, 32):
        history = torch.randn(2, n).cumsum(-1) * 4 + 7
        context = torch.full((2, C), float("nan"))
        context[:, C - n:] = history
        want = strat.forecast(model, context, 5, noise=noise)
        got = st.forecast(model, st.init_state(model, history), noise, schedule, sampler=strat.sampler)
        err = (got - want).abs().max().item()
        assert err < 1e-5 * (1 + want.abs().max().item()), (n, err)


def test_refresh_equals_init_from_the_full_history():
    strat, model = tiny()
    history = torch.randn(2, 230).cumsum(-1) * 5
    state = stream(model, history, 7, [5] * 44 + [3])
    fresh = st.init_state(model, history)
    refreshed = st.refresh(model, state)
    for a, b in zip(refreshed.k + refreshed.v, fresh.k + fresh.v):
        assert torch.allclose(a, b, atol=1e-6)
    for name in ("tokens", "pending_count", "count", "loc", "scale"):
        assert torch.equal(getattr(refreshed, name), getattr(fresh, name)), name
    schedule = strat.schedule(4)
    noise = torch.randn(2, 4, H)
    assert torch.allclose(st.forecast(model, refreshed, noise, schedule), st.forecast(model, fresh, noise, schedule))
    # the statistics moved to the recent data
    assert not torch.allclose(refreshed.loc, state.loc)


def test_mixed_phases_and_lengths_in_one_batch():
    """Series of different history lengths and patch phases batch together and match
    their single runs."""
    strat, model = tiny()
    rng = np.random.default_rng(5)
    histories = [torch.from_numpy(rng.normal(size=n).cumsum().astype(np.float32)) for n in (9, 45, 130)]
    t = max(len(h) for h in histories)
    padded = torch.full((3, t), float("nan"))
    for i, h in enumerate(histories):
        padded[i, t - len(h):] = h
    batch = st.init_state(model, padded, lengths=torch.tensor([len(h) for h in histories]))
    singles = [st.init_state(model, h[None]) for h in histories]
    for a, b in zip(batch.k, st.StreamingState.cat(singles).k):
        assert torch.allclose(a, b, atol=1e-6)
    # bring the series to different phases, then update them together
    extra = [torch.randn(1, n) for n in (1, 2, 0)]
    singles = [st.update(model, s, e) for s, e in zip(singles, extra)]
    batch = st.StreamingState.cat(singles)
    assert batch.pending_count.tolist() == [1, 2, 0]
    new = torch.randn(3, 7)
    batch = st.update(model, batch, new)
    singles = [st.update(model, s, new[i:i + 1]) for i, s in enumerate(singles)]
    assert batch.pending_count.tolist() == [0, 1, 3]
    schedule = strat.schedule(4)
    noise = torch.randn(3, 4, H)
    got = st.forecast(model, batch, noise, schedule, normalized=True)
    for i, s in enumerate(singles):
        assert torch.allclose(got[i:i + 1], st.forecast(model, s, noise[i:i + 1], schedule, normalized=True),
                              atol=1e-5)


def test_update_is_pure_and_bounded():
    strat, model = tiny()
    state = st.init_state(model, torch.randn(1, 40))
    before = [k.clone() for k in state.k]
    later = st.update(model, state, torch.randn(1, 1000))
    assert all(torch.equal(a, b) for a, b in zip(before, state.k))
    assert later.k[0].shape == state.k[0].shape
    assert later.recent.shape == state.recent.shape
    assert int(later.count[0]) == 1040 and int(later.tokens[0]) == int(state.tokens[0]) + 250


def test_rejects_other_models():
    with pytest.raises(TsdbError, match="needs a DiffusionForecaster"):
        st.init_state(torch.nn.Linear(2, 2), torch.randn(1, 4))


@pytest.mark.parametrize("p_mean", [0.5, 0.0])
def test_streamed_steps_go_to_the_block_of_the_schedule(p_mean):
    """Counted by hooks on the blocks; P_mean 0.5 with B = K = 4 once sent steps 1 and 3 to
    the wrong block by float rounding."""
    strat, model = tiny("depth", n_blocks=4, n_layers=4, p_mean=p_mean)
    calls = block_calls(model)
    state = st.init_state(model, torch.randn(1, 40))
    for k in (4, 8, 16):
        calls.clear()
        st.forecast(model, state, torch.randn(1, 2, H), strat.schedule(k), sampler="heun")
        assert calls == expected_calls(4, k, "heun")


def test_a_seasonal_prior_model_is_refused_with_the_way_out():
    _, model = tiny("depth", seasonal_prior=8)
    with pytest.raises(TsdbError, match="seasonal_prior = 8 cannot be streamed yet.*DiffusionForecaster.sample"):
        st.init_state(model, torch.randn(2, 40))
