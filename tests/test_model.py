"""The forecaster network: normalization, masking, causality, sigma-free context, routing."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from tsdb.config import ModelConfig
from tsdb.data.series import Series, SeriesDataset
from tsdb.data.windows import TrainingWindows
from tsdb.nn import instance_stats
from tsdb.strategies import get_strategy

from conftest import block_calls, expected_calls

CFG = ModelConfig(context_length=32, horizon=16, patch_length=8, d_model=32, n_heads=4, n_layers=4, n_blocks=2)


def trained_like(model):
    """Randomize every weight (zero-initialised heads included) so outputs are informative."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def test_instance_stats_ignore_nan():
    x = torch.tensor([[1.0, float("nan"), 3.0, 5.0], [2.0, 2.0, 2.0, float("nan")]])
    loc, scale = instance_stats(x)
    assert loc[:, 0].tolist() == pytest.approx([3.0, 2.0])
    assert scale[0, 0] == pytest.approx(math.sqrt(8 / 3))
    assert scale[1, 0] == 1.0  # constant context: scale 1, not 0


def test_missing_values_are_masked_not_fed():
    """A NaN becomes (value 0, observed 0), never a NaN or a fill value inside the network."""
    strategy = get_strategy(CFG)
    model = trained_like(strategy.build()).eval()
    ctx = torch.randn(2, 32)
    ctx[:, 5] = float("nan")
    noise = torch.randn(2, 4, 16)
    out_nan = strategy.forecast(model, ctx, 4, noise=noise)
    features, *_ = model.prepare(ctx)
    assert torch.equal(features[:, 5], torch.zeros(2, 2))  # value 0, observed 0
    assert torch.isfinite(out_nan).all()


def test_context_tokens_are_causal_and_sigma_free():
    strategy = get_strategy(CFG)
    model = trained_like(strategy.build()).eval()
    block = model.blocks[0]
    ctx = torch.randn(1, 32)
    features, *_ = model.prepare(ctx)
    enc = block.encode_context(features)
    changed = features.clone()
    changed[:, 24:, 0] += 5.0  # alter only the last patch
    enc2 = block.encode_context(changed)
    for kv1, kv2 in zip(enc.kv, enc2.kv):
        assert torch.allclose(kv1.k[:, :, :3], kv2.k[:, :, :3])  # earlier tokens unchanged
        assert not torch.allclose(kv1.k[:, :, 3], kv2.k[:, :, 3])
    # the encoding has no sigma input at all; the future path does
    z = torch.randn(1, 16)
    f1 = block.denoise_future(enc, z, torch.tensor([0.1]))
    f2 = block.denoise_future(enc, z, torch.tensor([0.9]))
    assert not torch.allclose(f1, f2)


def test_untrained_block_is_the_skip_connection():
    """adaLN-Zero: a fresh block outputs F = 0, so D(z, sigma) = c_skip(sigma) z."""
    strategy = get_strategy(CFG)
    model = strategy.build()
    features, *_ = model.prepare(torch.randn(3, 32))
    z = torch.randn(3, 16)
    sigma = torch.full((3,), 0.5)
    denoisers = model.denoisers([b.encode_context(features) for b in model.blocks])
    for d in (denoise(z, sigma) for denoise in denoisers):
        assert torch.allclose(d, z * 1.0 / (0.25 + 1.0))


@pytest.mark.parametrize("p_mean", [-1.2, 0.0, 0.5, 1.0])
def test_every_block_takes_its_share_of_sampler_steps(p_mean):
    """Counted by hooks on the blocks, over B in {1, 2, 3, 4, 6} and K in {B, 2B, 4B}, for both samplers."""
    for b in (1, 2, 3, 4, 6):
        cfg = CFG.model_copy(update=dict(n_blocks=b, n_layers=b, d_model=8, n_heads=2, p_mean=p_mean))
        strategy = get_strategy(cfg)
        model = strategy.build().eval()
        calls = block_calls(model)
        for k in (b, 2 * b, 4 * b):
            for sampler in ("euler", "heun"):
                strategy.cfg = cfg.model_copy(update={"sampler": sampler})
                calls.clear()
                strategy.forecast(model, torch.randn(1, 32), 2, num_steps=k)
                assert calls == expected_calls(b, k, sampler), (p_mean, b, k, sampler)


def test_forecast_is_reproducible_with_given_noise_and_chunking():
    strategy = get_strategy(CFG)
    model = trained_like(strategy.build()).eval()
    ctx = torch.randn(5, 32) * 10 + 100
    noise = torch.randn(5, 3, 16)
    a = model.sample(ctx, 3, strategy.schedule(4), noise=noise)
    b = model.sample(ctx, 3, strategy.schedule(4), noise=noise, max_batch=3)  # 1 series per chunk
    assert torch.allclose(a, b, atol=1e-5)
    assert a.shape == (5, 3, 16)


def test_location_window_is_the_recent_mean_and_leaves_the_scale():
    x = torch.tensor([[1.0, 2.0, 3.0, 10.0, float("nan"), 20.0],
                      [4.0, 5.0, 6.0, float("nan"), float("nan"), float("nan")]])
    loc, scale = instance_stats(x)
    recent_loc, recent_scale = instance_stats(x, location_window=3)
    assert recent_loc[:, 0].tolist() == pytest.approx([15.0, 5.0])   # series 2: its last 3 are all missing
    torch.testing.assert_close(recent_scale, scale)
    assert instance_stats(x, location_window=6)[0][:, 0].tolist() == pytest.approx(loc[:, 0].tolist())
    with pytest.raises(ValueError, match="location_window 40 must be at most context_length 32"):
        ModelConfig.model_validate(CFG.model_dump() | {"location_window": 40})


