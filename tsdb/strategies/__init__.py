"""Split strategies behind one interface; ``get_strategy(cfg)`` picks one by ``cfg.strategy``."""

from __future__ import annotations

from ..config import ModelConfig
from ..errors import TsdbError
from .base import Batch, Strategy, TrainUnit
from .depth import DepthStrategy
from .e2e import EndToEndStrategy
from .horizon import HorizonStrategy
from .looped import LoopedBPTTStrategy, LoopedStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (DepthStrategy, EndToEndStrategy, HorizonStrategy, LoopedStrategy,
                              LoopedBPTTStrategy)}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator adding a strategy to the registry."""
    STRATEGIES[cls.name] = cls
    return cls


def get_strategy(cfg: ModelConfig) -> Strategy:
    try:
        return STRATEGIES[cfg.strategy](cfg)
    except KeyError:
        raise TsdbError(f"unknown strategy {cfg.strategy!r}; choose one of {sorted(STRATEGIES)}") from None


__all__ = ["Batch", "STRATEGIES", "Strategy", "TrainUnit", "get_strategy", "register"]
