"""Transformer layers for the forecaster: the one attention of the project.

The token sequence is ``[context ; future]``. Context tokens attend causally (within a
sliding window of ``W`` tokens when asked) to context only and carry no sigma
modulation, so their keys/values do not depend on the noise: they are computed once per
forecast, shared by every sample and sampler step, and cached for streaming. Future
tokens attend to the context keys/values and to the future tokens of their own sample,
and are modulated by sigma via adaLN-Zero.

Three paths through the same weights and the same attention:

- context, full or incremental (:meth:`TransformerLayer.context`): new context tokens
  attend to an optional cache of earlier keys/values and to themselves;
- future (:meth:`TransformerLayer.future`): one sample per series (training), or ``S``
  samples of a series, ``[batch, S, n, d]``, attending to the series' context keys/values,
  which are never copied per sample (one matrix product over all samples' queries).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KV(NamedTuple):
    """Keys and values of one layer, ``[batch, heads, tokens, head_dim]``, RoPE applied."""

    k: Tensor
    v: Tensor


def rope_angles(positions: Tensor, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos/sin tables ``[..., head_dim/2]`` for rotary embeddings at integer ``positions [...]``."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs ``(2i, 2i + 1)`` of ``x [..., tokens, head_dim]`` by the angles whose
    cos/sin are given; relative positions survive a shift.

    As one complex multiplication (4x faster on CPU than the strided real form, and equal to
    it bit for bit), except where complex numbers are unavailable: in exported graphs (ONNX
    has no complex type) and in half precision.
    """
    if torch.compiler.is_exporting() or x.dtype not in (torch.float32, torch.float64):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).to(x.dtype)
    rotation = torch.complex(cos.to(x.dtype), sin.to(x.dtype))
    return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rotation).flatten(-2)


def window_mask(cached: int, new: int, window: int | None, device=None) -> Tensor:
    """Boolean mask ``[new, cached + new]`` (True = attend) for new tokens after ``cached`` ones:
    query j sees key t iff t is not after it and at most ``window - 1`` tokens back."""
    rel = torch.arange(cached + new, device=device)[None, :] - cached - torch.arange(new, device=device)[:, None]
    mask = rel <= 0
    return mask if window is None else mask & (rel > -window)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x * (1 + scale) + shift`` (one fused pass over x)."""
    return torch.addcmul(shift, x, 1 + scale)


def future_attention(q: Tensor, ctx: KV, k: Tensor, v: Tensor, ctx_mask: Tensor | None,
                     dropout: float = 0.0) -> Tensor:
    """Softmax attention of future queries over ``[context ; own future]`` keys.

    ``ctx``: context keys/values ``[batch, heads, c, head_dim]``, visible where ``ctx_mask``
    (``[batch, c]`` bool, or None = all). Either one sample per series, q/k/v
    ``[batch, heads, n, head_dim]`` (training: the fused kernel over the concatenated keys),
    or S samples per series sharing the context, q/k/v ``[batch, heads, S, n, head_dim]``:
    every sample's queries meet the shared context keys in one matrix product, so the
    context is never copied per sample. The rank decides (a static property, so exported
    graphs keep a dynamic sample axis).
    """
    if q.dim() == 4:
        n = q.shape[2]
        mask = None if ctx_mask is None else torch.cat(
            [ctx_mask, ctx_mask.new_ones(ctx_mask.shape[0], n)], dim=1)[:, None, None, :]
        return F.scaled_dot_product_attention(q, torch.cat([ctx.k, k], dim=2), torch.cat([ctx.v, v], dim=2),
                                              attn_mask=mask, dropout_p=dropout)
    b, heads, s, n, hd = q.shape
    c = ctx.k.shape[2]
    q = q * (1.0 / math.sqrt(hd))  # scaling the queries costs less than scaling the scores
    s_ctx = torch.matmul(q.reshape(b, heads, s * n, hd), ctx.k.transpose(-1, -2)).reshape(b, heads, s, n, c)
    if ctx_mask is not None:
        s_ctx = s_ctx.masked_fill(~ctx_mask[:, None, None, None, :], float("-inf"))
    s_fut = torch.matmul(q, k.transpose(-1, -2))
    att = torch.softmax(torch.cat([s_ctx, s_fut], dim=-1), dim=-1)
    if dropout:
        att = F.dropout(att, dropout)
    out = torch.matmul(att[..., :c].reshape(b, heads, s * n, c), ctx.v).reshape(b, heads, s, n, hd)
    return out + torch.matmul(att[..., c:], v)


class SigmaEmbedding(nn.Module):
    """Sinusoidal features of c_noise followed by an MLP (as in DiT's timestep embedder)."""

    def __init__(self, dim: int, freq_dim: int = 64):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: Tensor) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=c_noise.device) / half)
        # c_noise = ln(sigma)/4 lies in about [-1.6, 1.1]; scale up so the frequencies resolve it
        args = (c_noise.float() * 250.0)[..., None] * freqs
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1))


