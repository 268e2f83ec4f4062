"""sktime integration: the full check_estimator suite, one global model for panels, and
update without retraining through the streaming state."""

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("sktime")

from sktime.utils.estimator_checks import check_estimator  # noqa: E402

import tsdb.strategies.depth.streaming as streaming  # noqa: E402
from tsdb.data.windows import last_context  # noqa: E402
from tsdb.integrations.sktime import TsdbForecaster  # noqa: E402

DEPTH = TsdbForecaster.get_test_params()[0]  # the depth split


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def panel(n_instances=3, length=40, seed=0) -> pd.DataFrame:
    """A pd-multiindex panel of noisy sines, one column ``y``."""
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    frames = {f"s{i}": pd.DataFrame({"y": 10 + (i + 1) * np.sin(t / 3 + i) + 0.1 * rng.standard_normal(length)},
                                    index=pd.RangeIndex(length, name="time"))
              for i in range(n_instances)}
    return pd.concat(frames, names=["item"])


def test_check_estimator_passes_every_test():
    results = check_estimator(TsdbForecaster, raise_exceptions=True, verbose=False)
    failed = {name: outcome for name, outcome in results.items() if outcome != "PASSED"}
    assert not failed
    assert len(results) > 800  # 890 with sktime 1.2.0


def test_panel_is_one_global_model():
    y = panel()
    forecaster = TsdbForecaster(**DEPTH).fit(y, fh=[1, 2, 3])
    assert isinstance(forecaster.model_, torch.nn.Module)
    assert not hasattr(forecaster, "forecasters_")  # sktime did not vectorize over instances
    assert forecaster._stream_state.batch_size == 3
    pred = forecaster.predict()
    assert list(pred.index.get_level_values("item").unique()) == ["s0", "s1", "s2"]
    assert pred.index.names == ["item", "time"] and len(pred) == 9


def test_forecast_after_fit_is_tsdb_forecast_of_the_last_context():
    y = panel()
    forecaster = TsdbForecaster(**DEPTH).fit(y, fh=[1, 2, 3, 4])
    cfg = forecaster.config_
    contexts = torch.from_numpy(np.stack([last_context(y.loc[item, "y"].to_numpy(np.float32),
                                                       cfg.model.context_length) for item in ["s0", "s1", "s2"]]))
    samples = forecaster.strategy_.forecast(forecaster.model_, contexts, cfg.model.num_samples,
                                            generator=torch.Generator().manual_seed(cfg.train.seed)).numpy()
    expected = np.quantile(samples, 0.9, axis=1)[:, :4].reshape(-1)
    got = forecaster.predict_quantiles(alpha=[0.9])[("y", 0.9)].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_update_without_params_streams_and_does_not_retrain():
    y = panel(length=50)
    fit_part = y[y.index.get_level_values("time") < 40]
    # unequal new data per instance: s0 gets 3 values, s1 one, s2 none
    new = pd.concat([y.loc[["s0"]].iloc[40:43], y.loc[["s1"]].iloc[40:41]])
    forecaster = TsdbForecaster(**DEPTH).fit(fit_part, fh=[1, 2])
    model = forecaster.model_
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = forecaster._stream_state

    forecaster.update(new, update_params=False)
    assert forecaster.model_ is model
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())

    cfg = forecaster.config_.model
    values = {"s0": new.loc["s0", "y"].to_numpy(np.float32), "s1": new.loc["s1", "y"].to_numpy(np.float32)}
    expected_state = streaming.StreamingState.cat([
        streaming.update(model, state.select([0]), torch.from_numpy(values["s0"])[None]),
        streaming.update(model, state.select([1]), torch.from_numpy(values["s1"])[None]),
        state.select([2])])
    noise = torch.randn(3, cfg.num_samples, cfg.horizon,
                        generator=torch.Generator().manual_seed(forecaster.config_.train.seed))
    samples = streaming.forecast(model, expected_state, noise, forecaster.strategy_.schedule(cfg.inference_steps), cfg.sampler)
    pred = forecaster.predict()
    np.testing.assert_allclose(pred["y"].to_numpy(), np.median(samples.numpy(), axis=1)[:, :2].reshape(-1),
                               rtol=1e-4, atol=1e-4)
    # each instance is forecast from its own last time point
    assert pred.loc["s0"].index.tolist() == [43, 44] and pred.loc["s2"].index.tolist() == [40, 41]


def test_update_with_params_retrains_on_all_data():
    y = panel(n_instances=1, length=50).droplevel("item")
    forecaster = TsdbForecaster(**DEPTH).fit(y.iloc[:40], fh=[1])
    model = forecaster.model_
    forecaster.update(y.iloc[40:], update_params=True)
    assert forecaster.model_ is not model
    assert len(forecaster._cur_y) == 50


