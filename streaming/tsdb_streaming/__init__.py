"""Torch-free streaming runtime for tsdb models exported to ONNX (onnxruntime + numpy only)."""

from .runtime import (DEFAULT_QUANTILES, FORMAT, HORIZON_FORMAT, Forecast, StreamingError, StreamingForecaster,
                      load_metadata, model_format, series_seed)
from .horizon import HorizonStreamingForecaster  # noqa: E402  (imports .runtime)

__version__ = "0.2.0"

__all__ = ["DEFAULT_QUANTILES", "FORMAT", "HORIZON_FORMAT", "Forecast", "HorizonStreamingForecaster",
           "StreamingError", "StreamingForecaster", "load_metadata", "model_format", "series_seed", "__version__"]
