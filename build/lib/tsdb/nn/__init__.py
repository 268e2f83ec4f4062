from tsdb.nn.denoiser import BlockDenoiser, ContextEncoding, DenoiserShape
from tsdb.nn.forecaster import DiffusionForecaster, context_features, instance_stats
from tsdb.nn.layers import KV, TransformerLayer

__all__ = ["BlockDenoiser", "ContextEncoding", "DenoiserShape", "DiffusionForecaster", "KV",
           "TransformerLayer", "context_features", "instance_stats"]
