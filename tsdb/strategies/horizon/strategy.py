"""``horizon``: the staircase split. The horizon is cut into B chunks at rising noise
levels; block j owns chunk j (band j), sees the whole noisy window plus the context and is
trained on chunk j's loss only. Sampling is the rolling state machine of
``tsdb.strategies.horizon.model``.

Inference steps: every value passes through B rolls of S sub-steps on its way from
``sigma_max`` to clean, so ``num_steps`` K (the per-trajectory step count, as for
``depth``) sets ``S = K / B``; the default K = 2B gives S = 2.

Cost: every sub-step runs all B blocks over the whole window, and a sample from a raw
context takes 2B rolls (B replaying the last H observed values, B forecasting), each with
context re-encoding per trajectory once the emitted chunks enter the context. At the
default shape this is roughly 5-10x the sampling time of ``depth`` at the same K;
streaming (one observed roll per H/B new values) amortizes the replay.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tsdb.errors import TsdbError
from tsdb.nn import BlockDenoiser
from tsdb.strategies.horizon.model import HorizonForecaster
from tsdb.strategies.base import Batch, Strategy, TrainUnit, masked_mean
from tsdb.strategies.depth.strategy import denoiser_shape
from tsdb.strategies.horizon.online import HorizonStreaming


def staircase_loss(model: HorizonForecaster, j: int, features: Tensor, z: Tensor, sigma: Tensor,
                   y: Tensor, observed: Tensor) -> Tensor:
    """Block j's loss ``[batch]`` on a noisy window ``z = y + sigma * eps`` (``sigma`` ``[b, H]``).

    The block reads every chunk of ``z`` but only chunk j of its output is scored, with
    the per-token weight ``w = 1 / c_out(sigma)^2``; other chunks are input, never target.
    """
    own = model.chunk(j)
    denoised = model.precond.denoise(model.blocks[j], features, z, sigma)[:, own]
    weight = model.precond.loss_weight(sigma[:, own])
    return masked_mean(weight * (denoised - y[:, own]) ** 2, observed[:, own])


class HorizonStrategy(Strategy):
    name = "horizon"
    streaming_class = HorizonStreaming

    def __init__(self, cfg):
        super().__init__(cfg)
        b, h, p = cfg.n_blocks, cfg.horizon, cfg.patch_length
        if h % b or (h // b) % p:
            raise TsdbError(f"horizon strategy: horizon {h} must split into n_blocks={b} chunks whose length "
                            f"is a multiple of patch_length {p}; use a horizon that is a multiple of {b * p}")
        for field in ("location_window", "seasonal_prior"):
            if getattr(cfg, field):
                raise TsdbError(f"horizon strategy: model.{field} is not supported yet; set it to 0")
        if cfg.n_layers % b:
            raise TsdbError(f"horizon strategy: n_layers {cfg.n_layers} must be divisible by n_blocks {b}")
        if cfg.context_length < h:
            raise TsdbError(f"horizon strategy: context_length {cfg.context_length} must be at least the "
                            f"horizon {h} (sampling replays the last horizon of the context)")

    @property
    def num_blocks(self) -> int:
        return self.cfg.n_blocks

    def build(self) -> HorizonForecaster:
        shape = denoiser_shape(self.cfg, self.cfg.n_layers // self.num_blocks)
        return HorizonForecaster([BlockDenoiser(shape) for _ in range(self.num_blocks)], self.noise, self.precond)

    def units(self, model: HorizonForecaster) -> list[TrainUnit]:
        return [TrainUnit(f"block-{j}", block, self._chunk_loss(model, j)) for j, block in enumerate(model.blocks)]

    @staticmethod
    def _chunk_loss(model: HorizonForecaster, j: int):
        def chunk_loss(batch: Batch) -> Tensor:
            features, y, observed, _, _ = model.prepare(*batch)
            # the batch's draws (phase u ~ U[0, 1) per sample, then eps per lead time) when given
            draws = batch[2] if len(batch) > 2 else torch.cat([torch.rand_like(y[:, :1]), torch.randn_like(y)], 1)
            sigma = model.window_sigma(draws[:, 0])
            z = y + sigma * draws[:, 1:]
            return staircase_loss(model, j, features, z, sigma, y, observed).mean()
        return chunk_loss

    def substeps(self, num_steps: int | None) -> int:
        """Sub-steps per roll, S = K / B."""
        k = num_steps or self.cfg.inference_steps
        if k % self.num_blocks:
            raise TsdbError(f"horizon strategy: num_steps {k} must be a multiple of n_blocks {self.num_blocks} "
                            f"(each value takes n_blocks rolls of num_steps / n_blocks sub-steps)")
        return k // self.num_blocks

    def forecast(self, model, context, num_samples, num_steps=None, noise=None, generator=None, covariates=None):
        """Samples ``[b, S, H]``; ``noise`` is ``[b, S, 3H]`` (see ``HorizonForecaster.sample``)."""
        return model.sample(context, num_samples, self.substeps(num_steps), self.cfg.sampler,
                            noise=noise, generator=generator, covariates=covariates)

    def arm_name(self) -> str:
        return f"horizon-b{self.num_blocks}"

    @classmethod
    def horizon_multiple(cls, cfg) -> int:
        """Whole chunks: ``n_blocks`` patches."""
        return cfg.patch_length * cfg.n_blocks
