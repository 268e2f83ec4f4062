"""GluonTS integration: train TsdbEstimator on real M4 Hourly series, serialize, load, evaluate."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from gluonts.dataset.split import split
from gluonts.model.evaluation import evaluate_model
from gluonts.model.forecast import SampleForecast
from gluonts.model.predictor import Predictor

from tsdb.data import SeriesDataset, load_dataset
from tsdb.evaluation.tasks import METRICS, evaluate_predictor, m4_hourly_task
from tsdb.bench.experiment import torch_predictor
from tsdb.integrations.gluonts import TsdbEstimator
from tsdb.training.loop import train_model

from conftest import require_benchmark_data

H = 48
SEED = 0
CONFIG = {
    "model": dict(context_length=48, patch_length=8, d_model=16, n_heads=2, n_layers=2, n_blocks=2,
                  num_steps=4, num_samples=20),
    "train": dict(steps_per_block=6, batch_size=16, warmup_steps=0, seed=SEED, accelerator="cpu",
                  progress=False),
}


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def m4():
    require_benchmark_data("m4_hourly_train.csv", "m4_hourly_test.csv")
    full = load_dataset("m4_hourly")
    return SeriesDataset(full.name, full.series[:6], full.freq, full.season_length, dict(full.meta))


@pytest.fixture(scope="module")
def trained(m4, tmp_path_factory):
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("gluonts-run")
    estimator = TsdbEstimator(prediction_length=H, config=CONFIG, run_dir=str(run_dir))
    train = m4_hourly_task(m4).train.to_gluonts()
    return estimator, estimator.train(train), run_dir


def windows(dataset):
    """The last H points of each series, as GluonTS's own split makes them."""
    _, template = split(dataset.to_gluonts(), offset=-H)
    return template.generate_instances(prediction_length=H)


def forecasts(predictor, inputs, seed=SEED):
    torch.manual_seed(seed)
    return list(predictor.predict(inputs))


def test_predictor_returns_sample_forecasts_and_round_trips(m4, trained, tmp_path):
    _, predictor, _ = trained
    inputs = windows(m4).input
    before = forecasts(predictor, inputs)
    assert len(before) == len(m4)
    assert all(isinstance(f, SampleForecast) and f.samples.shape == (20, H) for f in before)
    assert all(np.isfinite(f.samples).all() for f in before)

    predictor.serialize(tmp_path)
    loaded = Predictor.deserialize(tmp_path)
    after = forecasts(loaded, inputs)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a.samples, b.samples)
        assert a.start_date == b.start_date and a.item_id == b.item_id
    assert not np.array_equal(forecasts(loaded, inputs, seed=1)[0].samples, after[0].samples)


def test_evaluate_model_matches_tsdb_own_path(m4, trained, tmp_path):
    estimator, predictor, _ = trained
    torch.manual_seed(SEED)
    gluonts_metrics = evaluate_model(predictor, test_data=windows(m4), metrics=METRICS, seasonality=24)
    crps = float(gluonts_metrics["mean_weighted_sum_quantile_loss"].iloc[0])
    mase = float(gluonts_metrics["MASE[0.5]"].iloc[0])
    assert math.isfinite(crps) and math.isfinite(mase) and crps > 0

    # tsdb's own path (what `tsdb bench` runs): train_model + evaluate_predictor, same config and seed
    cfg = estimator.experiment_config
    task = m4_hourly_task(m4)
    model, _ = train_model(cfg, task.train, tmp_path / "run")
    model.eval()
    for name, value in model.state_dict().items():  # same data and seed: the same weights
        torch.testing.assert_close(predictor.prediction_net.model.state_dict()[name], value)
    strategy = predictor.prediction_net.strategy
    ours = evaluate_predictor(task, torch_predictor(strategy, model, seed=SEED), cfg.model.context_length,
                              cfg.model.num_samples)
    # the same noise too, so the figures agree to float precision; "within noise" is the claim
    assert crps == pytest.approx(ours["crps"], rel=1e-3)
    assert mase == pytest.approx(ours["mase"], rel=1e-3)


