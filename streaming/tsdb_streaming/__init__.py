"""Torch-free streaming runtime for tsdb models exported to ONNX (onnxruntime + numpy only).

``StreamingForecaster(model_dir)`` (or ``load(model_dir)``) opens any export: the metadata's
``"format"`` picks the class registered for it (``formats/``). Module map: ``core`` (slots,
update transaction, state files, ``Forecast``), ``metadata`` (reading and shared checks),
``registry`` (formats by name), ``sampler`` (Euler/Heun), ``numerics`` (normalization,
features, noise), ``graphs`` (onnxruntime sessions), ``errors``.
"""

from .core import DEFAULT_QUANTILES, Forecast, StreamingForecaster
from .errors import SeriesRefused, StreamingError
from .formats.depth import FORMAT, DepthStreamingForecaster
from .formats.horizon import FORMAT as HORIZON_FORMAT
from .formats.horizon import HorizonStreamingForecaster
from .metadata import load_metadata, model_format
from .numerics import MAX_NORMALIZED, forecast_noise, series_seed
from .registry import register_format, registered_formats


def load(model_dir, **options) -> StreamingForecaster:
    """Open an exported model directory with the forecaster its format is served by
    (the same as ``StreamingForecaster(model_dir, **options)``)."""
    return StreamingForecaster(model_dir, **options)


__version__ = "0.3.0"

__all__ = ["DEFAULT_QUANTILES", "DepthStreamingForecaster", "FORMAT", "Forecast", "HORIZON_FORMAT",
           "HorizonStreamingForecaster", "MAX_NORMALIZED", "SeriesRefused", "StreamingError", "StreamingForecaster",
           "forecast_noise", "load", "load_metadata", "model_format", "register_format", "registered_formats",
           "series_seed", "__version__"]
