"""The ``horizon`` split: staircase noise over the horizon and the rolling sampler.

The horizon is cut into B chunks of ``c = H / B`` steps. At phase ``u`` chunk j carries

    sigma_j(u) = sigma(q_min + (q_max - q_min) (j + 1 - u) / B)

(``sigma`` = the quantile function of the training noise distribution), so noise rises
with lead time, chunk j always sits in band j of the equi-probability partition and
block j owns it. Block j sees the whole noisy window plus the context and denoises only
its chunk.

Inference is a state machine over explicit tensors (what streaming builds on):

- state: ``window`` ``[N, H]`` (normalized, a staircase at phase 0), the context right
  before it (as raw values or per-block ``ContextEncoding``s), frozen ``loc``/``scale``;
- a *roll* (:meth:`HorizonForecaster.roll`): S sub-steps (:meth:`HorizonForecaster.advance`)
  move every chunk from ``sigma_j(0)`` to ``sigma_j(1)`` (all blocks at once), then chunk 0, now at
  ``sigma_min``, is emitted, the window shifts by one chunk and a fresh chunk at the
  staircase top (``sigma_max``) is appended. Since ``sigma_j(1) = sigma_{j-1}(0)`` the
  shifted window is again a staircase at phase 0;
- :meth:`HorizonForecaster.observe`: a roll whose emitted chunk is replaced by observed
  values (teacher forcing; one per ``c`` new observations when streaming);
- :meth:`HorizonForecaster.forecast_rolls`: rolls whose emitted chunks become context
  (autoregressive), producing the samples;
- :meth:`HorizonForecaster.sample`: cold start from raw contexts (window over the last H
  observed values as truth + staircase noise, B observed rolls, then B forecast rolls).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tsdb.core import NoiseDistribution, Preconditioning
from tsdb.core.samplers import SAMPLERS
from tsdb.nn.denoiser import BlockDenoiser, ContextEncoding, CovariateFeatures
from tsdb.nn.forecaster import (DiffusionForecaster, check_covariates, context_features, instance_stats,
                         normalize_covariates)


def staircase(phase: Tensor | float, num_chunks: int, noise: NoiseDistribution) -> Tensor:
    """``sigma_j(u)`` for ``j = 0..B-1``: ``[..., B]`` float32 for ``phase`` of shape ``[...]``.

    Chunk 0 is the lowest; the top (``j = B-1``, ``u = 0``) is ``sigma_max`` and the bottom
    (``j = 0``, ``u = 1``) is ``sigma_min``. Band j's bottom at ``u = 1`` is, to the bit, band
    ``j-1``'s top at ``u = 0`` (same quantile), which is what makes a roll continuous.
    """
    phase = torch.as_tensor(phase, dtype=torch.float64)
    j = torch.arange(num_chunks, dtype=torch.float64, device=phase.device)
    q = noise.q_min + (noise.q_max - noise.q_min) * (j + 1 - phase[..., None]) / num_chunks
    return noise.quantile(q).float()


class HorizonForecaster(nn.Module):
    """B ``BlockDenoiser``s over the whole window; block j denoises chunk j only.

    Blocks, instance normalization and context encoding are those of the depth split
    (borrowed from ``DiffusionForecaster``); what differs is which positions a block owns.
    """

    horizon = DiffusionForecaster.horizon
    context_length = DiffusionForecaster.context_length
    num_covariates = DiffusionForecaster.num_covariates
    prepare = DiffusionForecaster.prepare
    encode = DiffusionForecaster.encode
    location_window = 0   # centred on the context mean (HorizonStrategy refuses a location window
    seasonal_prior = 0    # and a seasonal prior)

    def __init__(self, blocks: list[BlockDenoiser], noise: NoiseDistribution, precond: Preconditioning):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.noise = noise
        self.precond = precond

    @property
    def num_chunks(self) -> int:
        return len(self.blocks)

    @property
    def chunk_length(self) -> int:
        return self.horizon // self.num_chunks

    def chunk(self, j: int) -> slice:
        """Positions of chunk j in the window."""
        return slice(j * self.chunk_length, (j + 1) * self.chunk_length)

    def window_sigma(self, phase: Tensor | float) -> Tensor:
        """Per-position sigma ``[..., H]`` of a window at phase ``u`` (shape ``[...]``)."""
        return staircase(phase, self.num_chunks, self.noise).repeat_interleave(self.chunk_length, dim=-1)

    def staircase_window(self, y: Tensor, eps: Tensor) -> Tensor:
        """``y + sigma(0) * eps``: a window ``[N, H]`` of (normalized) values at phase 0."""
        return y + self.window_sigma(0.0).to(y) * eps

    def denoiser(self, encodings: list[ContextEncoding]):
        """``(z, sigma [N, H]) -> D``: chunk j of the window denoised by block j.

        Every block reads the whole window; the blocks are independent and could run in
        parallel.
        """
        def denoise(z: Tensor, sigma: Tensor) -> Tensor:
            return torch.cat([self.precond.denoise(block.denoise_future, ctx, z, sigma)[:, self.chunk(j)]
                              for j, (block, ctx) in enumerate(zip(self.blocks, encodings))], dim=-1)
        return denoise

    def features(self, history: Tensor, loc: Tensor, scale: Tensor, covariates: Tensor | None = None):
        """Context features of raw ``history`` ``[N, T]``; with ``covariates`` (normalized,
        ``[N, >= T + H, n_cov]`` from the history's first position) a ``CovariateFeatures``
        whose future part covers the window right after the history."""
        f = context_features(history, loc, scale)
        if covariates is None:
            return f
        t = history.shape[1]
        return CovariateFeatures(torch.cat([f, covariates[:, :t]], dim=-1), covariates[:, t:t + self.horizon])

    # -- the state machine ----------------------------------------------------------------
    def advance(self, window: Tensor, encodings: list[ContextEncoding], phase: float, phase_next: float,
                substeps: int, sampler: str = "heun") -> Tensor:
        """Move every chunk from ``sigma_j(phase)`` to ``sigma_j(phase_next)`` in ``substeps`` steps."""
        phases = torch.linspace(phase, phase_next, substeps + 1, dtype=torch.float64)
        return SAMPLERS[sampler](self.denoiser(encodings), window, self.window_sigma(phases).to(window))

    def roll(self, window: Tensor, encodings: list[ContextEncoding], fresh: Tensor, substeps: int,
             sampler: str = "heun") -> tuple[Tensor, Tensor]:
        """One roll (S sub-steps, the last one Euler) of a window at phase 0 whose context is
        ``encodings`` (one per block).

        ``fresh`` ``[N, c]`` is the standard normal noise of the appended chunk (an input,
        so runs are reproducible). Returns the emitted chunk ``[N, c]`` (normalized, at
        ``sigma_min``) and the next window at phase 0.
        """
        last = 1.0 - 1.0 / substeps
        z = self.advance(window, encodings, 0.0, last, substeps - 1, sampler)
        # The sub-step landing chunk 0 on sigma_min is first order, as EDM's last step: a
        # second-order correction evaluated there (c_out ~ 0) amplifies the denoiser's error.
        z = self.advance(z, encodings, last, 1.0, 1, "euler")
        c = self.chunk_length
        top = self.window_sigma(0.0)[-c:].to(window)
        return z[:, :c], torch.cat([z[:, c:], top * fresh], dim=-1)

    def observe(self, window: Tensor, history: Tensor, values: Tensor, loc: Tensor, scale: Tensor,
                fresh: Tensor, substeps: int, sampler: str = "heun",
                covariates: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """A teacher-forced roll: chunk 0 is replaced by the observed ``values`` ``[n, c]``.

        ``history`` ``[n, C]`` raw values right before the window, one row per series;
        ``window`` ``[n * S, H]`` holds S sample windows per series (series-major), which
        share the series' context encoding. ``covariates``: normalized ``[n, C + H, n_cov]``
        over history and window (models with covariates). Returns the next ``(window, history)``.
        """
        samples = window.shape[0] // history.shape[0]
        encodings = [e.repeat(samples) for e in self.encode(self.features(history, loc, scale, covariates))]
        _, window = self.roll(window, encodings, fresh, substeps, sampler)
        return window, torch.cat([history[:, self.chunk_length:], values], dim=-1)

    def forecast_rolls(self, window: Tensor, history: Tensor, loc: Tensor, scale: Tensor, fresh: Tensor,
                       substeps: int, sampler: str = "heun", covariates: Tensor | None = None) -> Tensor:
        """``R = fresh.shape[1]`` rolls from a state, each emitted chunk becoming context.

        ``window``, ``history`` (raw), ``loc``, ``scale`` have one row per trajectory;
        ``fresh`` is ``[N, R, c]``. ``covariates`` (models with covariates): normalized
        ``[N, C + H + (R - 1) c, n_cov]`` from the history's first position. Returns raw
        samples ``[N, R * c]``.
        """
        out = []
        for r in range(fresh.shape[1]):
            cov = None if covariates is None else covariates[:, r * self.chunk_length:]
            encodings = self.encode(self.features(history, loc, scale, cov))
            emitted, window = self.roll(window, encodings, fresh[:, r], substeps, sampler)
            emitted = emitted * scale + loc
            history = torch.cat([history[:, self.chunk_length:], emitted], dim=-1)
            out.append(emitted)
        return torch.cat(out, dim=-1)

    @torch.no_grad()
    def sample(self, context: Tensor, num_samples: int, substeps: int, sampler: str = "heun",
               noise: Tensor | None = None, generator: torch.Generator | None = None,
               max_batch: int = 4096, covariates: Tensor | None = None) -> Tensor:
        """Raw-scale samples ``[n, num_samples, H]`` for raw contexts ``[n, C]`` (C >= H).

        ``noise`` ``[n, num_samples, 3H]`` standard normal: the initial window's staircase
        noise (H values), then the chunk appended by each of the 2B rolls. ``covariates``
        ``[n, n_cov, C + H]`` raw (models with covariates).
        """
        n = context.shape[0]
        check_covariates(covariates, context, self.num_covariates, self.horizon)
        if noise is None:
            noise = torch.randn(n, num_samples, 3 * self.horizon, generator=generator,
                                device=context.device, dtype=context.dtype)
        per_chunk = max(1, max_batch // num_samples)
        return torch.cat([self._cold_start(context[i:i + per_chunk], noise[i:i + per_chunk], substeps, sampler,
                                           None if covariates is None else covariates[i:i + per_chunk])
                          for i in range(0, n, per_chunk)])

    def _cold_start(self, context: Tensor, noise: Tensor, substeps: int, sampler: str,
                    covariates: Tensor | None = None) -> Tensor:
        """Window over the last H observed values (truth + staircase noise), B observed
        rolls (the context grows back to ``context``), then B forecast rolls.

        Normalization statistics are those of the whole ``context`` and stay frozen; missing
        values in the window start at the context mean (0) and reach the context as NaN.
        Covariates are normalized with their own context statistics (frozen too), NaN
        before the context; the last ``H - c`` positions of the later forecast rolls' windows
        lie past the horizon (never emitted) and hold the last known covariate values.
        """
        (n, length), samples = context.shape, noise.shape[1]
        b, c, h = self.num_chunks, self.chunk_length, self.horizon
        eps = noise.reshape(n * samples, 3 * b, c)
        loc, scale = instance_stats(context)
        cov = None
        if covariates is not None:  # a timeline over positions [-h, C + 2H - c)
            cov_loc, cov_scale = instance_stats(covariates[..., :length])
            k = covariates.shape[1]
            timeline = torch.cat([covariates.new_full((n, k, h), float("nan")), covariates,
                                  covariates[..., -1:].expand(n, k, h - c)], dim=-1)
            cov = normalize_covariates(timeline, cov_loc, cov_scale)
        truth = context[:, length - h:]
        y = torch.nan_to_num((truth - loc) / scale, nan=0.0).repeat_interleave(samples, 0)
        window = self.staircase_window(y, eps[:, :b].flatten(1))
        history = F.pad(context[:, :length - h], (h, 0), value=float("nan"))
        for r in range(b):
            window, history = self.observe(window, history, truth[:, self.chunk(r)], loc, scale,
                                           eps[:, b + r], substeps, sampler,
                                           None if cov is None else cov[:, r * c:r * c + length + h])
        history, loc, scale = (t.repeat_interleave(samples, 0) for t in (history, loc, scale))
        if cov is not None:
            cov = cov[:, b * c:].repeat_interleave(samples, 0)
        out = self.forecast_rolls(window, history, loc, scale, eps[:, 2 * b:], substeps, sampler, cov)
        return out.view(n, samples, h)
