"""The diffusion core against hand-computed values."""

import math

import pytest
import torch

from tsdb.core import (EDMLoss, NoiseDistribution, Preconditioning, block_bands, equiprobable_edges,
                            equiprobable_fractions, sampling_schedule, sigma_grid, uniform_edges,
                            uniform_fractions, widen_band)
from tsdb.core.samplers import sample_euler, sample_heun

PAPER = NoiseDistribution(p_mean=-1.2, p_std=1.2, sigma_min=0.002, sigma_max=80.0)


def test_equiprobable_edges_b4_match_paper():
    edges = equiprobable_edges(4, PAPER)
    assert edges.tolist() == pytest.approx([0.002, 0.134, 0.301, 0.677, 80.0], abs=1e-3)


def test_equiprobable_bands_hold_equal_mass():
    edges = equiprobable_edges(3, PAPER)
    mass = PAPER.cdf(edges[1:]) - PAPER.cdf(edges[:-1])
    assert torch.allclose(mass, mass[0].expand(3), rtol=1e-9)


def test_uniform_edges_equal_log_width():
    edges = uniform_edges(4, PAPER)
    widths = edges.log().diff()
    assert torch.allclose(widths, torch.full((4,), math.log(80 / 0.002) / 4, dtype=torch.float64))


def test_widen_band_by_gamma_of_its_log_width():
    lo, hi = widen_band(0.134, 0.301, 0.05, PAPER)
    w = math.log(0.301 / 0.134)
    assert lo == pytest.approx(0.134 * math.exp(-0.05 * w))
    assert hi == pytest.approx(0.301 * math.exp(0.05 * w))
    # clipped at the ends of the noise range
    assert widen_band(0.677, 80.0, 0.05, PAPER)[1] == 80.0
    assert widen_band(0.002, 0.134, 0.05, PAPER)[0] == 0.002


def test_block_one_owns_the_highest_band():
    edges = equiprobable_edges(4, PAPER)
    bands = block_bands(edges, 0.0, PAPER)
    assert bands[0] == pytest.approx((0.677, 80.0), abs=1e-3)
    assert bands[-1] == pytest.approx((0.002, 0.134), abs=1e-3)


def test_preconditioning_coefficients_by_hand():
    p = Preconditioning(sigma_data=0.5)
    s = torch.tensor(2.0)
    assert float(p.c_skip(s)) == pytest.approx(0.25 / 4.25)
    assert float(p.c_out(s)) == pytest.approx(2 * 0.5 / math.sqrt(4.25))
    assert float(p.c_in(s)) == pytest.approx(1 / math.sqrt(4.25))
    assert float(p.c_noise(s)) == pytest.approx(math.log(2) / 4)
    assert float(p.loss_weight(s)) == pytest.approx(1 / float(p.c_out(s)) ** 2)


def test_loss_is_weighted_per_sample():
    """Two samples at different sigma: each squared error gets its own weight (no [B]x[B,1] broadcast)."""
    p = Preconditioning(sigma_data=1.0)
    loss = EDMLoss(PAPER, p)
    net = lambda ctx, x, cn: torch.zeros_like(x)  # D = c_skip * z
    target = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    sigma = torch.tensor([0.5, 3.0])
    eps = torch.zeros_like(target)
    got = loss.at_sigma(net, None, target, sigma, noise=eps)
    c_skip = 1 / (sigma**2 + 1)
    err = ((c_skip[:, None] - 1) * target) ** 2
    want = (sigma**2 + 1) / sigma**2 * err.mean(-1)
    assert got.shape == (2,)
    assert torch.allclose(got, want)


def test_sigma_samples_stay_in_band():
    g = torch.Generator().manual_seed(0)
    s = PAPER.sample((20000,), 0.301, 0.677, generator=g)
    assert s.min() >= 0.301 and s.max() <= 0.677
    # inverse CDF inside the band: the median is the band's median quantile
    q = (PAPER.cdf(0.301) + PAPER.cdf(0.677)) / 2
    assert float(s.median()) == pytest.approx(float(PAPER.quantile(q)), rel=0.02)


def test_sigma_grid_k_equals_b_hits_band_tops():
    grid = sigma_grid(4, PAPER)
    assert grid.tolist() == pytest.approx([80.0, 0.677, 0.301, 0.134, 0.0], abs=1e-3)
    sched = sampling_schedule(4, equiprobable_fractions(4, PAPER), PAPER)
    assert sched.blocks == (0, 1, 2, 3)
    assert torch.equal(sched.sigmas, grid)


