"""Transformer layers for the forecaster.

The token sequence is ``[context ; future]``. Context tokens attend causally to context
only and carry no sigma modulation, so their keys/values do not depend on the noise and
can be computed once per forecast (and cached for streaming). Future tokens attend to all
context and to each other and are modulated by sigma via adaLN-Zero.
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
    """cos/sin tables ``[tokens, head_dim/2]`` for rotary embeddings at integer positions."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs of ``x [..., tokens, head_dim]``; relative positions survive a shift."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)


def sliding_causal_mask(num_tokens: int, window: int, device=None) -> Tensor:
    """Boolean mask (True = attend): token i sees tokens j with i - window < j <= i."""
    i = torch.arange(num_tokens, device=device)[:, None]
    j = torch.arange(num_tokens, device=device)[None, :]
    return (j <= i) & (j > i - window)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


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
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def _merge(self, a: Tensor) -> Tensor:
        b, h, n, d = a.shape
        return a.transpose(1, 2).reshape(b, n, h * d)

    def _attend(self, q, k, v, mask=None, is_causal=False) -> Tensor:
        p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal)

    def context_kv(self, h: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, KV]:
        """Queries and the (cacheable) keys/values of context tokens, RoPE applied."""
        q, k, v = self._heads(self.ctx_norm1(h))
        return apply_rope(q, *rope), KV(apply_rope(k, *rope), v)

    def context(self, h: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None = None) -> tuple[Tensor, KV]:
        """Context path: causal self-attention among context tokens. Returns new h and its KV.

        ``mask`` (bool, True = attend) replaces plain causality, e.g. a sliding window.
        """
        q, kv = self.context_kv(h, rope)
        a = self._attend(q, kv.k, kv.v, mask=mask, is_causal=mask is None)
        h = h + self.proj(self._merge(a))
        h = h + self.mlp(self.ctx_norm2(h))
        return h, kv

    def future(self, h: Tensor, ctx: KV, cond: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """Future path: attend to all (cached) context keys/values and to every future token.

        ``cond`` is ``[batch, 1 or tokens, d_model]`` (per-sample or per-token sigma).
        """
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(cond).chunk(6, dim=-1)
        q, k, v = self._heads(modulate(self.fut_norm1(h), shift1, scale1))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k = torch.cat([ctx.k.expand(q.shape[0], -1, -1, -1), k], dim=2)
        v = torch.cat([ctx.v.expand(q.shape[0], -1, -1, -1), v], dim=2)
        a = self._attend(q, k, v)
        h = h + gate1 * self.proj(self._merge(a))
        h = h + gate2 * self.mlp(modulate(self.fut_norm2(h), shift2, scale2))
        return h
