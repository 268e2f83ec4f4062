"""``looped`` and ``looped-bptt``: one weight-tied core applied K times (recurrent depth).

The model is a ``LoopedDenoiser`` (prelude of ``n_layers - L_c`` context-only layers, a
core of ``L_c`` layers, a head) inside a one-block ``DiffusionForecaster``. Inference is
K Euler steps along ``sigma_grid(K)`` (the one-band schedule): exactly K applications of the core, so K is the
test-time compute knob (``num_steps``, independent of training; default
``inference_steps``).

- ``looped``: each training step applies the core once, at a random sigma per sample
  (the B = 1 EDM loss): no backpropagation through time, memory independent of K.
- ``looped-bptt``: the same model trained by unrolling ``loop_iters`` Euler steps from
  noise and backpropagating through all of them (memory grows linearly with K).
  Loss: the fair CRPS of two unrolled trajectories per series at the final output.
  A regression loss on the unrolled output (or on each iteration's denoised value along
  the model's own trajectory) is minimized by collapsing every trajectory onto the
  conditional mean, because the start noise is independent of the target; a proper
  scoring rule on samples keeps the sampler probabilistic and scores what evaluation
  scores. The start is ``sigma_0 * eps`` with the grid shifted by a random phase per
  trajectory, so training sees every sigma, not only the K grid points.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tsdb.core import NoiseDistribution
from tsdb.errors import TsdbError
from tsdb.nn import DiffusionForecaster
from tsdb.strategies.looped.model import LoopedDenoiser
from tsdb.core.samplers import to_d
from tsdb.strategies.base import Batch, TrainUnit, masked_mean
from tsdb.strategies.depth.strategy import DepthStrategy, denoiser_shape
from tsdb.strategies.looped.online import LoopedStreaming


def shifted_grid(num_steps: int, phase: Tensor, noise: NoiseDistribution) -> Tensor:
    """Per-trajectory grids ``[N, K + 1]``: mass fractions ``1 - (i + u) / K``, then 0.

    ``phase`` ``u = 0`` gives ``sigma_grid(K)``.
    """
    i = torch.arange(num_steps, dtype=torch.float64, device=phase.device)
    sigmas = noise.sigma_at(1.0 - (i + phase[:, None].double()) / num_steps).float()
    return torch.cat([sigmas, sigmas.new_zeros(len(phase), 1)], dim=1)


def fair_crps(x1: Tensor, x2: Tensor, y: Tensor) -> Tensor:
    """Unbiased two-sample CRPS per position: (|x1 - y| + |x2 - y| - |x1 - x2|) / 2."""
    return 0.5 * ((x1 - y).abs() + (x2 - y).abs() - (x1 - x2).abs())


def unrolled_crps(model: DiffusionForecaster, batch: Batch, iters: int) -> Tensor:
    """Mean fair CRPS of two ``iters``-step Euler trajectories per series, differentiable end to end.

    The two trajectories of a series take their grid phase and start noise from the batch's
    two draw sets (``[b, 2 * (1 + H)]``: u, then eps, per trajectory), so every random
    number comes from the data stream, like the EDM loss's. ``iters = 1`` is the same loss
    without unrolling: one application of the core from pure noise at a random sigma.
    """
    features, y, observed, _, _ = model.prepare(*batch)
    if len(batch) < 3 or batch[2].shape[-1] != 2 * (1 + y.shape[1]):
        raise TsdbError(f"looped-bptt needs two draw sets per window (draws [batch, {2 * (1 + y.shape[1])}]: "
                        "TrainingWindows(draw_sets=2)); got "
                        f"{'none' if len(batch) < 3 else list(batch[2].shape)}")
    draws = batch[2].reshape(y.shape[0] * 2, 1 + y.shape[1])  # series-major: rows 2i, 2i + 1 are series i's
    denoise, = model.denoisers([e.repeat(2) for e in model.encode(features)])  # prelude once per series
    sigmas = shifted_grid(iters, draws[:, 0], model.noise)
    x = sigmas[:, :1] * draws[:, 1:]
    for i in range(iters):
        s, s_next = sigmas[:, i:i + 1], sigmas[:, i + 1:i + 2]
        x = x + (s_next - s) * to_d(x, s, denoise(x, s[:, 0]))
    x1, x2 = x.view(y.shape[0], 2, -1).unbind(1)
    return masked_mean(fair_crps(x1, x2, y), observed).mean()


class LoopedStrategy(DepthStrategy):
    name = "looped"
    streaming_class = LoopedStreaming

    def __init__(self, cfg):
        super().__init__(cfg)
        if not 0 < self.core_layers <= cfg.n_layers:
            raise TsdbError(f"{self.name} strategy: core_layers {cfg.core_layers} must be between 1 and "
                            f"n_layers {cfg.n_layers}")

    @property
    def num_blocks(self) -> int:
        return 1

    @property
    def core_layers(self) -> int:
        return self.cfg.core_layers or max(1, self.cfg.n_layers // 2)

    def build(self) -> DiffusionForecaster:
        core = LoopedDenoiser(denoiser_shape(self.cfg, self.core_layers), self.cfg.n_layers - self.core_layers)
        return DiffusionForecaster([core], self.edges(), self.noise, self.precond, self.cfg.location_window,
                                   self.cfg.seasonal_prior)

    def forecast(self, model, context, num_samples, num_steps=None, noise=None, generator=None, covariates=None):
        """K Euler steps = K applications of the core."""
        return model.sample(context, num_samples, self.schedule(num_steps), "euler", noise=noise, generator=generator,
                            covariates=covariates)

    def arm_name(self) -> str:
        return "looped"

    @property
    def sampler(self) -> str:
        return "euler"  # one application of the weight-tied core per step

    def describe(self) -> str:
        prelude = self.cfg.n_layers - self.core_layers
        return f"a prelude of {prelude} layers and a core of {self.core_layers} layers applied once per sampler step"


class LoopedBPTTStrategy(LoopedStrategy):
    name = "looped-bptt"
    draw_sets = 2   # two trajectories per window

    def units(self, model: DiffusionForecaster) -> list[TrainUnit]:
        return [TrainUnit("block-0", model.blocks[0], lambda batch: unrolled_crps(model, batch, self.cfg.loop_iters))]

    def arm_name(self) -> str:
        return f"looped-bptt-k{self.cfg.loop_iters}"
