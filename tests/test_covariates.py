"""Known-future dynamic real covariates: data stream, every strategy, evaluation, streaming,
ONNX, the covariates benchmark, and an unchanged path for models without covariates."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import tsdb.strategies.depth.streaming as st
from tsdb.cli.main import main as cli_main
from tsdb.config import ExperimentConfig
from tsdb.data.series import Series, SeriesDataset
from tsdb.data.windows import TrainingWindows
from tsdb.errors import DataError, TsdbError
from tsdb.evaluation.tasks import evaluate_predictor, rolling_task
from tsdb.bench.experiment import torch_predictor
from tsdb.strategies.depth.export import export_model
from tsdb.nn.denoiser import CovariateFeatures
from tsdb.cli.stream import import_runtime
from tsdb.training.loop import train_model

from conftest import randomized_model

P, C, H = 4, 32, 16
STRATEGIES = ["depth", "e2e", "horizon", "looped", "looped-bptt"]


def tiny(strategy="depth", num_covariates=0, seed=0, **kw):
    return randomized_model(strategy, seed, context_length=C, horizon=H, patch_length=P,
                            num_covariates=num_covariates, **kw)


def dataset(n_series=2, length=160, n_cov=2, seed=0, name="cov") -> SeriesDataset:
    """Series driven by their covariates (target = 3 * cov_0 - cov_1 + noise)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_series):
        cov = rng.normal(size=(n_cov, length)).cumsum(-1).astype(np.float32)
        target = (3 * cov[0] - (cov[1] if n_cov > 1 else 0) + 0.1 * rng.normal(size=length)).astype(np.float32)
        out.append(Series(f"s{i}", target, pd.Period("2021-01-01 00:00", "h"), "h", cov,
                          {"covariates": [f"c{j}" for j in range(n_cov)]}))
    return SeriesDataset(name, out, "h", season_length=24)


def batch_of(ds, n_cov, size=8, seed=3):
    w = TrainingWindows(ds, C, H, seed=seed, patch_length=P, partial_patch_prob=0.5, covariates=n_cov)
    return next(iter(torch.utils.data.DataLoader(w, batch_size=size)))


# -- the path without covariates ----------------------------------------------------------

def test_no_covariate_path_unchanged():
    """num_covariates = 0: the parameters of before (no covariate weights, context_embed over
    2 channels); the data stream is the covariate stream minus its covariates (covariates use
    no random numbers); and a covariate model whose covariate weights are zero forecasts
    exactly what the same weights without covariates forecast."""
    strat0, m0 = tiny("depth", 0)
    strat1, m1 = tiny("depth", 1)
    s0 = {k: tuple(v.shape) for k, v in m0.state_dict().items()}
    s1 = {k: tuple(v.shape) for k, v in m1.state_dict().items()}
    assert not any("covariate" in k for k in s0)
    extra = {k for k in s1 if k not in s0}
    assert extra == {f"blocks.{i}.covariate_embed.{p}" for i in range(2) for p in ("weight", "bias")}
    assert {k: v for k, v in s1.items() if k in s0 and "context_embed.weight" not in k} == \
        {k: v for k, v in s0.items() if "context_embed.weight" not in k}
    assert s0["blocks.0.context_embed.weight"] == (32, 2 * P) and s1["blocks.0.context_embed.weight"] == (32, 3 * P)

    ds = dataset(n_cov=1)
    plain = TrainingWindows(ds, C, H, seed=5, patch_length=P, partial_patch_prob=0.5)
    with_cov = TrainingWindows(ds, C, H, seed=5, patch_length=P, partial_patch_prob=0.5, covariates=1)
    for a, b in zip(list(zip(range(20), plain)), list(zip(range(20), with_cov))):
        assert len(a[1]) == 3 and len(b[1]) == 4
        for x, y in zip(a[1], b[1][:3]):
            np.testing.assert_array_equal(x, y)
    batch = batch_of(ds, 1)
    features, *_ = m0.prepare(*batch[:3])
    assert isinstance(features, torch.Tensor) and features.shape == (8, C, 2)
    assert isinstance(m1.prepare(*batch)[0], CovariateFeatures)

    # the covariate model with zero covariate weights equals the plain model, to rounding
    with torch.no_grad():
        sd = m1.state_dict()
        for k, v in m0.state_dict().items():
            if "context_embed.weight" in k:
                w = torch.zeros_like(sd[k]).view(32, P, 3)
                w[:, :, :2] = v.view(32, P, 2)
                sd[k] = w.view(32, 3 * P)
            else:
                sd[k] = v
        for k in extra:
            sd[k] = torch.zeros_like(sd[k])
        m1.load_state_dict(sd)
    noise = torch.randn(8, 5, H, generator=torch.Generator().manual_seed(0))
    y0 = strat0.forecast(m0, batch[0], 5, noise=noise)
    y0_none = strat0.forecast(m0, batch[0], 5, noise=noise, covariates=None)
    y1 = strat1.forecast(m1, batch[0], 5, noise=noise, covariates=batch[3])
    assert torch.equal(y0, y0_none)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-4)


