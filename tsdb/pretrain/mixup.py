"""TSMixup (Chronos paper, section 4.1): convex mixtures of mean-scaled series.

A mixture takes k ~ U{1..max_components} series, crops each to one random length
l ~ U[min_length, max_length] (shortened to the shortest component), divides each crop by
its mean absolute value so that no component dominates by scale, and sums them with
Dirichlet(alpha) weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tsdb.errors import TsdbError


def mean_scale(values: np.ndarray) -> np.ndarray:
    """``values`` divided by their mean absolute value (unchanged when that is 0)."""
    scale = float(np.mean(np.abs(values)))
    return values / scale if scale > 0 else values


@dataclass(frozen=True)
class TSMixup:
    max_components: int = 3
    alpha: float = 1.5
    min_length: int = 128
    max_length: int = 2048

    def __post_init__(self):
        if self.max_components < 1 or self.alpha <= 0 or not 1 <= self.min_length <= self.max_length:
            raise TsdbError(f"TSMixup needs max_components >= 1, alpha > 0 and 1 <= min_length <= "
                            f"max_length; got {self}")

    def mix(self, components: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
        """One mixture of ``components`` (1-D float arrays of at least ``min_length`` points)."""
        shortest = min(len(c) for c in components)
        if shortest < self.min_length:
            raise TsdbError(f"TSMixup component of {shortest} points is shorter than min_length "
                            f"{self.min_length}")
        length = min(int(rng.integers(self.min_length, self.max_length + 1)), shortest)
        starts = [int(rng.integers(0, len(c) - length + 1)) for c in components]
        weights = rng.dirichlet(np.full(len(components), self.alpha))
        crops = [mean_scale(c[s:s + length].astype(np.float64)) for c, s in zip(components, starts)]
        return np.sum([w * c for w, c in zip(weights, crops)], axis=0).astype(np.float32)

    def sample(self, rng: np.random.Generator,
               draw_component: Callable[[np.random.Generator], np.ndarray]) -> np.ndarray:
        """A mixture of k fresh components from ``draw_component(rng)``."""
        k = int(rng.integers(1, self.max_components + 1))
        return self.mix([draw_component(rng) for _ in range(k)], rng)
