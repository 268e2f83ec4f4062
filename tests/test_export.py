"""ONNX export (tsdb.export.onnx), the torch-free runtime (streaming/tsdb_streaming) and
``tsdb stream`` (tsdb.cli.stream): parity with the PyTorch streaming state."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import tsdb.strategies.depth.streaming as st
from tsdb.config import ExperimentConfig
from tsdb.errors import TsdbError
from tsdb.export.onnx import export_run, load_metadata

from tsdb.cli.stream import import_runtime

from conftest import expected_calls, randomized_model, records, stream

rt = import_runtime()
REPO = Path(__file__).resolve().parents[1]
P, C, H = 4, 32, 16
TOL = 1e-4


@pytest.fixture(scope="module")
def exported(tiny_run):
    """The session's tiny depth run (conftest.tiny_run: this model, exported once per session)."""
    strat, model = randomized_model("depth", 0, context_length=C, horizon=H, patch_length=P)
    return strat, model, tiny_run / "onnx"


def export_tiny(tmp_path_factory, strategy: str, **cfg):
    """A tiny run (random weights, adaLN-Zero layers randomized), exported."""
    strat, model = randomized_model(strategy, 0, context_length=C, horizon=H, patch_length=P, **cfg)
    run = tmp_path_factory.mktemp(strategy)
    ExperimentConfig(model=strat.cfg).to_yaml(run / "config.yaml")
    torch.save(model.state_dict(), run / "model.pt")
    out = export_run(run, run / "onnx")
    return strat, model, out


def torch_stream(model, history: np.ndarray, t0: int, chunks) -> st.StreamingState:
    h = torch.from_numpy(history)[None]
    state = st.init_state(model, h[:, :t0])
    t = t0
    for n in chunks:
        state = st.update(model, state, h[:, t:t + n])
        t += n
    return state


def test_metadata_and_graphs(exported):
    strat, model, out = exported
    meta = load_metadata(out)
    assert meta["strategy"] == "depth" and meta["shapes"]["window_tokens"] == C // P
    assert meta["shapes"]["init_tokens"] == 2 * C // P
    assert meta["sigmas"] == pytest.approx(strat.schedule(4).sigmas.tolist())
    assert meta["normalization"]["rule"] == "frozen-at-init"
    assert sorted(p.name for p in out.iterdir()) == ["denoise_0.onnx", "denoise_1.onnx", "tsdb_model.json",
                                                     "update.onnx"]
    assert not list(out.glob("*.data"))  # external_data=False
    f = rt.StreamingForecaster(out)
    shapes = {i.name: i.shape for i in f._update.get_inputs()}
    assert isinstance(shapes["features"][0], str) and isinstance(shapes["features"][1], str)
    assert isinstance(shapes["cache_k_0"][1], str) and isinstance(shapes["cache_k_0"][3], str)
    z = {i.name: i.shape for i in f._denoise[0].get_inputs()}["z"]
    assert isinstance(z[0], str) and isinstance(z[1], str)