# -- covariates matter ----------------------------------------------------------------------

def test_covariate_values_change_forecasts():
    strat, model = tiny("depth", 2)
    ds = dataset()
    ctx, _, _, cov = batch_of(ds, 2)
    noise = torch.randn(8, 5, H, generator=torch.Generator().manual_seed(0))
    base = strat.forecast(model, ctx, 5, noise=noise, covariates=cov)
    assert torch.equal(base, strat.forecast(model, ctx, 5, noise=noise, covariates=cov.clone()))
    future, past = cov.clone(), cov.clone()
    future[:, 0, C:] += 2.0 * cov[:, 0, :C].nan_to_num().std()
    past[:, 1, : C // 2] *= -1
    for changed in (future, past):
        delta = (strat.forecast(model, ctx, 5, noise=noise, covariates=changed) - base).abs()
        assert delta.mean() > 1e-3 * base.abs().mean()
    # a model with covariates refuses to forecast without them, and vice versa, in one line
    with pytest.raises(TsdbError, match="takes 2 covariate"):
        strat.forecast(model, ctx, 5, noise=noise)
    with pytest.raises(TsdbError, match="num_covariates"):
        tiny("depth", 0)[0].forecast(tiny("depth", 0)[1], ctx, 5, covariates=cov)
    with pytest.raises(TsdbError, match=r"\[8, 2, 48\]"):
        strat.forecast(model, ctx, 5, covariates=cov[:, :, :-1])


def test_nan_covariates_are_a_data_error_naming_the_series(tmp_path):
    ds = dataset()
    ds.series[1].past_covariates[0, 37] = np.nan
    with pytest.raises(DataError, match=r"series 's1': covariate 'c0' is nan at .*position 37"):
        TrainingWindows(ds, C, H, covariates=2)
    cfg = ExperimentConfig().with_overrides(
        model=dict(context_length=C, horizon=H, patch_length=P, d_model=16, n_heads=2, n_layers=2, n_blocks=2,
                   num_covariates=2),
        train=dict(steps_per_block=3, batch_size=4, warmup_steps=1, progress=False, accelerator="cpu"))
    with pytest.raises(DataError, match="series 's1'"):
        train_model(cfg, ds, tmp_path / "run")
    plain = dataset(n_cov=1)
    plain.series[0].past_covariates = None
    with pytest.raises(DataError, match="series 's0' has no covariates"):
        TrainingWindows(plain, C, H, covariates=1)
    with pytest.raises(DataError, match="series 's0' has 2 covariate"):
        TrainingWindows(dataset(), C, H, covariates=1)
    # known-future values handed to a forecast must be finite
    strat, model = tiny("depth", 2)
    ctx, _, _, cov = batch_of(dataset(), 2)
    cov[2, 1, C + 3] = np.nan
    with pytest.raises(DataError, match="finite"):
        strat.forecast(model, ctx, 3, covariates=cov)


# -- every strategy ---------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_trains_and_forecasts_with_covariates(strategy, tmp_path):
    ds = dataset()
    cfg = ExperimentConfig().with_overrides(
        model=dict(strategy=strategy, context_length=C, horizon=H, patch_length=P, d_model=16, n_heads=2,
                   n_layers=2, n_blocks=2, num_steps=4, loop_iters=2, num_covariates=2),
        train=dict(steps_per_block=3, batch_size=4, warmup_steps=1, progress=False, accelerator="cpu"))
    model, summary = train_model(cfg, ds, tmp_path / "run")
    assert all(u["steps"] == 3 for u in summary["units"].values())
    assert (tmp_path / "run" / "model.pt").exists()
    from tsdb.strategies import get_strategy
    strat = get_strategy(cfg.model)
    ctx, _, _, cov = batch_of(ds, 2, size=3)
    g = torch.Generator().manual_seed(0)
    y = strat.forecast(model.eval(), ctx, 4, generator=g, covariates=cov)
    assert y.shape == (3, 4, H) and torch.isfinite(y).all()
    cov2 = cov.clone()
    cov2[:, :, C:] += 5.0
    y2 = strat.forecast(model, ctx, 4, generator=torch.Generator().manual_seed(0), covariates=cov2)
    assert not torch.equal(y, y2)


# -- evaluation -----------------------------------------------------------------------------

def test_eval_task_covariates_and_predictor():
    ds = dataset(length=120)
    task = rolling_task("cov", ds, H, 24, offset=-H - 8, windows=2, stride=8)
    cov = task.covariates(C)
    assert cov.shape == (4, 2, C + H)
    s0 = ds.series[0].past_covariates
    np.testing.assert_array_equal(cov[0], s0[:, 120 - H - 8 - C:120 - 8])   # window 0 of series 0
    np.testing.assert_array_equal(cov[1], s0[:, 120 - H - C:])             # window 1 (the last)
    long = task.covariates(200)                                           # left-padded with NaN
    assert np.isnan(long[0, :, : 200 - (120 - H - 8)]).all() and np.isfinite(long[0, :, 200 - (120 - H - 8):]).all()

    strat, model = tiny("depth", 2)
    seen = []

    def predictor(contexts, num_samples, covariates=None):
        seen.append(covariates.shape)
        return torch_predictor(strat, model)(contexts, num_samples, covariates=covariates)

    m = evaluate_predictor(task, predictor, C, num_samples=4, batch_size=3, num_covariates=2)
    assert seen == [(3, 2, C + H), (1, 2, C + H)]
    assert m["num_windows"] == 4 and np.isfinite(m["crps"]) and m["covariate_future"] == "observed (oracle)"
    no_cov = SeriesDataset("plain", [Series("p", s.target, s.start, s.freq) for s in ds], "h")
    with pytest.raises(DataError, match="series 'p' has no covariates"):
        rolling_task("plain", no_cov, H, 24, offset=-H).covariates(C)


# -- streaming and ONNX ------------------------------------------------------------------------

def _stream(model, history, cov, t0, rng):
    state = st.init_state(model, history[:, :t0], covariates=cov[:, :, :t0])
    t, total = t0, history.shape[1]
    while t < total:
        n = int(min(rng.integers(1, 2 * P + 2), total - t))
        state = st.update(model, state, history[:, t:t + n], covariates=cov[:, :, t:t + n])
        t += n
    return state


@pytest.mark.parametrize("strategy,t0,total", [("depth", 6, 90), ("depth", 40, 163), ("looped", 150, 301)])
def test_streaming_parity_with_covariates(strategy, t0, total):
    """update-then-forecast == recompute from the full history (with covariates), through
    window eviction and mid-patch ends; refresh == init from the whole history."""
    strat, model = tiny(strategy, 2)
    rng = np.random.default_rng(t0)
    history = torch.from_numpy(rng.normal(size=(3, total)).cumsum(-1).astype(np.float32)) * 3 + 10
    cov = torch.from_numpy(rng.normal(size=(3, 2, total + H)).astype(np.float32)) * 5 + 20
    state = _stream(model, history, cov, t0, rng)
    noise = torch.randn(3, 7, H, generator=torch.Generator().manual_seed(1))
    schedule, sampler = strat.schedule(4), strat.sampler
    got = st.forecast(model, state, noise, schedule, sampler, normalized=True, covariates=cov[:, :, total:])
    ref = st.recompute_forecast(model, history, noise, schedule, sampler, pending=(total - t0) % P,
                                loc=state.loc, scale=state.scale, next_token=int(state.tokens[0]),
                                normalized=True, covariates=cov, cov_loc=state.cov_loc, cov_scale=state.cov_scale,
                                init_length=t0)
    assert (got - ref).abs().max() < 1e-4
    other = cov.clone()
    other[:, :, total:] -= 10
    assert (st.forecast(model, state, noise, schedule, sampler, normalized=True, covariates=other[:, :, total:])
            - got).abs().max() > 1e-3
    # refresh from the state's own recent values == init from the whole history
    fresh = st.refresh(model, state)
    whole = st.init_state(model, history, covariates=cov[:, :, :total])
    for name in ("loc", "scale", "cov_loc", "cov_scale", "tokens", "cov_pending", "cov_recent"):
        assert torch.equal(getattr(fresh, name).nan_to_num(-1.0), getattr(whole, name).nan_to_num(-1.0)), name
    a = st.forecast(model, fresh, noise, schedule, sampler, covariates=cov[:, :, total:])
    b = st.forecast(model, whole, noise, schedule, sampler, covariates=cov[:, :, total:])
    assert (a - b).abs().max() < 1e-4 * b.abs().max()


def test_streaming_equals_batch_sampling_with_covariates():
    """A history of exactly context_length values: streaming forecast == DiffusionForecaster.sample."""
    strat, model = tiny("depth", 2)
    g = torch.Generator().manual_seed(4)
    h, cov = torch.randn(2, C, generator=g) * 4 + 3, torch.randn(2, 2, C + H, generator=g) * 2 - 1
    noise = torch.randn(2, 5, H, generator=g)
    state = st.init_state(model, h, covariates=cov[:, :, :C])
    a = st.forecast(model, state, noise, strat.schedule(4), "heun", covariates=cov[:, :, C:])
    b = strat.forecast(model, h, 5, noise=noise, covariates=cov)
    assert (a - b).abs().max() < 1e-3
    with pytest.raises(TsdbError, match="covariate"):
        st.update(model, state, h[:, :3])
    with pytest.raises(TsdbError, match="covariate"):
        st.forecast(model, state, noise, strat.schedule(4))


def test_onnx_parity_with_covariates(tmp_path):
    """Exported depth model with 2 covariates: the torch-free runtime (ORT + numpy) equals the
    PyTorch streaming state, update by update, and survives save/load and refresh."""
    rt = import_runtime()
    strat, model = tiny("depth", 2)
    meta = export_model(model, strat, tmp_path / "onnx")
    assert meta["shapes"]["num_covariates"] == 2 and meta["shapes"]["context_channels"] == 4
    assert meta["graphs"]["denoise"][0]["inputs"][-1] == "future_covariates"
    rng = np.random.default_rng(0)
    total = 120
    hist = (rng.normal(size=(2, total)).cumsum(-1) * 4 + 50).astype(np.float32)
    cov = (rng.normal(size=(2, 2, total + H)) * 3 + 15).astype(np.float32)
    f = rt.StreamingForecaster(tmp_path / "onnx", refresh="none")
    t = [10, 45]
    f.update(["a", "b"], [hist[j, :t[j]] for j in range(2)], covariates=[cov[j, :, :t[j]] for j in range(2)])
    states = [st.init_state(model, torch.from_numpy(hist[j:j + 1, :t[j]]),
                            covariates=torch.from_numpy(cov[j:j + 1, :, :t[j]])) for j in range(2)]
    while min(t) < total:
        vals, covs = [], []
        for j in range(2):
            n = int(min(rng.integers(0, 6), total - t[j]))
            vals.append(hist[j, t[j]:t[j] + n])
            covs.append(cov[j, :, t[j]:t[j] + n])
            if n:
                states[j] = st.update(model, states[j], torch.from_numpy(hist[j:j + 1, t[j]:t[j] + n]),
                                      covariates=torch.from_numpy(cov[j:j + 1, :, t[j]:t[j] + n]))
            t[j] += n
        f.update(["a", "b"], vals, covariates=covs)
    noise = rng.normal(size=(2, 9, H)).astype(np.float32)
    future = cov[:, :, total:]
    fc = f.forecast(["a", "b"], noise=noise, normalized=True, covariates=future)
    schedule = strat.schedule(4)
    for j in range(2):
        y = st.forecast(model, states[j], torch.from_numpy(noise[j:j + 1]), schedule, "heun", normalized=True,
                        covariates=torch.from_numpy(future[j:j + 1]))
        assert np.abs(fc.samples[j] - y[0].numpy()).max() < 1e-4
    f.save_state(tmp_path / "state.npz")
    g = rt.StreamingForecaster(tmp_path / "onnx", refresh="none")
    g.load_state(tmp_path / "state.npz")
    assert np.array_equal(g.forecast(["a", "b"], noise=noise, normalized=True, covariates=future).samples,
                          fc.samples)
    g.refresh_series(["a"])
    ref = st.refresh(model, states[0])
    y = st.forecast(model, ref, torch.from_numpy(noise[:1]), schedule, "heun", normalized=True,
                    covariates=torch.from_numpy(future[:1]))
    assert np.abs(g.forecast(["a"], noise=noise[:1], normalized=True, covariates=future[:1]).samples[0]
                  - y[0].numpy()).max() < 1e-4
    with pytest.raises(rt.StreamingError, match="covariate"):
        f.forecast(["a"], noise=noise[:1])
    with pytest.raises(rt.StreamingError, match="covariate"):
        f.update(["a"], [hist[0, :2]])


# -- the benchmark ----------------------------------------------------------------------------

def test_bench_covariates_tiny_budget(tmp_path):
    """`tsdb bench covariates` end to end on vic_elec with a 5-step budget and a tiny model."""
    from tsdb.bench.covariates import CONFIG
    import yaml
    spec = yaml.safe_load(CONFIG.read_text())
    spec["task"]["windows"] = 2
    spec["num_samples"] = 8
    spec["base"]["model"].update(context_length=96, d_model=16, n_heads=2, num_steps=4)
    spec["base"]["train"].update(steps_per_block=5, warmup_steps=1, accelerator="cpu")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(spec))
    out = tmp_path / "covariates"
    assert cli_main(["bench", "covariates", "--config", str(config), "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    arms = results["arms"]
    assert set(arms) == {"seasonal-naive", "depth-b4", "depth-b4-temperature"}
    assert arms["depth-b4-temperature"]["num_covariates"] == 1 and "num_covariates" not in arms["depth-b4"]
    assert arms["depth-b4"]["seeds"] == [0, 1, 2]
    per_seed = arms["depth-b4"]["per_seed"]
    assert per_seed["0"]["crps"] != per_seed["1"]["crps"]  # the seeds differ
    cov = results["covariates"]
    assert cov["seeds"]["2"]["ratio"] == pytest.approx(arms["depth-b4-temperature"]["per_seed"]["2"]["crps"]
                                                       / per_seed["2"]["crps"])
    assert cov["ratio_of_mean_crps"] == pytest.approx(cov["mean_crps_with"] / cov["mean_crps_without"])
    boot = cov["bootstrap"]   # the seed-averaged window scores, recomputed here from the arms' entries
    w = results["windows"]["abs_target"]
    assert boot["ratio"] == pytest.approx(sum(arms["depth-b4-temperature"]["window_scores"]["crps_num"])
                                          / sum(arms["depth-b4"]["window_scores"]["crps_num"]))
    assert boot["windows"] == len(w) == 2
    assert [c["role"] for c in results["comparisons"]].count("with vs without the covariate") == 1
    report = (out / "report.md").read_text()
    assert "oracle" in report.lower() and "ratio of means" in report and "Paired bootstrap over the 2 test windows" in report


def test_tsdb_stream_carries_covariates(tmp_path):
    """`tsdb stream` on a model with 2 covariates: each record's covariates enter the update
    and its future_covariates the forecast, exactly as the runtime's Python API; bad ones are
    one error line that leaves the series alone."""
    import io
    import json

    from tsdb.cli.stream import run_stream

    rt = import_runtime()
    strat, model = tiny("depth", 2)
    export_model(model, strat, tmp_path / "onnx")
    rng = np.random.default_rng(1)
    n = 30
    values = (rng.normal(size=n).cumsum() + 20).round(3)
    cov = (rng.normal(size=(2, n + H)) * 3 + 15).round(3)
    recs = [{"item_id": "a", "timestamp": t, "value": float(values[t]), "covariates": cov[:, t].tolist(),
             "future_covariates": cov[:, t + 1:t + 1 + H].tolist()} for t in range(n)]
    bad = [{**recs[-1], "timestamp": n, "covariates": [1.0]},                           # one of two
           {**recs[-1], "timestamp": n, "future_covariates": [[1.0] * H, [2.0] * 3]},    # short future
           {"item_id": "a", "timestamp": n, "value": 1.0}]                               # none at all
    out = io.StringIO()
    counts = run_stream(tmp_path / "onnx", io.StringIO("".join(json.dumps(r) + "\n" for r in recs + bad)), out,
                        num_samples=16, seed=3, refresh="none")
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert counts == {"records": n + 3, "forecasts": n, "errors": 3, "series": 1}
    assert "covariates must be a list of 2" in lines[n]["error"]
    assert "future_covariates must be 2 list(s) of 16" in lines[n + 1]["error"]
    assert "give covariates" in lines[n + 2]["error"]
    # the same stream through the runtime's Python API
    f = rt.StreamingForecaster(tmp_path / "onnx", refresh="none")
    for t in range(n):
        f.update(["a"], [[values[t]]], covariates=[cov[:, t:t + 1].astype(np.float32)])
    fc = f.forecast(["a"], num_samples=16, seed=[rt.series_seed(3, "a", n)],
                    covariates=cov[None, :, n:n + H].astype(np.float32))
    assert np.allclose(lines[n - 1]["mean"], fc.mean[0], atol=1e-4)
