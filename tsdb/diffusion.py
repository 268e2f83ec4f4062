"""The diffusion core: EDM noise distribution, preconditioning, loss and the
DiffusionBlocks partition of the noise range into bands.

Formulas follow Karras et al. 2022 (EDM) as used by DiffusionBlocks (Shing, Koyama &
Akiba, ICLR 2026). Everything here is torch-only math: no Lightning, no IO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

_SQRT2 = math.sqrt(2.0)


def _phi(x: Tensor | float) -> Tensor:
    """Standard normal CDF."""
    x = torch.as_tensor(x, dtype=torch.float64)
    return 0.5 * (1.0 + torch.erf(x / _SQRT2))


def _phi_inv(q: Tensor | float) -> Tensor:
    """Standard normal quantile function."""
    q = torch.as_tensor(q, dtype=torch.float64)
    return _SQRT2 * torch.erfinv(2.0 * q - 1.0)


@dataclass(frozen=True)
class NoiseDistribution:
    """Truncated log-normal over sigma: ln sigma ~ N(p_mean, p_std), sigma in [sigma_min, sigma_max]."""

    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0

    def cdf(self, sigma: Tensor | float) -> Tensor:
        """Untruncated CDF of sigma (used to express truncation bounds as quantiles)."""
        return _phi((torch.log(torch.as_tensor(sigma, dtype=torch.float64)) - self.p_mean) / self.p_std)

    @property
    def q_min(self) -> float:
        return float(self.cdf(self.sigma_min))

    @property
    def q_max(self) -> float:
        return float(self.cdf(self.sigma_max))

    def quantile(self, q: Tensor | float) -> Tensor:
        """sigma(q) = exp(p_mean + p_std * PhiInv(q)), float64."""
        return torch.exp(self.p_mean + self.p_std * _phi_inv(q))

    def sigma_at(self, fraction: Tensor | float) -> Tensor:
        """sigma at a fraction in [0, 1] of the truncated distribution's probability mass."""
        fraction = torch.as_tensor(fraction, dtype=torch.float64)
        return self.quantile(self.q_min + fraction * (self.q_max - self.q_min))

    def from_uniform(self, u: Tensor, low: float | None = None, high: float | None = None) -> Tensor:
        """Map u ~ U[0, 1) to sigma inside [low, high] (default: the whole range) by inverse CDF."""
        low = self.sigma_min if low is None else max(low, self.sigma_min)
        high = self.sigma_max if high is None else min(high, self.sigma_max)
        q_lo, q_hi = float(self.cdf(low)), float(self.cdf(high))
        sigma = self.quantile(q_lo + u.double() * (q_hi - q_lo))
        # erfinv loses precision in the far tails: keep samples inside the band exactly.
        return sigma.clamp(low, high).float()

    def sample(self, shape, low: float | None = None, high: float | None = None,
               generator: torch.Generator | None = None, device=None) -> Tensor:
        """Sample sigma inside [low, high] (default: the whole truncated range)."""
        u = torch.rand(shape, generator=generator, dtype=torch.float64, device=device)
        return self.from_uniform(u, low, high)


# ---------------------------------------------------------------------------------------
# Partitions of the noise range into B bands. Edges are ascending: edges[0] = sigma_min,
# edges[B] = sigma_max. Band b (0-based, ascending) is [edges[b], edges[b+1]]. Block 1 of
# the paper (the input side of the network) owns the highest band, i.e. block index
# i = B - 1 - b.
# ---------------------------------------------------------------------------------------

def equiprobable_fractions(num_blocks: int, noise: NoiseDistribution) -> Tensor:
    """Band edges at equal fractions of the truncated log-normal's mass (the paper's partition)."""
    return torch.linspace(0.0, 1.0, num_blocks + 1, dtype=torch.float64)


def uniform_fractions(num_blocks: int, noise: NoiseDistribution) -> Tensor:
    """Band edges equally spaced in log sigma (the ablation arm), as fractions of the mass."""
    edges = torch.exp(torch.linspace(math.log(noise.sigma_min), math.log(noise.sigma_max),
                                     num_blocks + 1, dtype=torch.float64))
    fractions = (noise.cdf(edges) - noise.q_min) / (noise.q_max - noise.q_min)
    fractions[0], fractions[-1] = 0.0, 1.0
    return fractions


