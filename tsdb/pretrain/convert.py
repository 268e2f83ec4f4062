"""Conversion of a pretrained end-to-end model into DiffusionBlocks blocks.

An end-to-end model is one block of L layers (``blocks.0.layers.0 .. L-1``) with one stem
(embeddings, sigma embedding) and one head. A depth model of B blocks has L/B layers per block,
each block with its own stem and head. Conversion gives block i the e2e layers
``[i L/B, (i+1) L/B)`` (renumbered from 0) and a copy of the e2e stem and head; everything else
(the band edges) stays the depth model's. The mapping is by parameter names, so it holds for
any block whose transformer layers sit in a ``layers`` list and whose other parameters are
the stem and head.
"""

from __future__ import annotations

import re

from torch import Tensor

from tsdb.errors import TsdbError

_LAYER = re.compile(r"^blocks\.0\.layers\.(\d+)\.(.+)$")
_BLOCK = re.compile(r"^blocks\.0\.(.+)$")


def convert_e2e_to_blocks(e2e_state: dict[str, Tensor], depth_state: dict[str, Tensor],
                          num_blocks: int) -> dict[str, Tensor]:
    """A state dict for the depth model whose ``state_dict()`` is ``depth_state`` (used for its
    keys and the entries conversion does not touch), initialised from ``e2e_state``."""
    layers = sorted({int(m.group(1)) for k in e2e_state if (m := _LAYER.match(k))})
    if not layers or layers != list(range(len(layers))) or len(layers) % num_blocks:
        raise TsdbError(f"cannot cut an end-to-end model with {len(layers)} layers into {num_blocks} blocks; "
                        "the e2e model must have n_layers divisible by n_blocks")
    per = len(layers) // num_blocks
    out = dict(depth_state)
    for key, value in e2e_state.items():
        layer = _LAYER.match(key)
        if layer:
            j, rest = int(layer.group(1)), layer.group(2)
            targets = [f"blocks.{j // per}.layers.{j % per}.{rest}"]
        elif (shared := _BLOCK.match(key)):   # stem and head: a copy per block
            targets = [f"blocks.{i}.{shared.group(1)}" for i in range(num_blocks)]
        else:
            continue                          # model-level buffers (band edges) stay the depth model's
        for target in targets:
            if target not in depth_state or depth_state[target].shape != value.shape:
                raise TsdbError(f"conversion: e2e parameter {key} has no counterpart {target} of the same shape "
                                "in the depth model; build both from the same model config")
            out[target] = value.clone()
    return out
