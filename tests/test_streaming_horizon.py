"""Streaming for the horizon strategy (tsdb.strategies.horizon.streaming): updates then forecast equal
the replay from init over the full history with the same noise; cold start equals the
strategy's own sampler where the two context semantics coincide."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import tsdb.strategies.horizon.streaming as sh
from tsdb.errors import TsdbError

from conftest import forecasts_after_different_pasts, random_chunks, randomized_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
P, C, H = 4, 32, 16          # B = 2 blocks -> chunks of c = 8 values (2 patches)
TOL = 1e-4                   # normalized scale, as tests/test_streaming.py


def tiny(seed: int = 0, **kw):
    strat, model = randomized_model("horizon", seed, context_length=C, horizon=H, patch_length=P, **kw)
    return strat, model, sh.sampler_kwargs(strat)


def stream(model, kw, history, t0, chunks, samples, g):
    """init on ``history[:, :t0]`` then updates; returns (state, init_noise, roll_noise)."""
    b = history.shape[0]
    c = model.chunk_length
    init_noise = torch.randn(b, samples, 2 * H, generator=g)
    state = sh.init_state(model, history[:, :t0], samples, init_noise, **kw)
    rolls, t = [], t0
    for n in chunks:
        due = int(sh.rolls_due(model, state, n).max())
        fresh = torch.randn(b, samples, due * c, generator=g)
        rolls.append(fresh)
        state = sh.update(model, state, history[:, t:t + n], fresh, **kw)
        t += n
    assert t == history.shape[1]
    roll_noise = torch.cat(rolls, -1) if rolls else None
    return state, init_noise, roll_noise


def parity(model, kw, history, t0, chunks, samples=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    state, init_noise, roll_noise = stream(model, kw, history, t0, chunks, samples, g)
    noise = torch.randn(history.shape[0], samples, H + model.chunk_length, generator=g)
    got = sh.forecast(model, state, noise, normalized=True, **kw)
    want = sh.recompute_forecast(model, history, t0, init_noise, roll_noise, noise, normalized=True, **kw)
    assert got.shape == (history.shape[0], samples, H)
    return state, (got - want).abs().max().item()


@pytest.mark.parametrize("t0,total", [(10, 97), (40, 203), (150, 301), (45, 45)])
def test_updates_then_forecast_equal_the_replay_from_init(t0, total):
    """Histories shorter than H, around C, longer than the init truncation; random update
    sizes far past the window (eviction), ending mid-chunk or on a boundary; no updates."""
    strat, model, kw = tiny()
    rng = np.random.default_rng(t0)
    history = torch.from_numpy(rng.normal(size=(3, total)).cumsum(-1).astype(np.float32)) * 3 + 10
    history[1, 5:9] = float("nan")        # missing values in the init window / context
    history[2, total - 3] = float("nan")  # and in the pending values
    state, err = parity(model, kw, history, t0, random_chunks(rng, total - t0, model.chunk_length))
    assert state.k[0].shape[3] == C // P  # the cache stays bounded
    assert err < TOL, err


@pytest.mark.parametrize("pending", [0, 1, 5, 7])
def test_every_position_inside_a_chunk(pending):
    """One value per update; forecasts from every phase of the chunk."""
    strat, model, kw = tiny(seed=1)
    history = torch.randn(2, 64 + 24 + pending).cumsum(-1)
    state, err = parity(model, kw, history, 64, [1] * (24 + pending))
    assert state.pending_count.tolist() == [pending] * 2
    assert err < TOL, err


@pytest.mark.skipif(not (SHARED / "ETTh1.csv").exists(), reason="../shared/datasets/ETTh1.csv is missing")
def test_real_data_etth1():
    import pandas as pd

    strat, model, kw = tiny(seed=3)
    df = pd.read_csv(SHARED / "ETTh1.csv")
    history = torch.tensor(df[["OT", "HUFL"]].to_numpy(np.float32)[:420].T.copy())
    state, err = parity(model, kw, history, 181, random_chunks(np.random.default_rng(0), 420 - 181, 8))
    assert int(state.pending_count[0]) == (420 - 181) % 8 == 7
    assert err < TOL, err
    raw = sh.forecast(model, state, generator=torch.Generator().manual_seed(0), **kw)
    assert raw.shape == (2, 4, H) and torch.isfinite(raw).all()


@pytest.mark.parametrize("n", [10, 20, 32])
def test_cold_start_equals_the_strategy_sampler(n):
    """init_state + forecast (no updates) == strategy.forecast on the same context and noise.

    Exact where streaming's sliding-window context and the sampler's fresh C-value buffer
    coincide: one layer per block (a token's keys/values depend on the token alone). With
    deeper blocks they coincide at the first roll only (see the module docstring); the
    replay reference covers that case (test above, ``t0 == total``)."""
    strat, model, kw = tiny(n_layers=2)  # B = 2 blocks of 1 layer
    g = torch.Generator().manual_seed(n)
    history = torch.randn(2, n, generator=g).cumsum(-1) * 4 + 7
    context = torch.full((2, C), float("nan"))
    context[:, C - n:] = history
    noise = torch.randn(2, 5, 3 * H, generator=g)
    want = strat.forecast(model, context, 5, noise=noise)
    state = sh.init_state(model, history, 5, noise[..., :2 * H], **kw)
    got = sh.forecast(model, state, noise[..., 2 * H:], **kw)
    err = (got - want).abs().max().item()
    assert err < 1e-5 * (1 + want.abs().max().item()), err


def test_mixed_phases_and_positions_in_one_batch():
    strat, model, kw = tiny()
    g = torch.Generator().manual_seed(5)
    states = [sh.init_state(model, torch.randn(1, t, generator=g).cumsum(-1), 3, generator=g, **kw)
              for t in (12, 45, 90)]
    states = [sh.update(model, s, torch.randn(1, e, generator=g), generator=g, **kw)
              for s, e in zip(states, (3, 0, 13))]
    batch = sh.HorizonStreamingState.cat(states)
    assert batch.pending_count.tolist() == [3, 0, 5]
    new = torch.randn(3, 6, generator=g)
    fresh = torch.randn(3, 3, 8, generator=g)
    batch = sh.update(model, batch, new, fresh, **kw)
    singles = [sh.update(model, s, new[i:i + 1], fresh[i:i + 1], **kw) for i, s in enumerate(states)]
    assert batch.pending_count.tolist() == [1, 6, 3]
    noise = torch.randn(3, 3, H + 8, generator=g)
    got = sh.forecast(model, batch, noise, normalized=True, **kw)
    for i, s in enumerate(singles):
        one = sh.forecast(model, s, noise[i:i + 1], normalized=True, **kw)
        assert torch.allclose(got[i:i + 1], one, atol=1e-5)


def test_update_and_forecast_are_pure_and_bounded():
    strat, model, kw = tiny()
    g = torch.Generator().manual_seed(0)
    state = sh.init_state(model, torch.randn(2, 40, generator=g), 3, generator=g, **kw)
    before = [t.clone() for t in (*state.k, state.window, state.pending)]
    noise = torch.randn(2, 3, H + 8, generator=g)
    a = sh.forecast(model, state, noise, **kw)
    later = sh.update(model, state, torch.randn(2, 203, generator=g), generator=g, **kw)
    assert torch.equal(a, sh.forecast(model, state, noise, **kw))  # forecast left the state alone
    assert all(torch.allclose(x, y, rtol=0, atol=0, equal_nan=True)
               for x, y in zip(before, (*state.k, state.window, state.pending)))
    assert later.k[0].shape == state.k[0].shape and later.window.shape == state.window.shape
    assert later.count.tolist() == [243, 243] and later.pending_count.tolist() == [203 % 8] * 2
    assert (later.tokens - state.tokens).tolist() == [(203 // 8) * 2] * 2
    assert sh.rolls_due(model, later, 5).tolist() == [1, 1]


def test_noise_shapes_and_models_are_checked():
    strat, model, kw = tiny()
    state = sh.init_state(model, torch.randn(1, 40), 3, torch.randn(1, 3, 2 * H), **kw)
    with pytest.raises(TsdbError, match="update noise"):
        sh.update(model, state, torch.randn(1, 8), torch.randn(1, 3, 4), **kw)
    with pytest.raises(TsdbError, match="init_state noise"):
        sh.init_state(model, torch.randn(1, 40), 3, torch.randn(1, 2, 2 * H), **kw)
    pending = sh.update(model, state, torch.randn(1, 3), **kw)
    with pytest.raises(TsdbError, match="forecast noise"):
        sh.forecast(model, pending, torch.randn(1, 3, H), **kw)  # pending values need H + c
    assert sh.forecast(model, state, torch.randn(1, 3, H), **kw).shape == (1, 3, H)
    _, depth = randomized_model("depth", 0, context_length=C, horizon=H, patch_length=P)
    with pytest.raises(TsdbError, match="HorizonForecaster"):
        sh.init_state(depth, torch.randn(1, 40), 3)


# ---------------------------------------------------------------------------------------
# ONNX: per-token-sigma denoise graphs (tsdb.strategies.horizon.export), ONNX Runtime vs PyTorch
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from tsdb.strategies.horizon.export import export_horizon_model

    strat, model, kw = tiny(seed=4)
    out = tmp_path_factory.mktemp("horizon-onnx")
    meta = export_horizon_model(model, strat, out)
    return strat, model, kw, out, meta


def _sessions(out, meta):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    load = lambda f: ort.InferenceSession(str(out / f), opts, providers=["CPUExecutionProvider"])  # noqa: E731
    return load(meta["graphs"]["update"]["file"]), [load(e["file"]) for e in meta["graphs"]["denoise"]]


def test_onnx_denoise_graphs_match_torch(exported):
    strat, model, kw, out, meta = exported
    assert meta["format"] == "tsdb-streaming-onnx-horizon" and meta["substeps"] == kw["substeps"]
    _, denoise = _sessions(out, meta)
    g = torch.Generator().manual_seed(0)
    state = sh.init_state(model, torch.randn(5, 70, generator=g).cumsum(-1), 4, generator=g, **kw)
    sigma = model.window_sigma(torch.rand(5, generator=g).double())  # a different phase per series
    z = torch.randn(5, 4, H, generator=g) * sigma[:, None]
    for j, sess in enumerate(denoise):
        got = sess.run(None, {"cache_k": state.k[j].numpy(), "cache_v": state.v[j].numpy(),
                              "tokens": state.tokens.numpy(), "z": z.numpy(), "sigma": sigma.numpy()})[0]
        with torch.no_grad():
            want = sh.denoise_tokens(model.blocks[j], model.precond, state.k[j], state.v[j], state.tokens, z, sigma)
            # the library's own path (uniform positions here): Preconditioning + denoise_future
            enc = sh._encodings(state.k, state.v, state.tokens)[j].repeat(4)
            lib = model.precond.denoise(model.blocks[j].denoise_future, enc, z.reshape(20, H),
                                        sigma.repeat_interleave(4, 0)).reshape(5, 4, H)
        assert (want - lib).abs().max().item() < 1e-6
        assert np.abs(got - want.numpy()).max() <= 1e-4


def _runtime(out, **kw):
    from tsdb.cli.stream import import_runtime

    return import_runtime().StreamingForecaster(out, refresh="none", **kw)


def _feed(f, model, kw, ids, history, t0, sizes, g, samples):
    """The same stream into the torch state and the runtime, with the same noise."""
    init_noise = torch.randn(len(ids), samples, 2 * H, generator=g)
    state = sh.init_state(model, history[:, :t0], samples, init_noise, **kw)
    f.update(ids, list(history[:, :t0].numpy()), init_noise=list(init_noise.numpy()))
    t = t0
    for n in sizes:
        fresh = torch.randn(len(ids), samples, int(sh.rolls_due(model, state, n).max()) * model.chunk_length,
                            generator=g)
        state = sh.update(model, state, history[:, t:t + n], fresh, **kw)
        f.update(ids, list(history[:, t:t + n].numpy()), noise=list(fresh.numpy()))
        t += n
    return state


@pytest.mark.parametrize("extra", [0, 3, 7])
def test_runtime_matches_torch_streaming(exported, extra):
    """tsdb_streaming's HorizonStreamingForecaster (numpy + the graphs) reproduces
    sh.init_state / update / forecast (normalized) within 1e-4, at every phase of a chunk."""
    strat, model, kw, out, meta = exported
    f = _runtime(out, num_samples=3)
    assert type(f).__name__ == "HorizonStreamingForecaster" and f.chunk_length == 8
    g = torch.Generator().manual_seed(extra)
    history = torch.randn(2, 100 + extra, generator=g).cumsum(-1) * 2 + 5
    history[0, 70] = float("nan")
    state = _feed(f, model, kw, ["a", "b"], history, 60, random_chunks(np.random.default_rng(extra), 40 + extra, 8),
                  g, 3)
    assert int(state.pending_count[0]) == extra and [f.values_pending(i) for i in "ab"] == [extra] * 2
    assert np.abs(f.windows[:2] - state.window.numpy()).max() <= TOL
    noise = torch.randn(2, 3, H + 8, generator=g)
    want = sh.forecast(model, state, noise, normalized=True, **kw).numpy()
    got = f.forecast(["a", "b"], noise=noise.numpy(), normalized=True).samples
    assert np.abs(got - want).max() <= TOL, np.abs(got - want).max()
    raw = f.forecast(["b"], noise=noise[1:].numpy())
    assert np.allclose(raw.samples, sh.forecast(model, state.select([1]), noise[1:], **kw).numpy(), atol=1e-3)
    assert raw.quantiles.shape == (1, 3, H) and f.observation_count("a") == 100 + extra


def test_runtime_batches_series_at_different_phases(exported):
    """Series at different chunk phases and positions in one update/forecast batch equal
    the same series served one at a time."""
    strat, model, kw, out, meta = exported
    rng = np.random.default_rng(1)
    hist = {k: (rng.normal(size=n).cumsum() + 3).astype(np.float32) for k, n in (("x", 20), ("y", 45), ("z", 91))}
    batched, single = _runtime(out, num_samples=4, seed=7), _runtime(out, num_samples=4, seed=7)
    batched.update(list(hist), list(hist.values()))
    for k, v in hist.items():
        single.update([k], [v])
    for step in (3, 0, 13, 6):
        new = {k: rng.normal(size=step).astype(np.float32) for k in hist}
        batched.update(list(new), list(new.values()))
        for k, v in new.items():
            single.update([k], [v])
    assert batched.pending_count[:3].tolist() == [22 % 8, 22 % 8, 22 % 8]
    seeds = [11, 12, 13]
    a = batched.forecast(list(hist), seed=seeds).samples
    b = np.concatenate([single.forecast([k], seed=[sd]).samples for k, sd in zip(hist, seeds)])
    assert np.abs(a - b).max() < 1e-4


def test_runtime_state_round_trip_and_checks(exported, tmp_path):
    from tsdb_streaming import StreamingError, load_metadata

    strat, model, kw, out, meta = exported
    f = _runtime(out, num_samples=3, seed=0)
    f.update(["a"], [np.arange(50, dtype=np.float32)])
    f.update(["a"], [np.float32(50.5)])
    f.save_state(tmp_path / "state.npz")
    g = _runtime(out, num_samples=3, seed=0)
    g.load_state(tmp_path / "state.npz")
    for h in (f, g):
        h.update(["a"], [[51.0, 52.0, 53.0, 54.0, 55.0, 56.0, 57.0]])   # completes a chunk: one roll
    assert np.array_equal(f.forecast(["a"], seed=3).samples, g.forecast(["a"], seed=3).samples)
    with pytest.raises(StreamingError, match="num_samples=3"):
        _runtime(out, num_samples=5).load_state(tmp_path / "state.npz")
    with pytest.raises(StreamingError, match="3 samples, not 100"):
        f.forecast(["a"], num_samples=100)
    with pytest.raises(StreamingError, match="do not apply"):
        f.forecast(["a"], num_steps=4)
    with pytest.raises(StreamingError, match="init noise must be"):
        f.update(["new"], [np.ones(20, np.float32)], init_noise=[np.zeros((3, 5), np.float32)])
    assert "new" not in f and len(f) == 1                      # the refused update changed nothing
    assert load_metadata(out)["format"] == "tsdb-streaming-onnx-horizon"
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    m = json.loads((bad / "tsdb_model.json").read_text())
    m["roll_sigmas"] = m["roll_sigmas"][:-1]
    (bad / "tsdb_model.json").write_text(json.dumps(m))
    with pytest.raises(StreamingError, match="roll_sigmas"):
        _runtime(bad)


def test_runtime_refuses_poisoning_values_per_series(exported):
    """A value 1e30 (or inf) completing a chunk is refused before its roll reaches the state:
    the series keeps its windows and caches, the other series of the call rolls on; a new
    series with an infinite value in its history stays unknown; a call-level error changes nothing."""
    from tsdb_streaming import SeriesRefused, StreamingError

    strat, model, kw, out, meta = exported
    rng = np.random.default_rng(5)
    hist = {k: (rng.normal(size=50).cumsum() + 3).astype(np.float32) for k in "ab"}
    f, ref = _runtime(out, num_samples=3, seed=1), _runtime(out, num_samples=3, seed=1)
    for g in (f, ref):
        g.update(list(hist), list(hist.values()))
    before = f._rows(f._slots(["a"]))
    step = np.arange(8, dtype=np.float32)                    # completes a chunk: one roll each
    for bad in (1e30, float("inf")):
        with pytest.raises(SeriesRefused, match="series 'a'") as e:
            f.update(["a", "b"], [np.r_[step[:7], bad], step])
        assert e.value.applied == ["b"]
        ref.update(["b"], [step])
    after = f._rows(f._slots(["a"]))
    assert all(np.array_equal(before[k], after[k], equal_nan=True) for k in before if k not in ("k", "v"))
    for item in "ab":
        assert np.array_equal(f.forecast([item], seed=[2]).samples, ref.forecast([item], seed=[2]).samples)
    with pytest.raises(SeriesRefused) as e:
        f.update(["c", "d"], [np.r_[hist["a"][:-1], np.float32(np.inf)], hist["b"]])
    assert list(e.value.refused) == ["c"] and "c" not in f and "d" in f
    with pytest.raises(StreamingError, match="update noise of series 'a'"):
        f.update(["e", "a"], [hist["a"], step], noise=[np.zeros((3, 0), np.float32), np.zeros((3, 2), np.float32)])
    assert "e" not in f and f.item_ids == ["a", "b", "d"]
    assert f.reset_series(["a"]) == ["a"] and f.item_ids == ["b", "d"]
    assert np.array_equal(f.forecast(["b"], seed=[2]).samples, ref.forecast(["b"], seed=[2]).samples)


def test_runtime_refresh_keeps_the_observation_count(exported):
    strat, model, kw, out, meta = exported
    f = _runtime(out, num_samples=2)
    f.refresh, f.refresh_every = "none", 10
    f.update(["s"], [np.ones(300, np.float32)])
    for x in range(25):
        f.update(["s"], [float(x)])
    assert f.observation_count("s") == 325     # refreshed at 310 and 320 from the recent values
    assert np.isfinite(f.forecast(["s"]).samples).all()


def test_tsdb_stream_serves_a_horizon_model(exported, tmp_path):
    """`tsdb stream` on a horizon export: per-record errors leave the state alone,
    checkpoint + resume and batching give the same lines as one uninterrupted run."""
    from conftest import records, stream

    strat, model, kw, out, meta = exported
    recs = records(30)
    bad = [{"item_id": "a", "timestamp": recs[-2]["timestamp"], "value": 1.0},   # duplicate
           {"item_id": "b", "timestamp": 30, "value": "high"}]                    # not a number
    counts, lines = stream(out, recs + bad)
    assert counts == {"records": 62, "forecasts": 60, "errors": 2, "series": 2}
    assert "duplicate" in lines[60]["error"] and "finite number" in lines[61]["error"]
    fc = lines[59]
    assert fc["item_id"] == "b" and fc["observations"] == 30 and len(fc["mean"]) == H
    q = np.asarray([fc["quantiles"][k] for k in ("0.1", "0.5", "0.9")])
    assert (np.diff(q, axis=0) >= 0).all()
    state = tmp_path / "state.npz"
    _, first = stream(out, recs[:37], state_path=state, checkpoint_every=5)
    _, second = stream(out, recs[37:], state_path=state)
    assert first + second == lines[:60]
    _, batched = stream(out, recs, batch_size=6)
    assert batched == lines[:60]


def test_context_refresh_forgets_everything_before_the_context(exported):
    """``refresh="context"``: a horizon forecast is rebuilt from the last ``C + H`` values
    (the context and the windows' truth), so an older past leaves no trace; the sliding
    state keeps it."""
    *_, out, _ = exported
    recent = C + H + P + 1
    bounded = forecasts_after_different_pasts(out, "context", recent)
    assert np.abs(bounded[0] - bounded[1]).max() < 1e-4
    sliding = forecasts_after_different_pasts(out, "warmup", recent)
    assert np.abs(sliding[0] - sliding[1]).max() > 1e-2
