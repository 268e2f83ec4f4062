"""Training losses: each a small callable that reads like its equation."""

from __future__ import annotations

import torch
from torch import Tensor

from tsdb.core.noise import NoiseDistribution
from tsdb.core.precond import Preconditioning, RawNetwork


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
