"""``depth``: the paper's split. B blocks, block i owns the i-th highest band of noise levels
(equi-probability or uniform partition, widened by gamma) and trains alone on it."""

from __future__ import annotations

from torch import Tensor

from tsdb.core import PARTITIONS, EDMLoss, SigmaSchedule, block_bands, edges_at, sampling_schedule
from tsdb.nn import BlockDenoiser, DenoiserShape, DiffusionForecaster
from tsdb.errors import TsdbError
from tsdb.strategies.base import Batch, Strategy, TrainUnit
from tsdb.strategies.depth.online import DepthStreaming


def denoiser_shape(cfg, n_layers: int) -> DenoiserShape:
    return DenoiserShape(cfg.context_length, cfg.horizon, cfg.patch_length, cfg.d_model, cfg.n_heads,
                         n_layers, cfg.mlp_ratio, cfg.dropout, cfg.num_covariates, cfg.linear_head)


class DepthStrategy(Strategy):
    name = "depth"
    streaming_class = DepthStreaming

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.n_layers % self.num_blocks:
            raise TsdbError(f"n_layers {cfg.n_layers} must be divisible by n_blocks {self.num_blocks}")

    @property
    def num_blocks(self) -> int:
        return self.cfg.n_blocks

    def fractions(self) -> Tensor:
        """Mass fractions of the band edges (the partition)."""
        return PARTITIONS[self.cfg.partition](self.num_blocks, self.noise)

    def edges(self) -> Tensor:
        return edges_at(self.fractions(), self.noise)

    def schedule(self, num_steps: int | None = None) -> SigmaSchedule:
        """The inference grid of K steps (default ``inference_steps``) and the block of each step."""
        return sampling_schedule(num_steps or self.cfg.inference_steps, self.fractions(), self.noise)

    def build(self) -> DiffusionForecaster:
        shape = denoiser_shape(self.cfg, self.cfg.n_layers // self.num_blocks)
        blocks = [BlockDenoiser(shape) for _ in range(self.num_blocks)]
        return DiffusionForecaster(blocks, self.edges(), self.noise, self.precond, self.cfg.location_window,
                                   self.cfg.seasonal_prior)

    def units(self, model: DiffusionForecaster) -> list[TrainUnit]:
        bands = block_bands(model.edges, self.cfg.gamma, self.noise)
        return [TrainUnit(f"block-{i}", block, self._block_loss(model, block, EDMLoss(self.noise, self.precond, band)))
                for i, (block, band) in enumerate(zip(model.blocks, bands))]

    @staticmethod
    def _block_loss(model: DiffusionForecaster, block: BlockDenoiser, loss: EDMLoss):
        def block_loss(batch: Batch) -> Tensor:
            features, y, observed, _, _ = model.prepare(*batch)
            return loss(block, features, y, draws=batch[2] if len(batch) > 2 else None,
                        target_mask=observed).mean()
        return block_loss

    def forecast(self, model, context, num_samples, num_steps=None, noise=None, generator=None, covariates=None):
        return model.sample(context, num_samples, self.schedule(num_steps), self.cfg.sampler, noise=noise, generator=generator,
                            covariates=covariates)

    def arm_name(self) -> str:
        suffix = "" if self.cfg.partition == "equiprob" else f"-{self.cfg.partition}"
        if self.cfg.gamma == 0:
            suffix += "-gamma0"
        return f"depth-b{self.num_blocks}{suffix}"