def test_run_dir_resumes_finished_blocks(m4, trained):
    estimator, predictor, run_dir = trained
    assert sorted(p.name for p in (Path(run_dir) / "units").iterdir()) == ["block-0", "block-1"]
    again = estimator.train(m4_hourly_task(m4).train.to_gluonts())  # every block done: loads, no training
    for name, value in predictor.prediction_net.state_dict().items():
        torch.testing.assert_close(again.prediction_net.state_dict()[name], value)


def test_prediction_length_off_the_patch_grid_is_cut():
    estimator = TsdbEstimator(prediction_length=20, config=CONFIG)
    assert estimator.experiment_config.model.horizon == 24
    net = estimator.create_network()
    out = net(torch.randn(3, 48), torch.ones(3, 48))
    assert out.shape == (3, 20, 20)


def test_unsupported_trainer_kwargs_raise():
    with pytest.raises(ValueError, match="max_epochs"):
        TsdbEstimator(prediction_length=H, trainer_kwargs={"max_epochs": 3})


def test_feat_dynamic_real_covariates(tmp_path):
    """A model with num_covariates reads GluonTS's feat_dynamic_real: the predictor's
    samples equal tsdb's own strategy.forecast with the same covariates and noise (context
    padding as NaN, the known future after prediction_length repeated to whole patches),
    and they follow the covariate."""
    import pandas as pd
    from gluonts.dataset.common import ListDataset

    P = 20                                              # model horizon rounds up to 24
    rng = np.random.default_rng(0)
    entries, tests = [], []
    for i, length in enumerate((150, 40)):              # the second is shorter than the context
        temp = rng.normal(size=length + P).cumsum().astype(np.float32)
        target = (2 * temp[:length] + rng.normal(0, 0.1, length)).astype(np.float32)
        start = pd.Period("2024-01-01 00:00", "h")
        entries.append({"start": start, "target": target, "feat_dynamic_real": temp[None, :length]})
        tests.append({"start": start, "target": target, "feat_dynamic_real": temp[None]})
    config = {"model": {**CONFIG["model"], "num_covariates": 1}, "train": CONFIG["train"]}
    estimator = TsdbEstimator(prediction_length=P, config=config, run_dir=str(tmp_path / "run"))
    predictor = estimator.train(ListDataset(entries, freq="h"))
    test = ListDataset(tests, freq="h")
    got = forecasts(predictor, test)
    assert [f.samples.shape for f in got] == [(20, P)] * 2

    net, c = predictor.prediction_net, estimator.experiment_config.model.context_length
    contexts, covs = [], []
    for e in tests:
        t = len(e["target"])
        ctx = np.full(c, np.nan, np.float32)
        ctx[max(c - t, 0):] = e["target"][-c:]
        cov = np.full(c + 24, np.nan, np.float32)
        cov[max(c - t, 0):c] = e["feat_dynamic_real"][0, max(t - c, 0):t]
        cov[c:c + P] = e["feat_dynamic_real"][0, t:]
        cov[c + P:] = cov[c + P - 1]
        contexts.append(ctx)
        covs.append(cov[None])
    torch.manual_seed(SEED)
    with torch.no_grad():
        want = net.strategy.forecast(net.model, torch.from_numpy(np.stack(contexts)), 20,
                                     covariates=torch.from_numpy(np.stack(covs)))[..., :P]
    for f, w in zip(got, want):
        np.testing.assert_allclose(f.samples, w.numpy(), rtol=1e-5, atol=1e-5)

    def warmer(e):      # the known future 20 degrees up (a shift of the whole series would normalize away)
        f = e["feat_dynamic_real"].copy()
        f[:, len(e["target"]):] += 20
        return {**e, "feat_dynamic_real": f}

    moved = forecasts(predictor, ListDataset([warmer(e) for e in tests], freq="h"))
    assert np.abs(moved[0].samples - got[0].samples).max() > 0.1
    with pytest.raises(ValueError, match="extend prediction_length"):
        forecasts(predictor, ListDataset(entries, freq="h"))    # no known future given
    (tmp_path / "predictor").mkdir()
    predictor.serialize(tmp_path / "predictor")
    loaded = forecasts(Predictor.deserialize(tmp_path / "predictor"), test)
    for a, b in zip(got, loaded):
        np.testing.assert_array_equal(a.samples, b.samples)
