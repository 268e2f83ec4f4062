"""Probability-flow ODE samplers over any denoiser callable ``(x, sigma) -> denoised``.

``sigmas`` is a descending 1-D grid ending in 0 (see ``tsdb.diffusion.sigma_grid``), or a
grid of per-position rows ``[steps + 1, H]`` (every position descending, none reaching 0
before the last row; see ``tsdb.nn.horizon``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma."""
    return (x - denoised) / sigma


def _full(x: Tensor, sigma: Tensor) -> Tensor:
    """A grid point as the denoiser's sigma: a scalar is per sample ``[batch]``; a row of
    per-position sigmas (``[H]`` or ``[batch, H]``, e.g. the horizon staircase) keeps its positions."""
    sigma = sigma.to(x.dtype)
    return sigma.expand(x.shape[0]) if sigma.dim() == 0 else sigma.expand_as(x)


@torch.no_grad()
def sample_euler(model: Denoiser, x: Tensor, sigmas: Tensor) -> Tensor:
    """Euler steps: x_next = x + (s_next - s) (x - D(x, s)) / s (the sign the paper misprints)."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _full(x, s))
        x = x + (s_next - s) * to_d(x, s, denoised)
    return x


@torch.no_grad()
def sample_heun(model: Denoiser, x: Tensor, sigmas: Tensor) -> Tensor:
    """Heun's second-order method (EDM Algorithm 1 without churn); Euler on the last step to 0."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = to_d(x, s, model(x, _full(x, s)))
        x_euler = x + (s_next - s) * d
        if (s_next == 0).all():
            x = x_euler
        else:
            d_next = to_d(x_euler, s_next, model(x_euler, _full(x, s_next)))
            x = x + (s_next - s) * (d + d_next) / 2
    return x


SAMPLERS: dict[str, Callable[[Denoiser, Tensor, Tensor], Tensor]] = {
    "euler": sample_euler,
    "heun": sample_heun,
}
