"""Recurrent-depth (Huginn-style) denoiser for the ``looped`` strategies.

- prelude: causal, sigma-free layers over the context tokens, run once per forecast
  (their output feeds the core's context keys/values, so it is cacheable);
- core: the ``L_c`` layers of a ``BlockDenoiser`` with sigma-adaLN, weight-tied across
  iterations: the sampler applies the same core once per probability-flow ODE step, so K
  steps give a depth of ``K * L_c`` layers with the parameters of ``L_c``;
- coda: the block's head.

The recurrent state between two applications of the core is the noisy target ``z`` at
the step's sigma (not a latent), which is what lets the core be trained one application
at a time, without backpropagation through time.
"""

from __future__ import annotations

from torch import nn

from tsdb.nn.denoiser import BlockDenoiser, DenoiserShape
from tsdb.nn.layers import TransformerLayer


def context_layer(shape: DenoiserShape) -> TransformerLayer:
    """A ``TransformerLayer`` for the context path only: its sigma-adaLN would be dead weight."""
    layer = TransformerLayer(shape.d_model, shape.n_heads, shape.mlp_ratio, shape.dropout)
    del layer.ada
    return layer


class LoopedDenoiser(BlockDenoiser):
    """A ``BlockDenoiser`` (core of ``shape.n_layers`` layers + head) behind a context prelude."""

    def __init__(self, shape: DenoiserShape, prelude_layers: int):
        super().__init__(shape)
        self.prelude = nn.ModuleList(context_layer(shape) for _ in range(prelude_layers))

    @property
    def context_layers(self) -> list[TransformerLayer]:
        """The tap (with a linear head), the prelude's layers, then the core's: the core's
        context path reads the prelude's output."""
        return [*self.taps, *self.prelude, *self.layers]
