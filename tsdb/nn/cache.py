"""The streaming cache: per context layer the keys/values of a block's last ``W`` context
tokens, ``[layers, batch, heads, W, head_dim]``. Every strategy's streaming state keeps one
per block, and the exported ``update`` graph maintains it."""

from __future__ import annotations

from dataclasses import fields
from typing import Callable, Sequence, TypeVar

import torch
from torch import Tensor

from tsdb.nn.denoiser import BlockDenoiser
from tsdb.nn.layers import KV

T = TypeVar("T")


def window_tokens(model) -> int:
    """W: context tokens the cache keeps (the training context)."""
    return model.blocks[0].shape.context_tokens


def init_tokens(model) -> int:
    """R: tokens whose receptive field covers the cache exactly (``context layers * W``)."""
    return max(len(b.context_layers) for b in model.blocks) * window_tokens(model)


def encode_tokens(block: BlockDenoiser, features: Tensor, start: Tensor,
                  k_cache: Tensor | None = None, v_cache: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Run ``m`` new context patches through the block's context layers, attending to the cache.

    features: ``[batch, m, P, channels]`` normalized context features of complete (or, for
        the partial token, NaN-padded) patches.
    start: ``[batch]`` int64 absolute position of the first new token.
    k_cache, v_cache: ``[layers, batch, heads, c, head_dim]`` keys/values of the ``c``
        tokens just before (``None``: no cache, as at initialisation).
    Returns the keys/values of the last ``min(W, c + m)`` tokens, same layout: the block's
    own ``encode_context`` with a sliding window of ``W`` tokens.
    """
    b, m, p, ch = features.shape
    cache = None if k_cache is None else [KV(k, v) for k, v in zip(k_cache, v_cache)]
    w = block.shape.context_tokens
    enc = block.encode_context(features.reshape(b, m * p, ch), start, cache, window=w).last(w)
    return torch.stack([kv.k for kv in enc.kv]), torch.stack([kv.v for kv in enc.kv])


def align_history(history: Tensor, p: int, min_tokens: int, max_tokens: int) -> Tensor:
    """Left-pad with NaN to whole patches and at least ``min_tokens``; keep the last ``max_tokens``."""
    b, t = history.shape
    n = max(min_tokens, -(-t // p))
    n = min(n, max_tokens)
    keep = min(t, n * p)
    out = history.new_full((b, n * p), float("nan"))
    if keep:
        out[:, n * p - keep:] = history[:, t - keep:]
    return out


def pick(x: Tensor | None, idx) -> Tensor | None:
    return None if x is None else x[idx]


class BatchedState:
    """Batch-axis operations shared by the streaming states: the first two fields are the
    per-block key/value tuples (batch on axis 1), every other field has batch on axis 0
    (or is None)."""

    def select(self, idx):
        """The state of a subset of series (index tensor, list or slice)."""
        return type(self)(tuple(k[:, idx] for k in self.k), tuple(v[:, idx] for v in self.v),
                          *(pick(getattr(self, f.name), idx) for f in fields(self)[2:]))

    @classmethod
    def cat(cls, states: list):
        """Concatenate states of different series along the batch axis."""
        nb = len(states[0].k)
        return cls(
            tuple(torch.cat([s.k[i] for s in states], 1) for i in range(nb)),
            tuple(torch.cat([s.v[i] for s in states], 1) for i in range(nb)),
            *(None if getattr(states[0], f.name) is None else torch.cat([getattr(s, f.name) for s in states], 0)
              for f in fields(cls)[2:]))


def by_group(keys: Sequence, run: Callable[[list[int]], T], cat: Callable[[list[T]], T] | None = None) -> T:
    """``run(indices)`` once per group of rows with equal ``keys`` (rows that move together,
    e.g. at the same patch phase), reassembled in the original row order. Results are
    states (``cat``/``select`` of :class:`BatchedState`) or tensors (batch on axis 0)."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    if len(groups) == 1:
        return run(list(range(len(keys))))
    parts = [run(idx) for idx in groups.values()]
    inverse = torch.argsort(torch.tensor([i for idx in groups.values() for i in idx]))
    if isinstance(parts[0], Tensor):
        return torch.cat(parts)[inverse]
    return (cat or type(parts[0]).cat)(parts).select(inverse)
