from .denoiser import BlockDenoiser, ContextEncoding, DenoiserShape
from .forecaster import DiffusionForecaster, context_features, instance_stats
from .layers import KV, TransformerLayer

__all__ = ["BlockDenoiser", "ContextEncoding", "DenoiserShape", "DiffusionForecaster", "KV",
           "TransformerLayer", "context_features", "instance_stats"]
