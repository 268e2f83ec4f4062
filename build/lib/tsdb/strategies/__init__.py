"""Split strategies behind one interface; ``get_strategy(cfg)`` picks one by ``cfg.strategy``."""

from __future__ import annotations

from tsdb.config import ModelConfig
from tsdb.errors import TsdbError
from tsdb.strategies.base import Batch, Strategy, StreamingSupport, TrainUnit
from tsdb.strategies.depth.strategy import DepthStrategy
from tsdb.strategies.depth.e2e import EndToEndStrategy
from tsdb.strategies.horizon.strategy import HorizonStrategy
from tsdb.strategies.looped.strategy import LoopedBPTTStrategy, LoopedStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (DepthStrategy, EndToEndStrategy, HorizonStrategy, LoopedStrategy,
                              LoopedBPTTStrategy)}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator adding a strategy to the registry (a package outside tsdb can add one)."""
    STRATEGIES[cls.name] = cls
    return cls


def streamable() -> list[str]:
    """Names of the strategies whose models stream (export to ONNX, ``tsdb bench streaming``)."""
    return sorted(name for name, cls in STRATEGIES.items() if cls.streaming_class is not None)


def get_strategy(cfg: ModelConfig) -> Strategy:
    try:
        return STRATEGIES[cfg.strategy](cfg)
    except KeyError:
        raise TsdbError(f"unknown strategy {cfg.strategy!r}; choose one of {sorted(STRATEGIES)}") from None


__all__ = ["Batch", "STRATEGIES", "Strategy", "StreamingSupport", "TrainUnit", "get_strategy", "register", "streamable"]
