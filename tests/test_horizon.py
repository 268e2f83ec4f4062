"""The horizon split: staircase noise, chunk-local losses, the rolling sampler."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from tsdb.config import ExperimentConfig, ModelConfig
from tsdb.data.series import Series, SeriesDataset
from tsdb.core import NoiseDistribution, equiprobable_edges
from tsdb.errors import TsdbError
from tsdb.nn import context_features, instance_stats
from tsdb.strategies.horizon.model import staircase
from tsdb.strategies import get_strategy
from tsdb.strategies.horizon.strategy import staircase_loss
from tsdb.training.loop import train_model

TINY = dict(strategy="horizon", context_length=32, horizon=16, patch_length=4, d_model=16, n_heads=2,
            n_layers=2, n_blocks=2)


def sines(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (context [n, 32], target [n, 16]) of period-16 sines, random phase and amplitude."""
    t0 = 16 * torch.rand(n, 1, generator=generator)
    amp = 1 + torch.rand(n, 1, generator=generator)
    x = 3 + amp * torch.sin(2 * math.pi * (t0 + torch.arange(48)) / 16)
    return x[:, :32], x[:, 32:]


@pytest.mark.parametrize("num_chunks", [2, 4])
def test_staircase_is_continuous_across_a_shift(num_chunks):
    noise = NoiseDistribution(p_mean=0.5)
    top, bottom = staircase(0.0, num_chunks, noise), staircase(1.0, num_chunks, noise)
    assert torch.equal(bottom[1:], top[:-1])  # bottom of band j at u=1 == top of band j-1 at u=0
    assert top[-1].item() == pytest.approx(noise.sigma_max, rel=1e-5)
    assert bottom[0].item() == pytest.approx(noise.sigma_min, rel=1e-4)
    # chunk j stays inside band j of the equi-probability partition, rising with lead time
    edges = equiprobable_edges(num_chunks, noise).float()
    sig = staircase(torch.linspace(0, 1, 11), num_chunks, noise)
    assert (sig[:, 1:] > sig[:, :-1]).all()
    assert (sig >= edges[:-1] * (1 - 1e-5)).all() and (sig <= edges[1:] * (1 + 1e-5)).all()


def test_roll_appends_a_staircase_top_chunk_and_keeps_the_staircase():
    model = get_strategy(ModelConfig(**TINY)).build()
    g = torch.Generator().manual_seed(0)
    context, _ = sines(3, g)
    loc, scale = instance_stats(context)
    encodings = model.encode(context_features(context, loc, scale))
    window = model.staircase_window(torch.zeros(3, 16), torch.randn(3, 16, generator=g))
    fresh = torch.randn(3, 8, generator=g)
    with torch.no_grad():
        emitted, nxt = model.roll(window, encodings, fresh, substeps=2)
    assert emitted.shape == (3, 8) and nxt.shape == (3, 16)
    assert torch.allclose(nxt[:, 8:], model.noise.sigma_max * fresh, rtol=1e-5)


def test_block_loss_depends_on_other_chunks_only_as_input():
    cfg = ModelConfig(**{**TINY, "n_blocks": 4, "n_layers": 4, "horizon": 32})
    strategy = get_strategy(cfg)
    model = strategy.build()
    for block in model.blocks:  # leave adaLN-Zero so the output depends on the input
        torch.nn.init.normal_(block.out.weight, std=0.1)
    g = torch.Generator().manual_seed(0)
    features, y, observed, _, _ = model.prepare(torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g))
    sigma = model.window_sigma(torch.rand(4, generator=g))
    z = y + sigma * torch.randn(4, 32, generator=g)
    y = y.clone().requires_grad_(True)
    for j in range(4):
        (grad_y,) = torch.autograd.grad(staircase_loss(model, j, features, z, sigma, y, observed).sum(), y)
        own = torch.zeros(32, dtype=torch.bool)
        own[model.chunk(j)] = True
        assert (grad_y[:, ~own] == 0).all() and (grad_y[:, own] != 0).any()
    # a unit's loss reaches its own block only
    strategy.units(model)[2].loss((torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g))).backward()
    for i, block in enumerate(model.blocks):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters()) == (i == 2)


