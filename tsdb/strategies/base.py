"""The interface every split strategy implements.

A strategy builds the model from a ``ModelConfig``, says which independently trained
*units* the model is made of (a unit is a set of parameters with its own loss), and
draws forecast samples. Training, evaluation, checkpoints and the CLI only talk to this
interface, so a new strategy is one new package registered in ``strategies/__init__`` (or with
``tsdb.strategies.register``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import Tensor, nn

from tsdb.config import ModelConfig
from tsdb.core import NoiseDistribution, Preconditioning

# (context [b, C] raw with NaN, target [b, H] raw with NaN[, draws [b, 1 + H][, covariates
# [b, n_cov, C + H]]]): draws are the step's random numbers (u ~ U[0,1), then eps ~ N(0,1) per
# lead time), drawn with the data; covariates (models with num_covariates > 0) are raw values
# over context and horizon. ``model.prepare(*batch)`` takes every form.
Batch = tuple[Tensor, ...]


def masked_mean(values: Tensor, observed: Tensor) -> Tensor:
    """Mean over the last axis of the observed entries, ``[batch]``: missing targets carry no loss."""
    return (values * observed).sum(-1) / observed.sum(-1).clamp_min(1.0)


@dataclass
class TrainUnit:
    """Parameters trained together, alone, with their own loss ``loss(batch) -> scalar``."""

    name: str
    module: nn.Module
    loss: Callable[[Batch], Tensor]


class Strategy(ABC):
    name: ClassVar[str]
    # how the strategy's models stream (ONNX export, streaming benchmark); None: they do not
    streaming_class: ClassVar[type["StreamingSupport"] | None] = None
    # independent (u, eps) sets per training window that the units' losses read from the
    # batch's draws (``TrainingWindows(draw_sets=...)``): every random number of a training
    # step comes from the data stream
    draw_sets: ClassVar[int] = 1

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.noise = NoiseDistribution(cfg.p_mean, cfg.p_std, cfg.sigma_min, cfg.sigma_max)
        self.precond = Preconditioning(cfg.sigma_data)

    @abstractmethod
    def build(self) -> nn.Module:
        """A freshly initialised model (all units)."""

    @abstractmethod
    def units(self, model: nn.Module) -> list[TrainUnit]:
        """The units of ``model`` in training order."""

    @abstractmethod
    def forecast(self, model: nn.Module, context: Tensor, num_samples: int,
                 num_steps: int | None = None, noise: Tensor | None = None,
                 generator: torch.Generator | None = None, covariates: Tensor | None = None) -> Tensor:
        """Raw-scale samples ``[batch, num_samples, H]`` for raw contexts ``[batch, C]``.

        ``covariates`` ``[batch, num_covariates, C + H]`` (raw; the last H steps are the known
        future) is required by a model built with ``num_covariates > 0``.
        """

    def arm_name(self) -> str:
        """Name in results tables, pattern ``strategy-bN[-variant]``."""
        return self.name

    # one denoiser over the whole sigma range whose layers can be cut into depth blocks
    # (tsdb.pretrain.convert: a pretrained end-to-end model converted to DiffusionBlocks)
    convertible_to_blocks: bool = False

    def describe(self) -> str:
        """The model's layout in words (reports)."""
        return f"{self.cfg.n_layers} layers in {self.cfg.n_blocks} blocks"

    @property
    def sampler(self) -> str:
        """The sampler this strategy forecasts with."""
        return self.cfg.sampler

    @classmethod
    def horizon_multiple(cls, cfg: ModelConfig) -> int:
        """Model horizons are whole multiples of this (a patch; more for strategies that cut
        the horizon into chunks)."""
        return cfg.patch_length

    def streaming(self) -> "StreamingSupport | None":
        """Online inference for this strategy's models (None: the strategy does not stream)."""
        return None if self.streaming_class is None else self.streaming_class(self)


class StreamingSupport(ABC):
    """Online inference of one strategy's models: its ONNX export for the torch-free runtime
    (a format ``tsdb_streaming`` registers) and its part of ``tsdb bench streaming``. The
    torch state machines themselves live in each strategy's ``streaming`` module.

    ``bench_model``: the ``ModelConfig`` fields of ``tsdb bench streaming --strategy NAME``.
    """

    bench_model: ClassVar[dict] = {}
    sweeps_samples: ClassVar[bool] = True   # the benchmark also times forecasts against the sample count
    # the runtime's forecast takes the standard-normal noise ``strategy.forecast`` takes ([b, S, H]),
    # so a streamed and a cold forecast can share their noise
    same_forecast_noise: ClassVar[bool] = True

    def __init__(self, strategy: Strategy):
        self.strategy = strategy

    @abstractmethod
    def export(self, model: nn.Module, out_dir, num_steps: int | None = None) -> dict:
        """Write the ONNX graphs and ``tsdb_model.json`` to ``out_dir``; returns the metadata."""

    @abstractmethod
    def measure(self, model: nn.Module, runtime, history, t: int, warmup: int, updates: int, num_samples: int,
                rng) -> tuple[dict, float, float, int]:
        """Time streaming (runtime and torch) against recomputation after ``t`` values of
        ``history``; returns ``(times ms per key of tsdb.bench.streaming.TIMED, parity runtime
        vs torch, parity stream vs recompute, cached tokens)``."""

    @abstractmethod
    def calls_per_forecast(self) -> int:
        """Block (denoiser graph) calls per forecast."""

    def explain(self, res: dict) -> list[str]:
        """Where a streamed forecast's time goes, for the benchmark report (``res``: its results)."""
        s, c = res["setup"], res["model"]["config"]
        return [
            "Where the time goes: a forecast runs the sampler, "
            f"{s['denoiser_calls_per_forecast']} denoiser calls over {s['num_samples']} samples x "
            f"{c['horizon'] // c['patch_length']} future tokens, whatever the history; streaming removes the "
            "context encoding (the update column) but not the sampler, so the speedup over recomputation is "
            "1 + encode / sample and reaches large factors only when the history is long compared with the "
            "sampling work.",
        ]

    def runtime_options(self, num_samples: int) -> dict:
        """Keyword arguments of ``tsdb_streaming.StreamingForecaster`` for the benchmark."""
        return {}