def edges_at(fractions: Tensor, noise: NoiseDistribution) -> Tensor:
    """Ascending band edges (sigma) at mass fractions; the ends are exactly sigma_min/sigma_max."""
    edges = noise.sigma_at(fractions)
    edges[0], edges[-1] = noise.sigma_min, noise.sigma_max
    return edges


def equiprobable_edges(num_blocks: int, noise: NoiseDistribution) -> Tensor:
    return edges_at(equiprobable_fractions(num_blocks, noise), noise)


def uniform_edges(num_blocks: int, noise: NoiseDistribution) -> Tensor:
    return edges_at(uniform_fractions(num_blocks, noise), noise)


# A partition is the mass fractions of its B + 1 band edges (ascending, 0 to 1).
PARTITIONS: dict[str, Callable[[int, NoiseDistribution], Tensor]] = {
    "equiprob": equiprobable_fractions,
    "uniform": uniform_fractions,
}


def widen_band(low: float, high: float, gamma: float, noise: NoiseDistribution) -> tuple[float, float]:
    """Overlap: widen [low, high] on both sides by gamma times its own log-width, clipped."""
    width = math.log(high) - math.log(low)
    lo = math.exp(math.log(low) - gamma * width)
    hi = math.exp(math.log(high) + gamma * width)
    return max(lo, noise.sigma_min), min(hi, noise.sigma_max)


def block_bands(edges: Tensor, gamma: float, noise: NoiseDistribution) -> list[tuple[float, float]]:
    """Training band of each block, in block order (block 0 = highest noise), widened by gamma."""
    num_blocks = len(edges) - 1
    bands = []
    for block in range(num_blocks):
        b = num_blocks - 1 - block
        bands.append(widen_band(float(edges[b]), float(edges[b + 1]), gamma, noise))
    return bands


# ---------------------------------------------------------------------------------------
# Preconditioning and loss.
# ---------------------------------------------------------------------------------------