@pytest.mark.parametrize("partition", [equiprobable_fractions, uniform_fractions])
@pytest.mark.parametrize("p_mean", [-1.2, 0.0, 0.5, 1.0])
def test_each_block_takes_its_share_of_steps_inside_its_own_band(partition, p_mean):
    noise = NoiseDistribution(p_mean, 1.2)
    for b in (1, 2, 3, 4, 6):
        fractions = partition(b, noise)
        hi_to_lo = fractions.flip(0)
        edges = noise.sigma_at(hi_to_lo)
        for k in (b, 2 * b, 4 * b):
            sched = sampling_schedule(k, fractions, noise)
            assert sched.blocks == tuple(sorted(sched.blocks)) and sched.num_steps == k
            assert [sched.blocks.count(i) for i in range(b)] == [k // b] * b
            for step, block in enumerate(sched.blocks):  # each step starts inside its block's band
                s = float(sched.sigmas[step])
                assert float(edges[block + 1]) * (1 - 1e-5) <= s <= float(edges[block]) * (1 + 1e-5)
            if partition is equiprobable_fractions:
                assert torch.allclose(sched.sigmas, sigma_grid(k, noise), rtol=1e-6)


def test_steps_that_do_not_divide_go_to_the_band_of_their_midpoint():
    noise = NoiseDistribution(1.0, 1.2)
    fractions = equiprobable_fractions(4, noise)
    sched = sampling_schedule(6, fractions, noise)
    assert torch.equal(sched.sigmas, sigma_grid(6, noise))
    edges = equiprobable_edges(4, noise)
    ends = sched.sigmas.double().clone()
    ends[-1] = noise.sigma_min
    for step, block in enumerate(sched.blocks):
        mid = math.sqrt(float(ends[step]) * float(ends[step + 1]))
        assert float(edges[3 - block]) < mid <= float(edges[4 - block])
    assert sched.blocks == tuple(sorted(sched.blocks)) and set(sched.blocks) == {0, 1, 2, 3}


def test_euler_step_sign():
    """One Euler step from s to s_next moves x toward the denoised value: x + (s_next - s)(x - D)/s."""
    x = torch.tensor([[3.0]])
    denoised = torch.tensor([[1.0]])
    out = sample_euler(lambda z, s: denoised, x, torch.tensor([2.0, 1.0]))
    seen = []
    sample_euler([lambda z, s: denoised] * 2, x, torch.tensor([2.0, 1.0, 0.0]), blocks=[1, 0],
                 callback=lambda step, sigma, block: seen.append((step, sigma, block)))
    assert seen == [(0, 2.0, 1), (1, 1.0, 0)]
    assert float(out) == pytest.approx(3.0 + (1.0 - 2.0) * (3.0 - 1.0) / 2.0)  # = 2.0, halfway to D
    # to sigma 0 the step lands exactly on D
    assert float(sample_euler(lambda z, s: denoised, x, torch.tensor([2.0, 0.0]))) == pytest.approx(1.0)


def test_samplers_recover_a_point_mass():
    """For data y = c the exact denoiser is D(z) = c; both samplers must return c."""
    c = 0.7
    d = lambda z, s: torch.full_like(z, c)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)) * 80
    grid = sigma_grid(8, PAPER)
    assert torch.allclose(sample_euler(d, x, grid), torch.full_like(x, c), atol=1e-5)
    assert torch.allclose(sample_heun(d, x, grid), torch.full_like(x, c), atol=1e-5)


def test_heun_exact_on_gaussian_data():
    """Data ~ N(0, sd^2): exact D = sd^2/(s^2+sd^2) z; the ODE maps x_T to x_T * sd / sqrt(sT^2+sd^2)."""
    sd = 1.0
    d = lambda z, s: (sd**2 / (s[:, None] ** 2 + sd**2)) * z
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0)) * 80
    grid = torch.cat([torch.exp(torch.linspace(math.log(80.0), math.log(0.002), 100)), torch.zeros(1)])
    want = x * sd / math.sqrt(80.0**2 + sd**2) * math.sqrt(0.0**2 + sd**2)
    heun_err = float(((sample_heun(d, x, grid) - want) / want).abs().max())
    euler_err = float(((sample_euler(d, x, grid) - want) / want).abs().max())
    assert heun_err < 5e-3
    assert euler_err > 5 * heun_err  # second order beats first order on the same grid