class TransformerLayer(nn.Module):
    """Pre-norm attention + MLP layer with separate context and future paths.

    Both paths share the attention and MLP weights; context tokens use plain LayerNorm,
    future tokens use adaLN-Zero conditioned on sigma.
    """

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        hidden = int(d_model * mlp_ratio)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, d_model))
        self.ctx_norm1 = nn.LayerNorm(d_model)
        self.ctx_norm2 = nn.LayerNorm(d_model)
        self.fut_norm1 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.fut_norm2 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d_model, 6 * d_model))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[..., n, d]`` -> q, k, v ``[batch, heads, ..., n, head_dim]``."""
        lead = x.shape[:-1]
        qkv = self.qkv(x).view(*lead, 3, self.n_heads, self.head_dim)
        qkv = qkv.movedim(-3, 0).movedim(-2, 2)      # [3, batch, heads, ..., n, head_dim]
        return qkv[0], qkv[1], qkv[2]

    @staticmethod
    def _merge(a: Tensor) -> Tensor:
        """``[batch, heads, ..., n, head_dim]`` -> ``[batch, ..., n, heads * head_dim]``."""
        return a.movedim(1, -2).flatten(-2)

    def context(self, h: Tensor, rope: tuple[Tensor, Tensor], cache: KV | None = None, mask: Tensor | None = None,
                need_output: bool = True) -> tuple[Tensor | None, KV]:
        """Context path: new tokens ``h [batch, m, d]`` attend to ``cache`` (keys/values of
        earlier tokens) and to themselves under ``mask`` (bool ``[m, cache + m]``, True =
        attend; None = plain causal). ``rope``: tables ``[batch, 1, m, head_dim/2]``.

        Returns the new hidden states (None when ``need_output`` is False: the last layer's
        context outputs feed nothing) and the keys/values of cache + new tokens.
        """
        q, k, v = self._heads(self.ctx_norm1(h))
        k = apply_rope(k, *rope)
        if cache is not None:
            k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
        if not need_output:
            return None, KV(k, v)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(apply_rope(q, *rope), k, v, attn_mask=mask, dropout_p=p,
                                           is_causal=mask is None)
        h = h + self.proj(self._merge(a))
        return h + self.mlp(self.ctx_norm2(h)), KV(k, v)

    def future(self, h: Tensor, ctx: KV, ctx_mask: Tensor | None, cond: Tensor,
               rope: tuple[Tensor, Tensor]) -> Tensor:
        """Future path: ``h`` ``[batch, n, d]`` (one sample per series) or ``[batch, S, n, d]``
        (S samples sharing their series' context) attends to the context ``ctx``
        (``[batch, heads, c, head_dim]``, visible where ``ctx_mask [batch, c]``) and to its own
        sample's future tokens.

        ``cond`` broadcasts against ``h`` (``[batch, (1,) 1 or n, d]``: per-series or per-token
        sigma); ``rope`` tables against ``[batch, heads, (S,) n, head_dim/2]``.
        """
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(cond).chunk(6, dim=-1)
        q, k, v = self._heads(modulate(self.fut_norm1(h), shift1, scale1))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        a = future_attention(q, ctx, k, v, ctx_mask, self.dropout if self.training else 0.0)
        h = torch.addcmul(h, gate1, self.proj(self._merge(a)))
        return torch.addcmul(h, gate2, self.mlp(modulate(self.fut_norm2(h), shift2, scale2)))
