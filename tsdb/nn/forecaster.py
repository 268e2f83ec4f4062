"""The DiffusionBlocks forecaster: instance normalization, B block denoisers that each own
a band of noise levels, and sampling along the probability-flow ODE.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..diffusion import NoiseDistribution, Preconditioning, block_for_sigma
from ..samplers import SAMPLERS
from .denoiser import BlockDenoiser, ContextEncoding


def instance_stats(values: Tensor) -> tuple[Tensor, Tensor]:
    """NaN-aware mean and std over the last axis, ``[batch, 1]`` each.

    A constant (or single-point) context gets scale 1 so it normalizes to zero rather than
    blowing up.
    """
    observed = ~torch.isnan(values)
    n = observed.sum(-1, keepdim=True).clamp_min(1)
    filled = torch.where(observed, values, torch.zeros_like(values))
    loc = filled.sum(-1, keepdim=True) / n
    var = torch.where(observed, (values - loc) ** 2, torch.zeros_like(values)).sum(-1, keepdim=True) / n
    scale = var.sqrt()
    scale = torch.where(scale > 1e-6 * (1.0 + loc.abs()), scale, torch.ones_like(scale))
    return loc, scale


def context_features(values: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    """``[batch, C]`` raw values (NaN = missing) -> ``[batch, C, 2]`` (normalized value, observed)."""
    observed = ~torch.isnan(values)
    normed = torch.where(observed, (values - loc) / scale, torch.zeros_like(values))
    return torch.stack([normed, observed.to(values.dtype)], dim=-1)


class DiffusionForecaster(nn.Module):
    """B ``BlockDenoiser``s; block i (0 = input side) owns the i-th highest noise band.

    ``edges`` are the ascending, un-widened band edges used to route a sigma to its block.
    """

    def __init__(self, blocks: list[BlockDenoiser], edges: Tensor,
                 noise: NoiseDistribution, precond: Preconditioning):
        super().__init__()
        if len(edges) != len(blocks) + 1:
            raise ValueError(f"{len(blocks)} blocks need {len(blocks) + 1} band edges, got {len(edges)}")
        self.blocks = nn.ModuleList(blocks)
        self.register_buffer("edges", edges.double(), persistent=True)
        self.noise = noise
        self.precond = precond

    @property
    def horizon(self) -> int:
        return self.blocks[0].shape.horizon

    @property
    def context_length(self) -> int:
        return self.blocks[0].shape.context_length

    def block_index(self, sigma: float) -> int:
        return int(block_for_sigma(float(sigma), self.edges.cpu()))

    def prepare(self, context: Tensor, target: Tensor | None = None, draws: Tensor | None = None):
        """Normalize a raw batch with context statistics (``draws`` pass through untouched).

        Returns ``(features, target_normalized, target_observed, loc, scale)``; NaN targets
        become 0 with observed mask 0 so they carry no loss.
        """
        loc, scale = instance_stats(context)
        features = context_features(context, loc, scale)
        if target is None:
            return features, None, None, loc, scale
        observed = ~torch.isnan(target)
        y = torch.where(observed, (target - loc) / scale, torch.zeros_like(target))
        return features, y, observed.to(target.dtype), loc, scale

    def encode(self, features: Tensor) -> list[ContextEncoding]:
        return [block.encode_context(features) for block in self.blocks]

    def denoiser(self, encodings: list[ContextEncoding]):
        """A k-diffusion style callable ``(z, sigma) -> D(z, sigma)`` routing sigma to its block."""

        def denoise(z: Tensor, sigma: Tensor) -> Tensor:
            i = self.block_index(sigma[0])
            block, ctx = self.blocks[i], encodings[i]
            return self.precond.denoise(lambda _x, zz, cn: block.denoise_future(ctx, zz, cn), None, z, sigma)

        return denoise

    @torch.no_grad()
    def sample(self, context: Tensor, num_samples: int, sigmas: Tensor, sampler: str = "heun",
               noise: Tensor | None = None, generator: torch.Generator | None = None,
               max_batch: int = 4096) -> Tensor:
        """Draw ``[batch, num_samples, H]`` raw-scale samples for raw contexts ``[batch, C]``.

        ``noise`` (standard normal, ``[batch, num_samples, H]``) makes sampling reproducible
        and is how exported graphs receive randomness.
        """
        n = context.shape[0]
        if noise is None:
            noise = torch.randn(n, num_samples, self.horizon, generator=generator,
                                device=context.device, dtype=context.dtype)
        features, _, _, loc, scale = self.prepare(context)
        sigmas = sigmas.to(context.device)
        out = torch.empty_like(noise)
        per_chunk = max(1, max_batch // num_samples)
        for start in range(0, n, per_chunk):
            sl = slice(start, min(n, start + per_chunk))
            encodings = [e.repeat(num_samples) for e in self.encode(features[sl])]
            x = noise[sl].reshape(-1, self.horizon) * sigmas[0]
            y = SAMPLERS[sampler](self.denoiser(encodings), x, sigmas)
            out[sl] = y.view(-1, num_samples, self.horizon)
        return out * scale[:, :, None] + loc[:, :, None]