def test_non_streaming_strategy_forecasts_from_the_extended_history():
    y = panel(n_instances=1, length=50).droplevel("item")["y"]
    model = {**DEPTH["config"]["model"], "strategy": "horizon"}
    params = {**DEPTH, "config": {**DEPTH["config"], "model": model}, "context_length": 8}
    forecaster = TsdbForecaster(**params).fit(y.iloc[:40], fh=[1, 2])
    assert forecaster.config_.model.horizon == 4  # whole chunks of n_blocks patches
    assert forecaster._stream_state is None
    before = forecaster.predict()
    forecaster.update(y.iloc[40:45], update_params=False)
    cfg = forecaster.config_
    context = torch.from_numpy(last_context(y.to_numpy(np.float32)[:45], cfg.model.context_length))[None]
    samples = forecaster.strategy_.forecast(forecaster.model_, context, cfg.model.num_samples,
                                            generator=torch.Generator().manual_seed(cfg.train.seed)).numpy()
    after = forecaster.predict()
    np.testing.assert_allclose(after.to_numpy(), np.median(samples[0], axis=0)[:2], rtol=1e-4)
    assert after.index.tolist() == [45, 46] and before.index.tolist() == [40, 41]


def test_fh_beyond_the_model_horizon_is_a_clear_error():
    y = panel(n_instances=1).droplevel("item")
    forecaster = TsdbForecaster(**DEPTH).fit(y)  # no fh: the config's horizon, 6
    with pytest.raises(ValueError, match="horizon is 6"):
        forecaster.predict(fh=[7])


def test_long_pandas_frame_with_datetimes_and_unequal_ends():
    stamps = pd.date_range("2024-01-01", periods=30, freq="h")
    long = pd.DataFrame({"item_id": np.repeat(["a", "b"], 30), "timestamp": np.tile(stamps, 2),
                         "load": np.sin(np.arange(60) / 4)})
    y = long.set_index(["item_id", "timestamp"]).drop(index=[("b", stamps[-1]), ("b", stamps[-2])])
    pred = TsdbForecaster(**DEPTH).fit(y, fh=[1, 2]).predict_interval(coverage=0.8)
    assert pred.loc["a"].index.tolist() == list(pd.date_range("2024-01-02 06:00", periods=2, freq="h"))
    assert pred.loc["b"].index.tolist() == list(pd.date_range("2024-01-02 04:00", periods=2, freq="h"))
    assert (pred[("load", 0.8, "lower")] <= pred[("load", 0.8, "upper")]).all()


def test_exogenous_x_is_the_covariates_of_every_series_of_its_instance():
    """X columns become known-future covariates: a forecast equals tsdb's own
    strategy.forecast with covariates built from X (context part NaN-padded), streaming
    updates take X for the new points, and a missing X is a one-line error."""
    y = panel(length=46)
    t = y.index.get_level_values("time")
    X = pd.DataFrame({"temp": np.cos(t / 3.0) * 5 + np.repeat([0.0, 1.0, 2.0], 46)}, index=y.index)
    past, future = t < 40, (t >= 40) & (t < 43)
    forecaster = TsdbForecaster(**DEPTH).fit(y[past], X=X[past], fh=[1, 2, 3])
    cfg = forecaster.config_
    assert cfg.model.num_covariates == 1 and forecaster._stream_state.batch_size == 3
    pred = forecaster.predict(X=X[future])

    c, h = cfg.model.context_length, cfg.model.horizon
    contexts, covs = [], []
    for item in ["s0", "s1", "s2"]:
        contexts.append(last_context(y.loc[item, "y"].to_numpy(np.float32)[:40], c))
        temp = X.loc[item, "temp"].to_numpy(np.float32)
        known = temp[40:43]
        covs.append(np.concatenate([temp[40 - c:40], known, np.full(h - 3, known[-1])])[None])
    state = streaming.init_state(forecaster.model_, torch.from_numpy(np.stack(contexts)),
                                 covariates=torch.from_numpy(np.stack([cv[:, :c] for cv in covs])))
    noise = torch.randn(3, cfg.model.num_samples, h, generator=torch.Generator().manual_seed(cfg.train.seed))
    samples = streaming.forecast(forecaster.model_, state, noise, forecaster.strategy_.schedule(cfg.model.inference_steps),
                                 cfg.model.sampler, covariates=torch.from_numpy(np.stack([cv[:, c:] for cv in covs])))
    np.testing.assert_allclose(pred["y"].to_numpy(), np.median(samples.numpy(), axis=1)[:, :3].reshape(-1),
                               rtol=1e-4, atol=1e-4)
    warmer = X[future] + 10      # the known future changes the forecast
    assert not np.allclose(forecaster.predict(X=warmer)["y"].to_numpy(), pred["y"].to_numpy())

    with pytest.raises(ValueError, match="pass X over the steps to forecast"):
        forecaster.predict()
    with pytest.raises(ValueError, match="pass X for the new time points"):
        forecaster.update(y[future], update_params=False)
    forecaster.update(y[future], X=X[future], update_params=False)
    after = forecaster.predict(X=X[t >= 43])
    assert after.loc["s0"].index.tolist() == [43, 44, 45]