def test_seasonal_prior_denoises_the_departure_from_last_season():
    """Same weights and noise: a seasonal-prior model's samples are the plain model's moved by
    (last season repeated - location); a target equal to last season normalizes to 0."""
    from tsdb.nn.forecaster import seasonal_anchor

    strategy = get_strategy(CFG)
    plain = trained_like(strategy.build()).eval()
    prior = get_strategy(ModelConfig.model_validate(CFG.model_dump() | {"seasonal_prior": 12})).build().eval()
    prior.load_state_dict(plain.state_dict())
    ctx = torch.randn(3, 32) * 5 + 50
    ctx[1, -3] = float("nan")      # a missing value of last season: the location stands in
    loc, _ = instance_stats(ctx)
    anchor = seasonal_anchor(ctx, loc, 12, 16)
    assert anchor[0].tolist() == pytest.approx(ctx[0, -12:].tolist() + ctx[0, -12:-8].tolist())
    assert anchor[1, 9].item() == pytest.approx(loc[1, 0].item())
    noise = torch.randn(3, 4, 16)
    a = plain.sample(ctx, 4, strategy.schedule(4), noise=noise)
    b = prior.sample(ctx, 4, strategy.schedule(4), noise=noise)
    torch.testing.assert_close(b - a, (anchor - loc)[:, None, :].expand_as(a), atol=1e-3, rtol=1e-4)
    _, y, observed, _, _ = prior.prepare(ctx, anchor)
    assert y.abs().max().item() < 1e-5 and observed.all()
    with pytest.raises(ValueError, match="seasonal_prior 40 must be at most context_length 32"):
        ModelConfig.model_validate(CFG.model_dump() | {"seasonal_prior": 40})


def test_training_windows_short_series_and_partial_patches():
    rng = np.random.default_rng(0)
    s = Series("a", np.arange(60, dtype=np.float32), pd.Period("2024-01-01", "h"), "h")
    windows = TrainingWindows(SeriesDataset("d", [s], "h"), context_length=48, horizon=16, patch_length=8,
                              partial_patch_prob=1.0)
    for _ in range(50):
        ctx, tgt, draws = windows.window(rng)
        assert draws.shape == (17,) and 0 <= draws[0] < 1
        assert ctx.shape == (48,) and tgt.shape == (16,)
        pad = int(np.isnan(ctx[::-1]).argmin())  # trailing NaN = unobserved part of the last patch
        assert 1 <= pad < 8
        last = ctx[~np.isnan(ctx)][-1]
        assert tgt[0] == last + 1  # the target starts right after the last observed value


def test_scale_weighting_draws_large_series_in_proportion_to_their_scale():
    """Two series with equal window counts, one 9x larger: with ``scale_weighting = w`` the
    large one is drawn 9**w times as often (0: by window counts alone)."""
    start = pd.Period("2024-01-01", "h")
    small = Series("small", 1.0 + np.sin(np.arange(200, dtype=np.float32)), start, "h")
    large = Series("large", 9.0 * (1.0 + np.sin(np.arange(200, dtype=np.float32))), start, "h")
    data = SeriesDataset("d", [small, large], "h")

    def share_of_large(w: float, n: int = 4000) -> float:
        windows = TrainingWindows(data, context_length=32, horizon=16, scale_weighting=w)
        return float(np.mean([windows.window_at(i)[1].max() > 2.5 for i in range(n)]))

    assert share_of_large(0.0) == pytest.approx(0.5, abs=0.03)
    assert share_of_large(1.0) == pytest.approx(0.9, abs=0.02)
    assert share_of_large(0.5) == pytest.approx(0.75, abs=0.03)


def test_linear_head_is_affine_in_the_normalized_context_and_absent_by_default():
    """The head reads the context embeddings before any LayerNorm (through the tap), so its
    forecast is an affine function of the normalized context values: NLinear inside the block.
    Without it, a block has exactly the weights it had before the option existed."""
    plain = get_strategy(CFG).build()
    assert not any("linear_head" in k or "taps" in k for k in plain.state_dict())
    cfg = CFG.model_copy(update={"linear_head": True})
    model = trained_like(get_strategy(cfg).build())
    block = model.blocks[0]
    assert len(block.context_layers) == len(block.layers) + 1
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 1, 32, generator=g)
    ones = torch.ones(1, 32)

    def head(z):   # normalized values, all observed -> the head's forecast [1, H]
        features = torch.stack([z, ones], dim=-1)
        return block.linear_head(block.encode_context(features).kv[0], None)

    mix = head(0.3 * a + 0.7 * b)
    assert torch.allclose(mix, 0.3 * head(a) + 0.7 * head(b), atol=1e-5)
    assert not torch.allclose(head(a), head(b))
    # the future path adds it to F for every sample alike
    ctx = block.encode_context(torch.stack([a, ones], dim=-1))
    z = torch.randn(1, 3, 16, generator=g)
    with torch.no_grad():
        with_head, prior = block.denoise_future(ctx, z, torch.zeros(1)), head(a)
        block.linear_head.proj.weight.zero_()
        block.linear_head.proj.bias.zero_()
        without = block.denoise_future(ctx, z, torch.zeros(1))
    assert torch.allclose(with_head - without, prior[:, None].expand(1, 3, 16), atol=1e-5)
