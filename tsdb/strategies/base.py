"""The interface every split strategy implements.

A strategy builds the model from a ``ModelConfig``, says which independently trained
*units* the model is made of (a unit is a set of parameters with its own loss), and
draws forecast samples. Training, evaluation, checkpoints and the CLI only talk to this
interface, so a new strategy is one new module registered in ``strategies/__init__``.
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
