"""Inference sigma grids, and the block that takes each step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tsdb.core.noise import NoiseDistribution, edges_at


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
