"""The one internal representation of time series used across tsdb."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass
class Series:
    """One univariate target series.

    target: float32 ``[T]``; NaN marks a missing value (the observed mask is ``~isnan``).
    start: timestamp of ``target[0]`` as a ``pd.Period`` of ``freq``.
    past_covariates: optional float32 ``[C, T]`` dynamic real covariates aligned with target.
    """

    item_id: str
    target: np.ndarray
    start: pd.Period
    freq: str
    past_covariates: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.target.shape[0])

    @property
    def observed(self) -> np.ndarray:
        return ~np.isnan(self.target)

    def slice(self, start: int, stop: int) -> "Series":
        """Positions [start, stop) as a new Series with the start timestamp moved along."""
        start = start if start >= 0 else len(self) + start
        stop = stop if stop >= 0 else len(self) + stop
        cov = None if self.past_covariates is None else self.past_covariates[:, start:stop]
        return Series(self.item_id, self.target[start:stop], self.start + start, self.freq, cov,
                      dict(self.meta))


@dataclass
class SeriesDataset:
    """A named collection of series sharing one frequency, with its forecasting protocol."""

    name: str
    series: list[Series]
    freq: str
    season_length: int = 1
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.series)

    def __iter__(self):
        return iter(self.series)

    def to_gluonts(self) -> list[dict]:
        """GluonTS ListDataset-style entries (``start``, ``target``, ``item_id``)."""
        out = []
        for s in self.series:
            entry = {"start": s.start, "target": s.target.astype(np.float32), "item_id": s.item_id}
            if s.past_covariates is not None:
                entry["past_feat_dynamic_real"] = s.past_covariates.astype(np.float32)
            out.append(entry)
        return out