@pytest.mark.parametrize("b,c,m", [(1, 0, 5), (3, C // P, 1), (2, 3, 2)])
def test_update_graph_dynamic_axes(exported, b, c, m):
    _, model, out = exported
    f = rt.StreamingForecaster(out)
    g = torch.Generator().manual_seed(b + c + m)
    feats = torch.stack([torch.randn(b, m, P, generator=g), torch.ones(b, m, P)], -1)
    start = torch.arange(b) * 7 + c
    caches = [torch.randn(2, b, 4, c, 8, generator=g) for _ in range(4)]
    got = f._run_update(feats.numpy(), start.numpy(), [x.numpy() for x in caches[0::2]],
                        [x.numpy() for x in caches[1::2]])
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            k, v = st.encode_tokens(block, feats, start, caches[2 * i], caches[2 * i + 1])
            assert got[0][i].shape == tuple(k.shape) == (2, b, 4, min(C // P, c + m), 8)
            assert np.abs(got[0][i] - k.numpy()).max() < 1e-5
            assert np.abs(got[1][i] - v.numpy()).max() < 1e-5


def test_runtime_matches_pytorch_streaming(exported):
    """Several series, different history lengths, chunked updates past the window, ending
    mid-patch: ORT runtime vs PyTorch streaming vs full recompute, same noise."""
    check_runtime_parity(*exported)


@pytest.mark.slow   # its own ONNX export (tens of seconds)
def test_runtime_matches_pytorch_streaming_with_a_linear_head(tmp_path_factory):
    """The linear head reads the context embeddings from the cache (the tap is one more
    context layer), so the generic graphs and runtime serve it unchanged."""
    strat, model, out = export_tiny(tmp_path_factory, "depth", linear_head=True)
    assert load_metadata(out)["shapes"]["layers_per_block"] == [3, 3]  # tap + 2 layers
    assert all(block.linear_head.proj.weight.abs().sum() > 0 for block in model.blocks)
    check_runtime_parity(strat, model, out)


def check_runtime_parity(strat, model, out):
    rng = np.random.default_rng(0)
    total = 170
    histories = (rng.normal(size=(3, total)).cumsum(-1) * 4 + 50).astype(np.float32)
    t0s = [3, 41, 120]
    f = rt.StreamingForecaster(out, refresh="none")
    ids = ["a", "b", 7]
    f.update(ids, [histories[j, :t0s[j]] for j in range(3)])
    states = [st.init_state(model, torch.from_numpy(histories[j:j + 1, :t0s[j]])) for j in range(3)]
    t = list(t0s)
    while min(t) < total:
        vals = []
        for j in range(3):
            n = int(min(rng.integers(0, 6), total - t[j]))
            vals.append(histories[j, t[j]:t[j] + n])
            if n:
                states[j] = st.update(model, states[j], torch.from_numpy(histories[j:j + 1, t[j]:t[j] + n]))
            t[j] += n
        f.update(ids, vals)
    noise = rng.normal(size=(3, 20, H)).astype(np.float32)
    fc = f.forecast(ids, noise=noise, normalized=True)
    schedule = strat.schedule(4)
    worst = 0.0
    for j in range(3):
        assert f.observation_count(ids[j]) == total
        want = st.forecast(model, states[j], torch.from_numpy(noise[j:j + 1]), schedule, normalized=True)
        worst = max(worst, float(np.abs(fc.samples[j] - want[0].numpy()).max()))
        ref = st.recompute_forecast(model, torch.from_numpy(histories[j:j + 1]), torch.from_numpy(noise[j:j + 1]),
                                    schedule, pending=(total - t0s[j]) % P, loc=states[j].loc,
                                    scale=states[j].scale, next_token=int(states[j].tokens[0]), normalized=True,
                                    init_length=t0s[j])
        assert (want - ref).abs().max().item() < TOL
    assert worst < TOL, worst
    raw = f.forecast(ids, num_samples=50, seed=1, quantiles=(0.1, 0.5, 0.9))
    assert raw.samples.shape == (3, 50, H) and raw.quantiles.shape == (3, 3, H)
    assert np.all(np.diff(raw.quantiles, axis=1) >= 0)


def test_warmup_refresh_equals_init_from_the_history(exported):
    """Fed from scratch one value at a time, a series is re-initialised at 2, 4, ..., C
    observations; afterwards its statistics are frozen."""
    strat, model, out = exported
    history = (np.random.default_rng(1).normal(size=45).cumsum() * 3 + 20).astype(np.float32)
    f = rt.StreamingForecaster(out)
    for x in history:
        f.update(["s"], [x])
    state = torch_stream(model, history, C, [1] * (45 - C))
    slot = f._slot["s"]
    assert f.loc[slot] == pytest.approx(state.loc[0].numpy(), abs=1e-5)
    noise = np.random.default_rng(2).normal(size=(1, 10, H)).astype(np.float32)
    got = f.forecast(["s"], noise=noise, normalized=True).samples
    want = st.forecast(model, state, torch.from_numpy(noise), strat.schedule(4), normalized=True)
    assert np.abs(got - want.numpy()).max() < TOL


def test_save_and_load_state(exported, tmp_path):
    _, _, out = exported
    f = rt.StreamingForecaster(out)
    f.update(["x", "y"], [np.arange(50, dtype=np.float32), np.ones(7, np.float32)])
    f.update(["x"], [np.float32(3.5)])
    f.save_state(tmp_path / "state.npz", extra={"note": 1})
    g = rt.StreamingForecaster(out)
    assert g.load_state(tmp_path / "state.npz") == {"note": 1}
    assert g.item_ids == ["x", "y"]
    a = f.forecast(["x", "y"], num_samples=8, seed=3).samples
    b = g.forecast(["x", "y"], num_samples=8, seed=3).samples
    assert np.array_equal(a, b)
    with pytest.raises(rt.StreamingError, match="unknown series"):
        g.forecast(["z"])
    (tmp_path / "bad.npz").write_bytes(b"not a state")
    with pytest.raises(rt.StreamingError, match="not a tsdb-streaming state"):
        g.load_state(tmp_path / "bad.npz")


# ---------------------------------------------------------------------------------------
# reliability: values that would poison a state, reset, non-finite guards, state files
# ---------------------------------------------------------------------------------------

def _walk(n: int, seed: int, level: float = 50.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=n).cumsum() * 3 + level).astype(np.float32)


def _same_forecast(f, g, item, noise) -> bool:
    return np.array_equal(f.forecast([item], noise=noise).samples, g.forecast([item], noise=noise).samples)


@pytest.mark.parametrize("bad", [1e30, -1e39, 1e300, float("inf"), float("-inf"), 50.0 + 3e5])
def test_update_refuses_a_value_that_would_poison_the_series_and_applies_the_others(exported, bad):
    """Per-series atomicity: the refused series keeps its exact state, the other series of
    the call is applied, the error is one line naming the series and the fix."""
    _, _, out = exported
    f, ref = rt.StreamingForecaster(out, refresh="none"), rt.StreamingForecaster(out, refresh="none")
    for g in (f, ref):
        g.update(["a", "b"], [_walk(45, 0), _walk(45, 1)])
    before = f._rows(f._slots(["a"]))
    with pytest.raises(rt.SeriesRefused) as e:
        f.update(["a", "b"], [[51.0, bad], [52.0, 53.0]])
    ref.update(["b"], [[52.0, 53.0]])
    msg = str(e.value)
    assert e.value.refused.keys() == {"a"} and e.value.applied == ["b"] and isinstance(e.value, rt.StreamingError)
    assert "\n" not in msg and msg.startswith("series 'a'") and ("reset_series" in msg or "NaN" in msg)
    after = f._rows(f._slots(["a"]))
    assert all(np.array_equal(before[k], after[k], equal_nan=True) for k in before if k not in ("k", "v"))
    assert all(np.array_equal(x, y) for k in ("k", "v") for x, y in zip(before[k], after[k]))
    assert f.observation_count("a") == 45 and f.observation_count("b") == 47
    noise = np.random.default_rng(0).normal(size=(1, 6, H)).astype(np.float32)
    assert _same_forecast(f, ref, "a", noise) and _same_forecast(f, ref, "b", noise)
    # NaN stays a missing value
    f.update(["a"], [[np.nan, 51.0]])
    assert f.observation_count("a") == 47 and np.isfinite(f.forecast(["a"], num_samples=4, seed=0).samples).all()


def test_new_series_are_refused_whole_when_their_history_does_not_fit(exported):
    _, _, out = exported
    f = rt.StreamingForecaster(out, refresh="none")
    old_outlier = _walk(60, 2)
    old_outlier[3] = 1e9               # outside the statistics' window (last C), inside the initial context (2 C)
    broken = np.r_[_walk(39, 3), np.float32(np.inf)]
    with pytest.raises(rt.SeriesRefused) as e:
        f.update(["ok", "outlier", "broken"], [_walk(40, 4), old_outlier, broken])
    assert set(e.value.refused) == {"outlier", "broken"} and e.value.applied == ["ok"]
    assert "infinite" in e.value.refused["broken"] and "1e+09" in e.value.refused["outlier"]
    assert f.item_ids == ["ok"] and len(f) == 1
    f.update(["outlier"], [old_outlier[10:]])      # without the faulty value it is accepted
    assert f.item_ids == ["ok", "outlier"]
    # a series on a huge scale is normalised by float64 statistics (as the library does), so it
    # streams and forecasts on its own scale instead of being refused
    huge = _walk(40, 3) * np.float32(1e24)
    f.update(["huge"], [huge])
    samples = f.forecast(["huge"]).samples
    assert np.isfinite(samples).all() and 1e22 < np.abs(samples).mean() < 1e27


def test_a_state_is_never_left_non_finite(exported, monkeypatch):
    """Fault injection: the update graph returns NaN for the first series of a batch; that
    series is rolled back (whole update, refresh included), the other applied."""
    _, _, out = exported
    f, ref = rt.StreamingForecaster(out), rt.StreamingForecaster(out)
    for g in (f, ref):
        g.update(["a", "b"], [_walk(20, 5), _walk(20, 6)])
    run_update = f._run_update

    def poisoned(feats, start, ks, vs):
        ks, vs = run_update(feats, start, ks, vs)
        ks[0][:, 0] = np.nan
        return ks, vs

    monkeypatch.setattr(f, "_run_update", poisoned)
    with pytest.raises(rt.SeriesRefused, match="series 'a': this update would leave its state non-finite") as e:
        f.update(["a", "b"], [_walk(12, 7), _walk(12, 8)])     # crosses the refresh at 32 observations
    assert e.value.applied == ["b"]
    monkeypatch.undo()
    ref.update(["b"], [_walk(12, 8)])
    noise = np.random.default_rng(1).normal(size=(1, 5, H)).astype(np.float32)
    assert _same_forecast(f, ref, "a", noise) and _same_forecast(f, ref, "b", noise)
    assert f.observation_count("a") == 20


def test_forecasts_are_never_non_finite(exported):
    _, _, out = exported
    f = rt.StreamingForecaster(out, refresh="none")
    f.update(["a", "b"], [_walk(40, 9), _walk(40, 10)])
    f.scale[f._slot["b"]] = 3e38          # a scale whose samples overflow float32
    with pytest.raises(rt.StreamingError, match="forecast of series 'b' is not finite") as e:
        f.forecast(["a", "b"], num_samples=4, seed=0)
    assert "\n" not in str(e.value)
    assert np.isfinite(f.forecast(["a"], num_samples=4, seed=0).samples).all()


def test_reset_series_forgets_a_series(exported, tmp_path):
    _, _, out = exported
    f = rt.StreamingForecaster(out)
    f.update(["a", "b", "c"], [_walk(50, 11), _walk(30, 12), _walk(9, 13)])
    noise = np.random.default_rng(2).normal(size=(1, 5, H)).astype(np.float32)
    c_before = f.forecast(["c"], noise=noise).samples
    assert f.reset_series(["b", "nope", "b"]) == ["b"]
    assert f.item_ids == ["a", "c"] and "b" not in f and len(f) == 2
    assert np.array_equal(f.forecast(["c"], noise=noise).samples, c_before)
    with pytest.raises(rt.StreamingError, match="unknown series 'b'"):
        f.forecast(["b"])
    fresh = rt.StreamingForecaster(out)
    for g in (f, fresh):
        g.update(["b"], [_walk(25, 14, level=900.0)])   # a new level: re-initialised from these values
    assert _same_forecast(f, fresh, "b", noise) and f.observation_count("b") == 25
    f.save_state(tmp_path / "s.npz")
    g = rt.StreamingForecaster(out)
    g.load_state(tmp_path / "s.npz")
    assert g.item_ids == ["a", "c", "b"] and _same_forecast(f, g, "c", noise) and _same_forecast(f, g, "b", noise)


def test_damaged_state_files_are_refused_in_one_line(exported, tmp_path):
    """Truncated or bit-flipped: one StreamingError line naming the file, or (a flip in zip
    bookkeeping the reader ignores) the very same state; the checksum catches a payload
    rewritten consistently."""
    _, _, out = exported
    f = rt.StreamingForecaster(out)
    f.update(["a", "b"], [_walk(50, 15), _walk(20, 16)])
    good = tmp_path / "state.npz"
    f.save_state(good, extra={"k": 1})
    data = good.read_bytes()
    noise = np.random.default_rng(3).normal(size=(1, 4, H)).astype(np.float32)
    g = rt.StreamingForecaster(out)
    bad = tmp_path / "bad.npz"
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        bad.write_bytes(data[:cut])
        with pytest.raises(rt.StreamingError, match="bad.npz is not a tsdb-streaming state file or is damaged") as e:
            g.load_state(bad)
        assert "\n" not in str(e.value)
    refused = 0
    for pos in np.linspace(0, len(data) - 1, 97).astype(int):
        flipped = bytearray(data)
        flipped[pos] ^= 1 << (pos % 8)
        bad.write_bytes(bytes(flipped))
        try:
            g.load_state(bad)
        except rt.StreamingError as e:
            assert "bad.npz" in str(e) and "\n" not in str(e)
            refused += 1
            continue
        assert g.item_ids == ["a", "b"] and _same_forecast(f, g, "a", noise) and _same_forecast(f, g, "b", noise)
    assert refused >= 90
    # a payload rewritten with valid zip and npy framing but changed numbers: only the checksum sees it
    with np.load(good) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["loc"] = arrays["loc"] + 1
    np.savez(bad, **arrays)
    with pytest.raises(rt.StreamingError, match="bad.npz is damaged: its sha256 checksum does not match"):
        g.load_state(bad)
    # a version 1 file (no checksum, written before checksums) still loads
    del arrays["sha256"]
    arrays["loc"] = arrays["loc"] - 1
    header = json.loads(bytes(arrays["header"]).decode())
    arrays["header"] = np.frombuffer(json.dumps({**header, "version": 1}).encode(), np.uint8)
    np.savez(bad, **arrays)
    assert g.load_state(bad) == {"k": 1} and _same_forecast(f, g, "a", noise)


class _RenamedFormat(rt.DepthStreamingForecaster):
    """A format registered by a test: the registry, not a name check, picks the class."""


rt.register_format("tsdb-test-renamed-format")(_RenamedFormat)


def test_the_registry_picks_the_class_from_the_metadata_format(exported, tmp_path):
    _, _, out = exported
    copy = tmp_path / "m"
    shutil.copytree(out, copy)
    meta = json.loads((copy / "tsdb_model.json").read_text())
    (copy / "tsdb_model.json").write_text(json.dumps({**meta, "format": "tsdb-test-renamed-format"}))
    f = rt.StreamingForecaster(copy, refresh="none")
    assert type(f) is _RenamedFormat and type(rt.load(out)) is rt.DepthStreamingForecaster
    g = rt.StreamingForecaster(out, refresh="none")
    for h in (f, g):
        h.update(["s"], [_walk(40, 17)])
    noise = np.random.default_rng(4).normal(size=(1, 3, H)).astype(np.float32)
    assert _same_forecast(f, g, "s", noise)
    with pytest.raises(rt.StreamingError, match="open it with StreamingForecaster"):
        rt.HorizonStreamingForecaster(out)


def test_metadata_is_validated_on_load(exported, tmp_path):
    _, _, out = exported
    copy = tmp_path / "m"
    shutil.copytree(out, copy)
    meta = json.loads((copy / "tsdb_model.json").read_text())
    (copy / "tsdb_model.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(rt.StreamingError, match="format version 99"):
        rt.StreamingForecaster(copy)
    (copy / "tsdb_model.json").write_text(json.dumps(meta))
    with open(copy / "denoise_1.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(rt.StreamingError, match="checksum"):
        rt.StreamingForecaster(copy)
    with pytest.raises(rt.StreamingError, match="no tsdb_model.json"):
        rt.StreamingForecaster(tmp_path)


def test_runtime_takes_each_step_with_the_block_the_schedule_names(exported):
    """Counted by wrapping the runtime's per-block graphs."""
    strat, _, out = exported
    meta = load_metadata(out)
    f = rt.StreamingForecaster(out, refresh="none")
    f.update(["s"], [np.arange(40, dtype=np.float32)])
    calls = []

    class Counted:
        def __init__(self, i, session):
            self.i, self.session = i, session

        def run(self, *args, **kwargs):
            calls.append(self.i)
            return self.session.run(*args, **kwargs)

    f._denoise = [Counted(i, s) for i, s in enumerate(f._denoise)]
    nb = meta["shapes"]["n_blocks"]
    steps = [int(k) for k in meta["schedules"] if int(k) % nb == 0]
    assert len(steps) >= 3
    for k in steps:
        calls.clear()
        f.forecast(["s"], num_samples=2, seed=0, num_steps=k)
        assert calls == expected_calls(nb, k, meta["sampler"]), k


def test_looped_core_is_one_graph_looped_on_the_host(tmp_path_factory):
    """The looped strategy exports one core application (prelude caches in the state) and
    the runtime takes K Euler steps with it."""
    strat, model, out = export_tiny(tmp_path_factory, "looped")
    meta = load_metadata(out)
    assert meta["sampler"] == "euler" and len(meta["graphs"]["denoise"]) == 1
    assert meta["shapes"]["layers_per_block"] == [4] and meta["shapes"]["core_layers"] == [2]
    history = (np.random.default_rng(3).normal(size=140).cumsum() + 9).astype(np.float32)
    f = rt.StreamingForecaster(out, refresh="none")
    f.update(["s"], [history[:60]])
    f.update(["s"], [history[60:139]])
    f.update(["s"], [history[139:]])
    state = torch_stream(model, history, 60, [79, 1])
    noise = np.random.default_rng(4).normal(size=(1, 9, H)).astype(np.float32)
    got = f.forecast(["s"], noise=noise, normalized=True).samples
    want = st.forecast(model, state, torch.from_numpy(noise), strat.schedule(4), sampler="euler",
                       normalized=True)
    assert np.abs(got - want.numpy()).max() < TOL
    # K is a runtime knob: another exported grid
    assert f.forecast(["s"], num_samples=4, seed=0, num_steps=8).samples.shape == (1, 4, H)


# ---------------------------------------------------------------------------------------
# tsdb stream
# ---------------------------------------------------------------------------------------

def test_stream_writes_one_line_per_record_and_rejects_bad_ones(exported):
    _, _, out = exported
    good = records(12)
    bad = [
        {"item_id": "a", "timestamp": good[-2]["timestamp"], "value": 1.0},        # duplicate
        {"item_id": "a", "timestamp": "2021-03-01 00:15:00", "value": 1.0},        # out of order
        {"item_id": "a", "timestamp": "2021-03-01 05:00:00", "value": 1.0},        # gap
        {"item_id": "b", "timestamp": 12, "value": float("inf")},                   # infinite
        {"item_id": "b", "timestamp": 12, "value": "high"},                         # not a number
        {"item_id": "b", "timestamp": 12},                                          # missing field
        "{not json",
    ]
    follow = [{"item_id": "a", "timestamp": "2021-03-01 03:00:00", "value": 9.0},
              {"item_id": "b", "timestamp": 12, "value": 9.0}]
    counts, lines = stream(out, good + bad + follow)
    assert counts == {"records": 33, "forecasts": 26, "errors": 7, "series": 2}
    errors = [line["error"] for line in lines[24:31]]
    for e, word in zip(errors, ["duplicate", "out-of-order", "gap", "finite number", "finite number",
                                "missing field", "invalid JSON"]):
        assert word in e
    assert lines[24]["line"] == 25 and lines[24]["item_id"] == "a"
    fc = lines[-1]
    assert fc["item_id"] == "b" and fc["observations"] == 13 and len(fc["mean"]) == H
    assert fc["forecast_timestamps"][:2] == [13, 14]
    assert sorted(fc["quantiles"]) == ["0.1", "0.5", "0.9"]
    assert lines[-2]["forecast_timestamps"][0] == "2021-03-01 03:15:00"
    # the bad records left the state alone: same forecasts as without them
    _, clean = stream(out, good + follow)
    assert clean[-2:] == lines[-2:]


def test_stream_checkpoint_resume_and_replay(exported, tmp_path):
    _, _, out = exported
    recs = records(25)
    _, full = stream(out, recs)
    state = tmp_path / "state.npz"
    _, first = stream(out, recs[:21], state_path=state, checkpoint_every=4)
    _, second = stream(out, recs[21:], state_path=state)
    assert first + second == full
    # replaying everything after a restart applies nothing twice
    counts, again = stream(out, recs, state_path=state)
    assert counts["forecasts"] == 0 and counts["errors"] == len(recs)
    # batching consecutive records does not change anything
    _, batched = stream(out, recs, batch_size=8)
    assert batched == full


def test_stream_rejects_a_state_from_another_model(exported, tmp_path):
    _, _, out = exported
    state = tmp_path / "s.npz"
    stream(out, records(3), state_path=state)
    other = tmp_path / "other"
    shutil.copytree(out, other)
    meta = json.loads((other / "tsdb_model.json").read_text())
    (other / "tsdb_model.json").write_text(json.dumps({**meta, "model_id": "0" * 16}))
    with pytest.raises(TsdbError, match="saved for model"):
        stream(other, records(3), state_path=state)


# ---------------------------------------------------------------------------------------
# the runtime without torch
# ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_runtime_in_a_fresh_venv_without_torch(exported, tmp_path):
    """Build a plain venv, install onnxruntime + numpy + streaming/ (no torch), serve the model.

    No wall-clock limit: a venv and a pip install take what a busy machine gives them."""
    strat, model, out = exported
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    pkg = tmp_path / "pkg"
    shutil.copytree(REPO / "streaming", pkg, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-input", "--disable-pip-version-check",
                          "onnxruntime", "numpy", str(pkg)], capture_output=True, text=True)
    if pip.returncode and "No matching distribution" in pip.stderr:
        pytest.skip(f"onnxruntime/numpy not installable here: {pip.stderr[-300:]}")
    assert pip.returncode == 0, pip.stderr[-2000:]
    history = (np.random.default_rng(4).normal(size=77).cumsum() + 5).astype(np.float32)
    noise = np.random.default_rng(5).normal(size=(1, 12, H)).astype(np.float32)
    np.save(tmp_path / "history.npy", history)
    np.save(tmp_path / "noise.npy", noise)
    # a horizon export too (B = 2 chunks of c = H / 2), with all its noise given
    import tsdb.strategies.horizon.streaming as sh
    from tsdb.strategies.horizon.export import export_horizon_model

    hstrat, hmodel = randomized_model("horizon", 2, context_length=C, horizon=H, patch_length=P)
    hkw = sh.sampler_kwargs(hstrat)
    export_horizon_model(hmodel, hstrat, tmp_path / "hz")
    hn = {k: np.random.default_rng(i).normal(size=(1, 3, n)).astype(np.float32)
          for i, (k, n) in enumerate((("init", 2 * H), ("roll", 77 - 50), ("fc", H + H // 2)))}
    np.savez(tmp_path / "hnoise.npz", **hn)
    script = textwrap.dedent(f"""
        import importlib.util, sys
        import numpy as np
        assert importlib.util.find_spec("torch") is None, "torch is importable"
        from tsdb_streaming import StreamingForecaster
        f = StreamingForecaster({str(out)!r}, refresh="none")
        h = np.load({str(tmp_path / "history.npy")!r})
        f.update(["s"], [h[:50]])
        for x in h[50:]:
            f.update(["s"], [x])
        fc = f.forecast(["s"], noise=np.load({str(tmp_path / "noise.npy")!r}), normalized=True)
        np.save({str(tmp_path / "samples.npy")!r}, fc.samples)
        hn = np.load({str(tmp_path / "hnoise.npz")!r})
        g = StreamingForecaster({str(tmp_path / "hz")!r}, refresh="none", num_samples=3)
        assert type(g).__name__ == "HorizonStreamingForecaster"
        g.update(["s"], [h[:50]], init_noise=hn["init"])
        g.update(["s"], [h[50:]], noise=hn["roll"])
        np.save({str(tmp_path / "hsamples.npy")!r}, g.forecast(["s"], noise=hn["fc"], normalized=True).samples)
        assert "torch" not in sys.modules
        print("ok")
    """)
    run = subprocess.run([str(py), "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
    state = torch_stream(model, history, 50, [1] * 27)
    want = st.forecast(model, state, torch.from_numpy(noise), strat.schedule(4), normalized=True)
    assert np.abs(np.load(tmp_path / "samples.npy") - want.numpy()).max() < TOL
    t = torch.from_numpy(history)[None]
    hstate = sh.init_state(hmodel, t[:, :50], 3, torch.from_numpy(hn["init"]), **hkw)
    hstate = sh.update(hmodel, hstate, t[:, 50:], torch.from_numpy(hn["roll"]), **hkw)
    hwant = sh.forecast(hmodel, hstate, torch.from_numpy(hn["fc"]), normalized=True, **hkw)
    assert np.abs(np.load(tmp_path / "hsamples.npy") - hwant.numpy()).max() < TOL


def test_streaming_bench_smoke(tmp_path):
    from tsdb.bench.streaming import run_streaming_bench

    cfg = dict(strategy="e2e", context_length=C, horizon=H, patch_length=P, d_model=16, n_heads=2, n_layers=1,
               n_blocks=1, num_steps=2)
    res = run_streaming_bench(tmp_path, context_lengths=(32, 96), extra_lengths=(), num_samples=4, updates=2,
                              warmup=1, model_cfg=cfg)
    assert [r["history"] for r in res["rows"]] == [32, 96]
    assert res["summary"]["parity_ort_vs_torch"] < TOL and res["summary"]["parity_stream_vs_recompute"] < TOL
    assert {p.name for p in tmp_path.iterdir()} == {"results.json", "report.md", "latency.png"}
    assert "ORT streaming" in (tmp_path / "report.md").read_text()


def test_a_model_with_a_seasonal_prior_is_refused_with_the_way_out(tmp_path):
    from tsdb.strategies.depth.export import export_model

    strategy, model = randomized_model("depth", context_length=32, horizon=16, patch_length=8, seasonal_prior=8)
    with pytest.raises(TsdbError, match="seasonal_prior = 8 cannot be exported yet.*forecast it with torch"):
        export_model(model, strategy, tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow   # its own ONNX export (tens of seconds)
def test_runtime_matches_pytorch_streaming_with_a_location_window(tmp_path_factory):
    """A window centred on its recent level (what `tsdb forecast` chooses for seasonal data)
    exports with its own rule; the runtime's frozen location is the torch stream's, and a
    runtime-side metadata edit that drops the window is refused."""
    strat, model, out = export_tiny(tmp_path_factory, "depth", location_window=6)
    norm = load_metadata(out)["normalization"]
    assert (norm["rule"], norm["location_window"]) == ("frozen-at-init-recent-location", 6)
    check_runtime_parity(strat, model, out)
    history = (np.arange(40, dtype=np.float32) * 3.0 + 5)[None]
    f = rt.StreamingForecaster(out, refresh="none")
    f.update(["s"], list(history))
    torch_loc = st.init_state(model, torch.from_numpy(history)).loc
    assert f.loc[f._slots(["s"])[0], 0] == pytest.approx(torch_loc.item())
    assert torch_loc.item() == pytest.approx(float(history[0, -6:].mean()))   # the last 6 values, not all 40
    meta = json.loads((out / "tsdb_model.json").read_text())
    del meta["normalization"]["location_window"]
    (out / "tsdb_model.json").write_text(json.dumps(meta))
    with pytest.raises(rt.StreamingError, match="recent-location.*location_window 0"):
        rt.StreamingForecaster(out)
