"""One DiffusionBlocks block: its own stem, a stack of transformer layers, its own head.

A ``BlockDenoiser`` is the raw network ``F(x, c_in z, c_noise)`` of the EDM
preconditioner for the band of noise levels its block owns. Blocks share nothing
trainable, so each can be trained with the others absent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tsdb.errors import TsdbError
from tsdb.nn.layers import KV, SigmaEmbedding, TransformerLayer, modulate, rope_angles, sliding_causal_mask

CONTEXT_CHANNELS = 2  # normalized value, observed mask (then one channel per covariate)


@dataclass(frozen=True)
class DenoiserShape:
    context_length: int
    horizon: int
    patch_length: int
    d_model: int
    n_heads: int
    n_layers: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    covariates: int = 0  # known-future dynamic real covariates

    @property
    def context_channels(self) -> int:
        """Per-step context inputs: normalized value, observed mask, then each covariate."""
        return CONTEXT_CHANNELS + self.covariates

    @property
    def context_tokens(self) -> int:
        return self.context_length // self.patch_length

    @property
    def future_tokens(self) -> int:
        return self.horizon // self.patch_length


@dataclass(frozen=True)
class CovariateFeatures:
    """The noise-free inputs of a model with covariates.

    context: ``[batch, T, 2 + n_cov]`` context features (value, observed, covariates);
    future: ``[batch, H, n_cov]`` the normalized known-future covariates of the horizon.
    A model without covariates takes the context features alone, as a plain tensor.
    """

    context: Tensor
    future: Tensor

    def __getitem__(self, idx) -> "CovariateFeatures":
        return CovariateFeatures(self.context[idx], self.future[idx])

    @property
    def shape(self) -> torch.Size:
        return self.context.shape


class ContextEncoding:
    """Per-layer context keys/values plus the token offset where future tokens start, and
    (with covariates) the embedding ``[batch, H/P, d]`` added to the future tokens."""

    def __init__(self, kv: list[KV], num_tokens: int, future: Tensor | None = None):
        self.kv = kv
        self.num_tokens = num_tokens
        self.future = future

    def repeat(self, n: int) -> "ContextEncoding":
        """Repeat each series' cache n times (one per sample), series-major."""
        return ContextEncoding([KV(k.repeat_interleave(n, 0), v.repeat_interleave(n, 0)) for k, v in self.kv],
                               self.num_tokens, None if self.future is None else self.future.repeat_interleave(n, 0))

    def select(self, idx: slice) -> "ContextEncoding":
        return ContextEncoding([KV(k[idx], v[idx]) for k, v in self.kv], self.num_tokens,
                               None if self.future is None else self.future[idx])


