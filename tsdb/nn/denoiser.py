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
from tsdb.nn.layers import KV, SigmaEmbedding, TransformerLayer, modulate, rope_angles, window_mask

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
    linear_head: bool = False  # a linear map of the normalized context added to F (LinearHead)

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
    """What the future path needs from a context, for a batch of series.

    kv: per context layer (a looped block's prelude, then its own layers) the keys/values
        ``[batch, heads, tokens, head_dim]``;
    next_position: ``[batch]`` int64, the position of the first future token;
    mask: ``[batch, tokens]`` bool, the keys the future sees (None: all), e.g. a
        streaming cache plus an optional partial token;
    future: with covariates, the embedding ``[batch, H/P, d]`` added to the future tokens.
    """

    def __init__(self, kv: list[KV], next_position: Tensor, mask: Tensor | None = None,
                 future: Tensor | None = None):
        self.kv, self.next_position, self.mask, self.future = kv, next_position, mask, future

    def repeat(self, n: int) -> "ContextEncoding":
        """Repeat each series n times, series-major (for trajectories whose contexts diverge)."""
        rep = lambda t: None if t is None else t.repeat_interleave(n, 0)  # noqa: E731
        return ContextEncoding([KV(rep(k), rep(v)) for k, v in self.kv], rep(self.next_position), rep(self.mask),
                               rep(self.future))

    def last(self, tokens: int) -> "ContextEncoding":
        """Keep the last ``tokens`` keys/values of every layer (a sliding window)."""
        return ContextEncoding([KV(k[:, :, -tokens:], v[:, :, -tokens:]) for k, v in self.kv], self.next_position,
                               None if self.mask is None else self.mask[:, -tokens:], self.future)


