"""Torch-free streaming runtime for tsdb models exported to ONNX (onnxruntime + numpy only)."""

from .runtime import (DEFAULT_QUANTILES, Forecast, StreamingError, StreamingForecaster, load_metadata,
                      series_seed)

__version__ = "0.1.0"

__all__ = ["DEFAULT_QUANTILES", "Forecast", "StreamingError", "StreamingForecaster", "load_metadata",
           "series_seed", "__version__"]