class RawNetwork(Protocol):
    """F(x, c_in * z, c_noise): the network inside the preconditioner."""

    def __call__(self, context: Tensor, scaled_noisy: Tensor, c_noise: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class Preconditioning:
    """EDM preconditioning coefficients for a given sigma_data."""

    sigma_data: float = 0.5

    def c_skip(self, sigma: Tensor) -> Tensor:
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma: Tensor) -> Tensor:
        return sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()

    def c_in(self, sigma: Tensor) -> Tensor:
        return 1.0 / (sigma**2 + self.sigma_data**2).sqrt()

    @staticmethod
    def c_noise(sigma: Tensor) -> Tensor:
        return sigma.log() / 4.0

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """w(sigma) = 1 / c_out^2 = (sigma^2 + sd^2) / (sigma * sd)^2."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def denoise(self, net: RawNetwork, context: Tensor, z: Tensor, sigma: Tensor) -> Tensor:
        """D(z, sigma | x) = c_skip z + c_out F(x, c_in z, c_noise).

        ``sigma`` is either per sample ``[batch]`` or per position ``[batch, horizon]``.
        """
        s = sigma if sigma.dim() == z.dim() else sigma.view(-1, *([1] * (z.dim() - 1)))
        f = net(context, self.c_in(s) * z, self.c_noise(sigma))
        return self.c_skip(s) * z + self.c_out(s) * f


class EDMLoss:
    """Per-sample weighted denoising loss inside one noise band.

    loss_i = w(sigma_i) * mean_h (D(y_i + sigma_i eps_i, sigma_i | x_i) - y_i)^2,
    with w = 1 / c_out^2 applied per sample (not the [B] x [B, 1] broadcast of the
    reference code).
    """

    def __init__(self, noise: NoiseDistribution = NoiseDistribution(),
                 precond: Preconditioning = Preconditioning(),
                 band: tuple[float, float] | None = None):
        self.noise = noise
        self.precond = precond
        self.band = band if band is not None else (noise.sigma_min, noise.sigma_max)

    def __call__(self, net: RawNetwork, context: Tensor, target: Tensor, draws: Tensor | None = None,
                 target_mask: Tensor | None = None) -> Tensor:
        """Loss per sample ``[batch]``.

        ``draws`` ``[batch, 1 + H]`` holds the random numbers of the step (column 0: u ~ U[0,1)
        mapped to sigma in the band; the rest: eps ~ N(0, 1)). Drawing them with the data
        makes training reproducible and data-parallel training equal to one process.
        """
        if draws is None:
            draws = torch.cat([torch.rand_like(target[:, :1]), torch.randn_like(target)], dim=1)
        sigma = self.noise.from_uniform(draws[:, 0], *self.band).to(target.dtype)
        return self.at_sigma(net, context, target, sigma, noise=draws[:, 1:], target_mask=target_mask)

    def at_sigma(self, net: RawNetwork, context: Tensor, target: Tensor, sigma: Tensor,
                 noise: Tensor | None = None, target_mask: Tensor | None = None) -> Tensor:
        """Loss per sample ``[batch]`` at given sigmas (exposed for tests and evaluation)."""
        eps = torch.randn_like(target) if noise is None else noise
        z = target + sigma.view(-1, 1) * eps
        denoised = self.precond.denoise(net, context, z, sigma)
        sq = (denoised - target) ** 2
        if target_mask is not None:  # missing future values carry no loss
            sq = sq * target_mask
            per_sample = sq.sum(-1) / target_mask.sum(-1).clamp_min(1.0)
        else:
            per_sample = sq.mean(-1)
        return self.precond.loss_weight(sigma) * per_sample


def sigma_grid(num_steps: int, noise: NoiseDistribution) -> Tensor:
    """Equi-probability inference grid: num_steps sigmas from sigma_max down, then 0."""
    return _grid_at(1.0 - torch.arange(num_steps, dtype=torch.float64) / num_steps, noise)


def _grid_at(fractions: Tensor, noise: NoiseDistribution) -> Tensor:
    sigmas = noise.sigma_at(fractions)
    sigmas[0] = noise.sigma_max
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


@dataclass(frozen=True)
class SigmaSchedule:
    """An inference grid and the block that takes each of its steps.

    sigmas: ``[K + 1]`` float32, descending from sigma_max to 0; blocks: the block index
    (0 = highest band) of step k, from sigmas[k] to sigmas[k + 1]. Routing is decided here,
    by step index, once: comparing a float32 grid point with a float64 band edge sends steps
    that sit on an edge to whichever side rounding picks.
    """

    sigmas: Tensor
    blocks: tuple[int, ...]

    @property
    def num_steps(self) -> int:
        return len(self.blocks)


def sampling_schedule(num_steps: int, fractions: Tensor, noise: NoiseDistribution) -> SigmaSchedule:
    """K steps over the bands whose edges sit at mass ``fractions`` (``B + 1``, ascending).

    With B | K every block takes K / B consecutive steps, equally spaced in mass inside its
    own band (for the equi-probability partition this is exactly ``sigma_grid(K)``), and step
    k belongs to block ``k * B // K``. Otherwise the steps follow ``sigma_grid(K)`` and each
    belongs to the band that holds its geometric midpoint (the last step's lower end counts
    as sigma_min).
    """
    num_blocks = len(fractions) - 1
    if num_steps % num_blocks == 0:
        per = num_steps // num_blocks
        hi = fractions.flip(0)[:-1].repeat_interleave(per)      # top of each step's band
        lo = fractions.flip(0)[1:].repeat_interleave(per)
        j = torch.arange(num_steps, dtype=torch.float64) % per
        sigmas = _grid_at(hi - j * (hi - lo) / per, noise)
        return SigmaSchedule(sigmas, tuple(k * num_blocks // num_steps for k in range(num_steps)))
    sigmas = sigma_grid(num_steps, noise)
    ends = sigmas.double().clone()
    ends[-1] = noise.sigma_min
    mid = (ends[:-1] * ends[1:]).sqrt()
    band = torch.searchsorted(edges_at(fractions, noise)[1:-1], mid)    # ascending band index
    return SigmaSchedule(sigmas, tuple((num_blocks - 1 - band).tolist()))