def test_unit_loss_takes_phase_and_noise_from_the_batch_draws():
    strategy = get_strategy(ModelConfig(**TINY))
    model = strategy.build()
    g = torch.Generator().manual_seed(0)
    context, target = sines(4, g)
    draws = torch.cat([torch.rand(4, 1, generator=g), torch.randn(4, 16, generator=g)], dim=1)
    features, y, observed, _, _ = model.prepare(context, target)
    sigma = model.window_sigma(draws[:, 0])
    want = staircase_loss(model, 1, features, y + sigma * draws[:, 1:], sigma, y, observed).mean()
    assert torch.equal(strategy.units(model)[1].loss((context, target, draws)), want)


def test_a_trained_toy_model_rolls_and_forecasts_a_sine():
    torch.manual_seed(0)
    strategy = get_strategy(ModelConfig(**TINY))
    model = strategy.build()
    g = torch.Generator().manual_seed(0)
    for unit in strategy.units(model):
        opt = torch.optim.Adam(unit.module.parameters(), lr=3e-3)
        for _ in range(600):
            loss = unit.loss(sines(32, g))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unit.module.parameters(), 1.0)
            opt.step()
    context, target = sines(32, g)
    loc, scale = instance_stats(context)
    y = (target - loc) / scale
    window = model.staircase_window(y, torch.randn(32, 16, generator=g))  # clean data + staircase noise
    with torch.no_grad():
        emitted, _ = model.roll(window, model.encode(context_features(context, loc, scale)),
                                torch.randn(32, 8, generator=g), substeps=2)
    start_rmse = (window[:, :8] - y[:, :8]).pow(2).mean().sqrt()  # sigma_0(0) ~ 1.6
    rmse = (emitted - y[:, :8]).pow(2).mean().sqrt()
    assert rmse < 0.15 and start_rmse > 1.0
    # the whole state machine: cold start on the context's last H values, then B free rolls
    median = strategy.forecast(model, context, 8, generator=g).median(dim=1).values
    assert ((median - target) / scale).pow(2).mean().sqrt() < 0.15


def sine_dataset(n=3, length=200) -> SeriesDataset:
    t = np.arange(length)
    series = [Series(f"s{i}", (5 + np.sin(2 * np.pi * t / 16 + i)).astype(np.float32),
                     pd.Period("2024-01-01 00:00", "h"), "h") for i in range(n)]
    return SeriesDataset("sine", series, "h", 16)


def test_train_model_trains_every_chunk_block_and_forecasts(tmp_path):
    cfg = ExperimentConfig().with_overrides(
        model=TINY, train=dict(steps_per_block=3, batch_size=8, warmup_steps=1, progress=False))
    model, summary = train_model(cfg, sine_dataset(), tmp_path / "run")
    assert set(summary["units"]) == {"block-0", "block-1"}
    strategy = get_strategy(cfg.model)
    context = torch.from_numpy(np.stack([s.target[-32:] for s in sine_dataset()]))
    context[0, :5] = float("nan")
    noise = torch.randn(3, 4, 48, generator=torch.Generator().manual_seed(0))
    samples = strategy.forecast(model, context, 4, noise=noise)
    assert samples.shape == (3, 4, 16) and torch.isfinite(samples).all()
    assert torch.equal(samples, strategy.forecast(model, context, 4, noise=noise))
    assert strategy.forecast(model, context, 2, num_steps=8).shape == (3, 2, 16)
    assert strategy.arm_name() == "horizon-b2"


def test_bad_chunking_is_a_clear_error():
    with pytest.raises(TsdbError, match="multiple of patch_length"):
        get_strategy(ModelConfig(**{**TINY, "horizon": 12}))  # chunks of 6 with patches of 4
    with pytest.raises(TsdbError, match="context_length"):
        get_strategy(ModelConfig(**{**TINY, "context_length": 8}))
    with pytest.raises(TsdbError, match="num_steps"):
        get_strategy(ModelConfig(**TINY)).substeps(3)


@pytest.mark.parametrize("field", ["location_window", "seasonal_prior"])
def test_horizon_strategy_refuses_a_recent_anchor(field):
    from tsdb.strategies import get_strategy

    with pytest.raises(TsdbError, match=f"horizon strategy: model.{field} is not supported yet; set it to 0"):
        get_strategy(ModelConfig(strategy="horizon", context_length=32, horizon=16, patch_length=4, n_blocks=2,
                                 **{field: 8}))