class BlockDenoiser(nn.Module):
    """Stem -> n_layers transformer layers -> head, for one noise band."""

    def __init__(self, shape: DenoiserShape):
        super().__init__()
        self.shape = shape
        d, p = shape.d_model, shape.patch_length
        self.context_embed = nn.Linear(p * shape.context_channels, d)
        self.future_embed = nn.Linear(p, d)
        self.lead_time = nn.Parameter(torch.zeros(shape.future_tokens, d))
        nn.init.normal_(self.lead_time, std=0.02)
        self.sigma_embed = SigmaEmbedding(d)
        self.layers = nn.ModuleList(
            TransformerLayer(d, shape.n_heads, shape.mlp_ratio, shape.dropout) for _ in range(shape.n_layers))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.out = nn.Linear(d, p)
        for m in (self.final_ada[1], self.out):  # adaLN-Zero: the block starts as F = 0
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        if shape.covariates:  # patches of known-future covariates, added to the future tokens
            self.covariate_embed = nn.Linear(p * shape.covariates, d)

    # -- context path (independent of sigma) -------------------------------------------
    def embed_context(self, context: Tensor) -> Tensor:
        """``context [batch, C, channels]`` -> tokens ``[batch, C/P, d]``."""
        b, c, ch = context.shape
        p = self.shape.patch_length
        return self.context_embed(context.reshape(b, c // p, p * ch))

    def embed_future_covariates(self, future: Tensor) -> Tensor:
        """Normalized future covariates ``[batch, H, n_cov]`` -> ``[batch, H/P, d]``."""
        b, hz, n = future.shape
        p = self.shape.patch_length
        return self.covariate_embed(future.reshape(b, hz // p, p * n))

    def split_features(self, features: Tensor | CovariateFeatures) -> tuple[Tensor, Tensor | None]:
        """``(context features, future covariate embedding or None)``; checks that the
        inputs match the block's covariate count."""
        if isinstance(features, CovariateFeatures):
            if not self.shape.covariates:
                raise TsdbError("covariates given to a model built without them (model.num_covariates = 0)")
            return features.context, self.embed_future_covariates(features.future)
        if self.shape.covariates:
            raise TsdbError(f"this model takes {self.shape.covariates} covariate(s); pass covariates "
                            f"[batch, {self.shape.covariates}, context + horizon]")
        return features, None

    def encode_context(self, context: Tensor | CovariateFeatures, window: int | None = None,
                       position_offset: int = 0) -> ContextEncoding:
        """Run the context tokens through every layer, keeping each layer's keys/values.

        ``window`` (tokens) limits causal attention to a sliding window, so a context
        longer than the training one is handled exactly as the streaming cache does.
        With covariates, ``context`` is a :class:`CovariateFeatures` and the encoding also
        holds the embedding of the future covariates.
        """
        context, future = self.split_features(context)
        h = self.embed_context(context)
        n = h.shape[1]
        head_dim = self.shape.d_model // self.shape.n_heads
        rope = rope_angles(torch.arange(position_offset, position_offset + n, device=h.device), head_dim)
        mask = None if window is None or window >= n else sliding_causal_mask(n, window, h.device)
        h = self.encode_prelude(h, rope, mask)
        kv = []
        for layer in self.layers[:-1]:
            h, layer_kv = layer.context(h, rope, mask)
            kv.append(layer_kv)
        # the last layer's context outputs feed nothing: only its keys/values are needed
        kv.append(self.layers[-1].context_kv(h, rope)[1])
        return ContextEncoding(kv, position_offset + n, future)

    def encode_prelude(self, h: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
        """Context-only layers run before the stack: none in a plain block (``LoopedDenoiser`` adds some)."""
        return h

    # -- future path (depends on sigma) ---------------------------------------------------
    def cond(self, c_noise: Tensor) -> Tensor:
        """sigma conditioning, ``[batch, 1, d]`` for per-sample or ``[batch, tokens, d]`` per position."""
        if c_noise.dim() == 1:
            return self.sigma_embed(c_noise)[:, None, :]
        # per-position sigma [batch, H]: one value per future patch
        return self.sigma_embed(c_noise[:, :: self.shape.patch_length])

    def denoise_future(self, ctx: ContextEncoding, scaled_noisy: Tensor, c_noise: Tensor) -> Tensor:
        """F for the future given a context encoding: ``[batch, H]``."""
        b, hz = scaled_noisy.shape
        p = self.shape.patch_length
        h = self.future_embed(scaled_noisy.view(b, hz // p, p)) + self.lead_time
        if ctx.future is not None:
            h = h + ctx.future
        cond = self.cond(c_noise)
        head_dim = self.shape.d_model // self.shape.n_heads
        n_fut = h.shape[1]
        rope = rope_angles(torch.arange(ctx.num_tokens, ctx.num_tokens + n_fut, device=h.device), head_dim)
        for layer, kv in zip(self.layers, ctx.kv):
            h = layer.future(h, kv, cond, rope)
        shift, scale = self.final_ada(cond).chunk(2, dim=-1)
        return self.out(modulate(self.final_norm(h), shift, scale)).reshape(b, hz)

    def forward(self, context: Tensor | CovariateFeatures, scaled_noisy: Tensor, c_noise: Tensor) -> Tensor:
        return self.denoise_future(self.encode_context(context), scaled_noisy, c_noise)
