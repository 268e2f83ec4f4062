"""``e2e``: the baseline arm. The same L layers as one denoiser over the full sigma range,
trained end to end with backprop through all layers (DiffusionBlocks with B = 1)."""

from __future__ import annotations

from tsdb.strategies.depth.strategy import DepthStrategy


class EndToEndStrategy(DepthStrategy):
    name = "e2e"
    convertible_to_blocks = True

    @property
    def num_blocks(self) -> int:
        return 1

    def arm_name(self) -> str:
        return "e2e"
