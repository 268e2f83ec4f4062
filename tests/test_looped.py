"""The looped (recurrent-depth) strategies: memory vs K, K as an inference knob, training."""

import numpy as np
import pandas as pd
import pytest
import torch

from tsdb.config import ExperimentConfig, ModelConfig
from tsdb.data.windows import TrainingWindows, diffusion_draws
from tsdb.data.series import Series, SeriesDataset
from tsdb.core import NoiseDistribution, sigma_grid
from tsdb.errors import TsdbError
from tsdb.training.memory import SavedActivations
from tsdb.nn import BlockDenoiser
from tsdb.strategies.looped.model import LoopedDenoiser
from tsdb.strategies import get_strategy
from tsdb.strategies.looped.strategy import shifted_grid
from tsdb.training.loop import train_model

TINY = dict(context_length=32, horizon=16, patch_length=4, d_model=16, n_heads=2, n_layers=2, n_blocks=2)


def batch(n=8, draw_sets=1, seed=0):
    """A batch as TrainingWindows yields it: contexts, targets and the step's draws."""
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(seed)
    draws = np.stack([np.concatenate([diffusion_draws(rng, 16) for _ in range(draw_sets)]) for _ in range(n)])
    return torch.randn(n, 32, generator=g) + 5, torch.randn(n, 16, generator=g) + 5, torch.from_numpy(draws)


def saved_bytes(strategy: str, loop_iters: int) -> int:
    s = get_strategy(ModelConfig(**TINY, strategy=strategy, loop_iters=loop_iters))
    model = s.build()
    (unit,) = s.units(model)
    with SavedActivations(exclude=list(model.parameters())) as saved:
        unit.loss(batch(draw_sets=s.draw_sets))
    return saved.bytes


def test_single_pass_memory_is_flat_in_k_and_bptt_memory_is_linear():
    ks = (1, 2, 4, 8)
    single = [saved_bytes("looped", k) for k in ks]
    bptt = [saved_bytes("looped-bptt", k) for k in ks]
    assert len(set(single)) == 1
    per_iter = bptt[1] - bptt[0]
    assert per_iter > 0
    for k, b in zip(ks, bptt):
        assert b == pytest.approx(bptt[0] + (k - 1) * per_iter, rel=0.01)
    assert bptt[-1] > 4 * single[0]


def test_bptt_noise_comes_from_the_data_stream():
    """The BPTT loss is a function of the batch (its two draw sets), not of torch's generator;
    a batch without them is refused with one line."""
    s = get_strategy(ModelConfig(**TINY, strategy="looped-bptt", loop_iters=3))
    model = s.build()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)   # the adaLN-Zero head would make every loss equal
    (unit,) = s.units(model)
    torch.manual_seed(1)
    first = unit.loss(batch(draw_sets=2))
    torch.manual_seed(2)
    assert unit.loss(batch(draw_sets=2)) == first
    assert unit.loss(batch(draw_sets=2, seed=5)) != first
    with pytest.raises(TsdbError, match=r"two draw sets per window \(draws \[batch, 34\]"):
        unit.loss(batch(draw_sets=1))


def test_wider_draws_leave_the_window_stream_unchanged():
    """looped and looped-bptt train on the same windows and the same first draw set."""
    one, two = (iter(TrainingWindows(sine_dataset(), 32, 16, seed=3, draw_sets=k)) for k in (1, 2))
    for _ in range(20):
        (c1, t1, d1), (c2, t2, d2) = next(one), next(two)
        np.testing.assert_array_equal(np.nan_to_num(c1), np.nan_to_num(c2))
        np.testing.assert_array_equal(t1, t2)
        np.testing.assert_array_equal(d1, d2[:17])
        assert d2.shape == (34,) and 0 <= d2[17] < 1 and not np.array_equal(d2[18:], d1[1:])


def test_k_is_an_inference_knob_counting_core_applications():
    strategy = get_strategy(ModelConfig(**TINY, strategy="looped", loop_iters=4))
    model = strategy.build()
    calls = []
    model.blocks[0].out.register_forward_hook(lambda *_: calls.append(1))  # the coda runs once per application
    context = batch(3)[0]
    for k in (1, 3, 8):
        calls.clear()
        samples = strategy.forecast(model, context, 5, num_steps=k)
        assert samples.shape == (3, 5, 16) and torch.isfinite(samples).all()
        assert len(calls) == k  # one application of the weight-tied core per step


def test_shifted_grid_at_phase_zero_is_the_inference_grid():
    noise = NoiseDistribution(p_mean=0.5)
    grids = shifted_grid(4, torch.tensor([0.0, 0.5]), noise)
    assert torch.allclose(grids[0], sigma_grid(4, noise), rtol=1e-5)
    assert (grids[1, :-1] < grids[0, :-1]).all() and (grids[1, :-1] > grids[0, 1:]).all()


def test_prelude_and_core_split_the_layers():
    cfg = ModelConfig(**{**TINY, "n_layers": 4}, strategy="looped")
    model = get_strategy(cfg).build()
    core = model.blocks[0]
    assert isinstance(core, LoopedDenoiser) and len(core.prelude) == 2 and len(core.layers) == 2
    # with no prelude the looped denoiser is exactly a block denoiser
    plain = BlockDenoiser(core.shape)
    bare = LoopedDenoiser(core.shape, prelude_layers=0)
    bare.load_state_dict(plain.state_dict())
    torch.nn.init.normal_(plain.out.weight)
    bare.out.weight.data.copy_(plain.out.weight)
    x = torch.randn(2, 32, 2), torch.randn(2, 16), torch.randn(2)
    assert torch.equal(bare(*x), plain(*x))
    with pytest.raises(TsdbError, match="core_layers"):
        get_strategy(ModelConfig(**TINY, strategy="looped", core_layers=3))


def sine_dataset(n=3, length=200) -> SeriesDataset:
    t = np.arange(length)
    series = [Series(f"s{i}", (5 + np.sin(2 * np.pi * t / 16 + i)).astype(np.float32),
                     pd.Period("2024-01-01 00:00", "h"), "h") for i in range(n)]
    return SeriesDataset("sine", series, "h", 16)


@pytest.mark.parametrize("name, arm", [("looped", "looped"), ("looped-bptt", "looped-bptt-k4")])
def test_train_model_trains_the_looped_arms_end_to_end(tmp_path, name, arm):
    cfg = ExperimentConfig().with_overrides(
        model={**TINY, "strategy": name, "loop_iters": 4},
        train=dict(steps_per_block=3, batch_size=8, warmup_steps=1, progress=False))
    model, summary = train_model(cfg, sine_dataset(), tmp_path / "run")
    strategy = get_strategy(cfg.model)
    assert list(summary["units"]) == ["block-0"] and strategy.arm_name() == arm
    fresh = strategy.build()
    assert not torch.equal(model.blocks[0].out.weight, fresh.blocks[0].out.weight)  # zero-init head moved
    context = torch.from_numpy(np.stack([s.target[-32:] for s in sine_dataset()]))
    samples = strategy.forecast(model, context, 4, num_steps=6)
    assert samples.shape == (3, 4, 16) and torch.isfinite(samples).all()
