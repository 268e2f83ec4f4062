"""Integrations with other forecasting libraries, imported on demand so that tsdb does not
pull them in: ``tsdb.integrations.gluonts`` (``TsdbEstimator``) and
``tsdb.integrations.sktime`` (``TsdbForecaster``, needs ``pip install tsdb[sktime]``)."""

from __future__ import annotations

from tsdb.config import ModelConfig


def model_horizon(model: ModelConfig, steps: int) -> int:
    """The smallest horizon of ``model``'s shape that covers ``steps`` (whole patches, or what
    the strategy needs, e.g. whole chunks)."""
    from tsdb.strategies import STRATEGIES

    unit = STRATEGIES[model.strategy].horizon_multiple(model)
    return -(-steps // unit) * unit
