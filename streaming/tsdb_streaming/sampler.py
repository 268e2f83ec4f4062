"""Probability-flow ODE samplers (Euler, Heun) over denoiser callables, in numpy.

The numpy twin of ``tsdb``'s torch samplers, the one copy the runtime has. ``sigmas`` is
either a descending 1-D grid (``[steps + 1]``, one noise level per step: depth / e2e /
looped exports, the metadata's ``sigmas`` or ``schedules[K]["sigmas"]``) or a grid of
per-position rows (``[steps + 1, H]``: the horizon staircase, the metadata's
``roll_sigmas``), which the denoiser receives row by row.

``denoiser`` is one callable ``(x, sigma) -> denoised`` or one per block with ``blocks[k]``
naming the block that takes step ``k`` (the metadata's ``step_blocks`` /
``schedules[K]["blocks"]``; both evaluations of a Heun step use it). ``callback(step,
sigma, block)``, if given, is called once per step before its first evaluation (as
k-diffusion's per-step callback; ``sigma`` is the step's largest noise level).

Heun's method takes a first-order (Euler) final step: the step that lands on 0 (EDM) or,
on a per-position grid, on the smallest noise level, where a second-order correction
evaluated at ``c_out ~ 0`` amplifies the denoiser's error.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

Denoiser = Callable[[np.ndarray, np.ndarray], np.ndarray]
StepCallback = Callable[[int, float, int], None]
METHODS = ("euler", "heun")


def sample(method: str, denoiser: Denoiser | Sequence[Denoiser], x: np.ndarray, sigmas: np.ndarray,
           blocks: Sequence[int] | None = None, callback: StepCallback | None = None) -> np.ndarray:
    """Integrate ``x`` (at noise level ``sigmas[0]``) along the grid with ``method``."""
    if method not in METHODS:
        raise ValueError(f"unknown sampler {method!r} (known: {list(METHODS)})")
    sigmas = np.asarray(sigmas, dtype=np.float32)
    steps = len(sigmas) - 1
    if blocks is None:
        if not callable(denoiser):
            raise ValueError("one denoiser per block needs the block of each step (blocks=)")
        denoisers, blocks = [denoiser], [0] * steps
    else:
        if len(blocks) != steps:
            raise ValueError(f"{steps} steps but {len(blocks)} step blocks")
        denoisers = [denoiser] * (max(blocks) + 1) if callable(denoiser) else list(denoiser)
    half = np.float32(2)
    for i in range(steps):
        s, s_next, block = sigmas[i], sigmas[i + 1], int(blocks[i])
        denoise = denoisers[block]
        if callback is not None:
            callback(i, float(np.max(s)), block)
        d = (x - denoise(x, s)) / s
        x_euler = x + (s_next - s) * d
        if method == "euler" or i == steps - 1:
            x = x_euler
        else:
            d_next = (x_euler - denoise(x_euler, s_next)) / s_next
            x = x + (s_next - s) * (d + d_next) / half
    return x


__all__ = ["Denoiser", "METHODS", "StepCallback", "sample"]