class EmbeddingTap(nn.Module):
    """A context "layer" that attends to nothing: its keys and values are its input tokens,
    the block's context embeddings (a linear function of the normalized context patches).

    Placed first in a block's context layers, it makes the embeddings part of every context
    encoding, the streaming cache included (the cache holds per context layer the keys and
    values of the last W tokens), so the :class:`LinearHead` reads them wherever the future
    path runs: training, sampling, streaming and the exported denoise graphs.
    """

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def context(self, h: Tensor, rope=None, cache: KV | None = None, mask: Tensor | None = None,
                need_output: bool = True) -> tuple[Tensor, KV]:
        b, m, d = h.shape
        tokens = h.reshape(b, m, self.n_heads, d // self.n_heads).transpose(1, 2)
        if cache is not None:
            tokens = torch.cat([cache.k, tokens], dim=2)
        return h, KV(tokens, tokens)


class LinearHead(nn.Module):
    """NLinear inside a block: a linear map from the block's W context embeddings (so from the
    normalized context, by way of the linear patch embedding) to the H future values, added
    to the block's raw output F.

    At the top of the noise range ``c_skip ~ 0`` and the block is a pure point predictor
    (``D ~ sigma_data F``); this gives it the inductive bias of the linear forecasters
    (instance normalization + a linear map of the context), with the transformer modelling
    what is left. Each token is reduced to ``patch_length`` features first (so the head has
    about ``C * H`` weights, as NLinear); the output layer starts at zero, keeping the
    block's start at F = 0.
    """

    def __init__(self, shape: "DenoiserShape"):
        super().__init__()
        self.tokens = shape.context_tokens
        self.reduce = nn.Linear(shape.d_model, shape.patch_length)
        self.proj = nn.Linear(shape.context_tokens * shape.patch_length, shape.horizon)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def visible(self, tap: KV, mask: Tensor | None) -> Tensor:
        """The W context embeddings the future sees, oldest first, ``[batch, W, d]``.

        ``tap``: the tap's keys ``[batch, heads, T, head_dim]``. Without a mask they are the
        last W tokens; a streaming encoding (cache + one partial token, ``mask [batch, T]``)
        sees the last W when its partial token is visible, else the W before it.
        """
        k, w = tap.k, self.tokens
        if mask is None:
            if not torch.compiler.is_exporting() and k.shape[2] < w:
                raise TsdbError(f"the linear head needs {w} context tokens, the encoding has {k.shape[2]}")
            return k[:, :, -w:].transpose(1, 2).flatten(2)
        # one zero token in front keeps both slices W long for any cache length (a streaming
        # cache always holds W tokens; the exporter traces with fewer)
        k = torch.cat([torch.zeros_like(k[:, :, :1]), k], dim=2)
        last = torch.where(mask[:, -1][:, None, None, None], k[:, :, -w:], k[:, :, -w - 1:-1])
        return last.transpose(1, 2).flatten(2)

    def forward(self, tap: KV, mask: Tensor | None) -> Tensor:
        """The head's forecast ``[batch, H]`` (normalized scale)."""
        return self.proj(self.reduce(self.visible(tap, mask)).flatten(1))


class BlockDenoiser(nn.Module):
    """Stem -> n_layers transformer layers -> head, for one noise band (plus, optionally, a
    :class:`LinearHead` reading the context embeddings through an :class:`EmbeddingTap`)."""

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
        # the tap caches the embeddings the linear head reads (no parameters: an empty list
        # keeps the weights of a model without the head unchanged)
        self.taps = nn.ModuleList([EmbeddingTap(shape.n_heads)] if shape.linear_head else [])
        self.linear_head = LinearHead(shape) if shape.linear_head else None

    # -- context path (independent of sigma) -------------------------------------------
    @property
    def context_layers(self) -> list[nn.Module]:
        """Layers whose context keys/values an encoding holds: the tap (with a linear head),
        then the block's layers (a looped block puts its prelude before them)."""
        return [*self.taps, *self.layers]

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
        inputs match the block's covariate count. (Streaming passes context features with
        covariate channels alone: their future part comes with each forecast.)"""
        future = None
        if isinstance(features, CovariateFeatures):
            if not self.shape.covariates:
                raise TsdbError("covariates given to a model built without them (model.num_covariates = 0)")
            features, future = features.context, self.embed_future_covariates(features.future)
        if features.shape[-1] != self.shape.context_channels:
            raise TsdbError(f"this model takes {self.shape.covariates} covariate(s); pass covariates "
                            f"[batch, {self.shape.covariates}, context + horizon]")
        return features, future

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE tables ``[batch, 1, n, head_dim/2]`` for per-series positions ``[batch, n]``."""
        cos, sin = rope_angles(positions, self.shape.d_model // self.shape.n_heads)
        return cos[:, None], sin[:, None]

    def encode_context(self, context: Tensor | CovariateFeatures, start: Tensor | int = 0,
                       cache: list[KV] | None = None, window: int | None = None) -> ContextEncoding:
        """Run context tokens through every context layer, keeping each layer's keys/values.

        ``context``: features ``[batch, m * P, channels]`` of ``m`` new patches (with
        covariates a :class:`CovariateFeatures`, whose future part is embedded for the
        future tokens); ``start``: position of the first new token (int or ``[batch]``);
        ``cache``: per context layer the keys/values of the tokens right before (streaming);
        ``window``: causal attention limited to the last ``window`` tokens (a sliding window,
        so a context longer than the training one is handled as the streaming cache does).
        The encoding holds the keys/values of cache + new tokens.
        """
        context, future = self.split_features(context)
        h = self.embed_context(context)
        b, m = h.shape[:2]
        start = torch.as_tensor(start, device=h.device).expand(b)
        rope = self.rope(start[:, None] + torch.arange(m, device=h.device))
        cached = 0 if cache is None else cache[0].k.shape[2]
        mask = None if cache is None and (window is None or window >= m) else window_mask(cached, m, window, h.device)
        layers = self.context_layers
        kv = []
        for i, layer in enumerate(layers):
            h, layer_kv = layer.context(h, rope, None if cache is None else cache[i], mask,
                                        need_output=i < len(layers) - 1)
            kv.append(layer_kv)
        return ContextEncoding(kv, start + m, future=future)

    # -- future path (depends on sigma) ---------------------------------------------------
    def cond(self, c_noise: Tensor) -> Tensor:
        """sigma conditioning ``[batch, 1 or H/P, d]`` from per-series ``c_noise [batch]`` or
        per-position ``[batch, H]`` (one value per future patch)."""
        if c_noise.dim() == 1:
            return self.sigma_embed(c_noise)[:, None, :]
        return self.sigma_embed(c_noise[:, :: self.shape.patch_length])

    def denoise_future(self, ctx: ContextEncoding, scaled_noisy: Tensor, c_noise: Tensor) -> Tensor:
        """F for the future given a context encoding.

        ``scaled_noisy`` is ``[batch, H]`` (one sample per series) or ``[batch, S, H]`` (S
        samples sharing their series' context, which is never copied per sample);
        ``c_noise`` is per series ``[batch]`` or per position ``[batch, H]``. Returns F of the
        same shape as ``scaled_noisy``.
        """
        p = self.shape.patch_length
        samples = scaled_noisy.dim() == 3
        x = scaled_noisy if samples else scaled_noisy[:, None]
        b, s, hz = x.shape
        h = self.future_embed(x.reshape(b, s, hz // p, p)) + self.lead_time
        if ctx.future is not None:
            h = h + ctx.future[:, None]
        cond = self.cond(c_noise)[:, None]                                    # [b, 1, 1 or n, d]
        rope = self.rope(ctx.next_position[:, None] + torch.arange(hz // p, device=h.device))
        if samples:
            rope = tuple(t[:, :, None] for t in rope)                         # [b, 1, 1, n, hd/2]
        else:
            h, cond = h[:, 0], cond[:, 0]
        own = ctx.kv[len(ctx.kv) - len(self.layers):]                         # skip a looped prelude's
        for layer, kv in zip(self.layers, own):
            h = layer.future(h, kv, ctx.mask, cond, rope)
        shift, scale = self.final_ada(cond).chunk(2, dim=-1)
        out = self.out(modulate(self.final_norm(h), shift, scale)).reshape(scaled_noisy.shape)
        if self.linear_head is not None:  # the tap is the first context layer
            prior = self.linear_head(ctx.kv[0], ctx.mask)
            out = out + (prior[:, None] if samples else prior)
        return out

    def forward(self, context: Tensor | CovariateFeatures, scaled_noisy: Tensor, c_noise: Tensor) -> Tensor:
        return self.denoise_future(self.encode_context(context), scaled_noisy, c_noise)
