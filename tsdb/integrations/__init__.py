"""Integrations with other forecasting libraries, imported on demand so that tsdb does not
pull them in: ``tsdb.integrations.gluonts`` (``TsdbEstimator``) and
``tsdb.integrations.sktime`` (``TsdbForecaster``, needs ``pip install tsdb[sktime]``)."""

from __future__ import annotations

from tsdb.config import ModelConfig


def model_horizon(model: ModelConfig, steps: int) -> int:
    """The smallest horizon of ``model``'s shape that covers ``steps``: whole patches, and
    for the ``horizon`` strategy whole chunks of ``n_blocks`` patches."""
    unit = model.patch_length * (model.n_blocks if model.strategy == "horizon" else 1)
    return -(-steps // unit) * unit
