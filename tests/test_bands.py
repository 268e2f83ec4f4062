"""``tsdb.evaluation.bands``: per-block denoising error by noise level."""

import numpy as np
import pytest

from conftest import randomized_model
from tsdb.errors import TsdbError
from tsdb.evaluation.bands import band_errors, owners, series_windows, table


@pytest.mark.parametrize("n_blocks", [2, 3, 4])
def test_owner_of_each_step_midpoint_is_the_block_the_schedule_routes_it_to(n_blocks):
    """Band ownership from the edges agrees with the sampler's step-index routing at the
    geometric midpoint of every step of a K = 2B grid (the last step ends at 0: skipped)."""
    strategy, _ = randomized_model("depth", 0, n_layers=n_blocks, n_blocks=n_blocks, num_steps=2 * n_blocks)
    sched = strategy.schedule()
    sig = sched.sigmas.double().numpy()
    mids = [float(np.sqrt(a * b)) for a, b in zip(sig[:-1], sig[1:]) if b > 0]
    assert owners(strategy, mids) == [int(i) for i in sched.blocks[:len(mids)]]
    assert owners(strategy, [1e6, 1e-9]) == [0, n_blocks - 1]     # beyond the edges: the end blocks


def test_errors_vanish_at_small_sigma_and_approach_the_target_power_at_large():
    """Preconditioning: at sigma -> 0 the denoiser passes its input through (error ~ sigma^2);
    the table has one row per sigma and one column per block."""
    strategy, model = randomized_model("depth", 0, context_length=32, horizon=8, patch_length=4)
    rng = np.random.default_rng(0)
    series = [np.cumsum(rng.normal(size=200)).astype(np.float32) for _ in range(3)]
    ctx, tgt = series_windows(series, 32, 8, per_series=5)
    assert ctx.shape == (15, 32) and tgt.shape == (15, 8)
    np.testing.assert_array_equal(tgt[0], series[0][-8:])
    np.testing.assert_array_equal(ctx[1], series[0][-8 - 8 - 32:-8 - 8])
    res = band_errors(model, ctx, tgt, sigmas=(40.0, 1e-3))
    assert len(res["errors"]) == 2 and all(len(r) == 2 for r in res["errors"])
    assert all(r[1] < 1e-4 for r in res["errors"])
    assert all(r[0] > 1e-2 for r in res["errors"])
    text = table(res, owners(strategy, res["sigmas"]))
    assert "| 40 | 0 |" in text and "owner best" in text


def test_windows_need_long_enough_series():
    with pytest.raises(TsdbError, match="40 points"):
        series_windows([np.zeros(10, np.float32)], 32, 8)
