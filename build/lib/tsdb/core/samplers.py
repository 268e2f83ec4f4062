"""Probability-flow ODE samplers over denoiser callables ``(x, sigma) -> denoised``.

``sigmas`` is a descending 1-D grid ending in 0 (see ``tsdb.core.SigmaSchedule``), or a
grid of per-position rows ``[steps + 1, H]`` (every position descending, none reaching 0
before the last row; see ``tsdb.strategies.horizon.model``).

``model`` is one denoiser, or one per block with ``blocks[k]`` naming the block that takes
step k (both evaluations of a Heun step use it). ``callback(step, sigma, block)``, if given,
is called once per step before its first evaluation (as k-diffusion's per-step callback).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, float, int], None]


def to_d(x: Tensor, sigma: Tensor | float, denoised: Tensor) -> Tensor:
    """ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma."""
    return (x - denoised) / sigma


class _Steps:
    """The grid as host values (one transfer, no sync per step) and the denoiser of each step."""

    def __init__(self, model: Denoiser | Sequence[Denoiser], sigmas: Tensor, blocks: Sequence[int] | None):
        self.rows = sigmas.dim() > 1
        self.sigmas = sigmas if self.rows else sigmas.tolist()
        self.last_zero = (sigmas == 0).reshape(len(sigmas), -1).all(-1).tolist()
        self.count = len(sigmas) - 1
        if blocks is None:
            if not callable(model):
                raise ValueError("one denoiser per block needs the block of each step (blocks=)")
            self.models, self.blocks = [model], [0] * self.count
        else:
            if len(blocks) != self.count:
                raise ValueError(f"{self.count} steps but {len(blocks)} step blocks")
            self.models, self.blocks = ([model] * (max(blocks) + 1) if callable(model) else list(model)), list(blocks)

    def sigma(self, x: Tensor, i: int) -> Tensor:
        """Grid point i as the denoiser's sigma: per sample ``[batch]``, or a row of per-position
        sigmas (``[H]`` or ``[batch, H]``, e.g. the horizon staircase) broadcast to ``x``."""
        if self.rows:
            return self.sigmas[i].to(x.dtype).expand_as(x)
        return x.new_full((x.shape[0],), self.sigmas[i])

    def __iter__(self):
        for i in range(self.count):
            yield i, self.sigmas[i], self.sigmas[i + 1], self.models[self.blocks[i]]


def _notify(callback: StepCallback | None, steps: _Steps, i: int) -> None:
    if callback is not None:
        s = steps.sigmas[i]
        callback(i, s if not steps.rows else float(s.max()), steps.blocks[i])


@torch.no_grad()
def sample_euler(model: Denoiser | Sequence[Denoiser], x: Tensor, sigmas: Tensor,
                 blocks: Sequence[int] | None = None, callback: StepCallback | None = None) -> Tensor:
    """Euler steps: x_next = x + (s_next - s) (x - D(x, s)) / s (the sign the paper misprints)."""
    steps = _Steps(model, sigmas, blocks)
    for i, s, s_next, denoise in steps:
        _notify(callback, steps, i)
        x = x + (s_next - s) * to_d(x, s, denoise(x, steps.sigma(x, i)))
    return x


@torch.no_grad()
def sample_heun(model: Denoiser | Sequence[Denoiser], x: Tensor, sigmas: Tensor,
                blocks: Sequence[int] | None = None, callback: StepCallback | None = None) -> Tensor:
    """Heun's second-order method (EDM Algorithm 1 without churn); Euler on the last step to 0."""
    steps = _Steps(model, sigmas, blocks)
    for i, s, s_next, denoise in steps:
        _notify(callback, steps, i)
        d = to_d(x, s, denoise(x, steps.sigma(x, i)))
        x_euler = x + (s_next - s) * d
        if steps.last_zero[i + 1]:
            x = x_euler
        else:
            d_next = to_d(x_euler, s_next, denoise(x_euler, steps.sigma(x, i + 1)))
            x = x + (s_next - s) * (d + d_next) / 2
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler,
    "heun": sample_heun,
}
