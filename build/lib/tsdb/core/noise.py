"""The EDM noise distribution and the DiffusionBlocks partition of the noise range into bands.

Formulas follow Karras et al. 2022 (EDM) as used by DiffusionBlocks (Shing, Koyama &
Akiba, ICLR 2026). Torch-only math: no Lightning, no IO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

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
