"""``tsdb_model.json``: reading it, and the checks every export format shares.

A format's own checks live in its class (``check_metadata`` in ``formats/<name>.py``);
:func:`load_metadata` runs the shared ones, then the format's.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

from .errors import StreamingError
from .registry import format_class

METADATA_FILE = "tsdb_model.json"
# keys every format's metadata has (a format adds its own)
# frozen-at-init: loc/scale = mean/std of the last context_length values when a series starts;
# the -recent-location variant takes loc from the last normalization.location_window of them
FROZEN_AT_INIT, RECENT_LOCATION = "frozen-at-init", "frozen-at-init-recent-location"
NORMALIZATION_RULES = (FROZEN_AT_INIT, RECENT_LOCATION)
COMMON_KEYS = ("strategy", "shapes", "sigma_data", "normalization", "graphs", "sampler", "model_id")
SAMPLERS = ("euler", "heun")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_metadata(model_dir: str | os.PathLike) -> tuple[Path, dict]:
    """``tsdb_model.json`` of ``model_dir`` and its contents (not yet validated)."""
    path = Path(model_dir) / METADATA_FILE
    if not path.exists():
        raise StreamingError(f"{model_dir} has no {METADATA_FILE}; export the model with `tsdb export RUN_DIR`")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StreamingError(f"{path} is not valid JSON ({e}); re-export the model with `tsdb export RUN_DIR`") from None
    if not isinstance(meta, dict):
        raise StreamingError(f"{path} is not a JSON object; re-export the model with `tsdb export RUN_DIR`")
    return path, meta


def model_format(model_dir: str | os.PathLike):
    """The ``format`` named by an exported model directory's metadata."""
    return read_metadata(model_dir)[1].get("format")


def check_common(model_dir: Path, path: Path, meta: dict, version: int, keys: Sequence[str]) -> None:
    """The checks every format shares: version, keys, normalization rule, sampler, one
    denoise graph per block, context shape, and every graph file against its checksum."""
    if meta.get("format_version") != version:
        raise StreamingError(f"{path}: format version {meta.get('format_version')} is not supported "
                             f"(this runtime reads version {version} of {meta.get('format')!r}); "
                             "upgrade tsdb-streaming or re-export")
    missing = [k for k in (*COMMON_KEYS, *keys) if k not in meta]
    if missing:
        raise StreamingError(f"{path}: missing keys {missing}; re-export the model")
    try:
        rule = meta["normalization"].get("rule")
        if rule not in NORMALIZATION_RULES:
            raise StreamingError(f"{path}: unknown normalization rule {rule!r}")
        if meta["sampler"] not in SAMPLERS:
            raise StreamingError(f"{path}: unknown sampler {meta['sampler']!r} (known: {list(SAMPLERS)})")
        sh, graphs = meta["shapes"], meta["graphs"]
        nb = sh["n_blocks"]
        if len(graphs["denoise"]) != nb or len(sh["layers_per_block"]) != nb:
            raise StreamingError(f"{path}: {nb} blocks but inconsistent graphs / layers")
        if sh["context_length"] != sh["window_tokens"] * sh["patch_length"]:
            raise StreamingError(f"{path}: inconsistent shapes {sh}")
        entries = [graphs["update"], *graphs["denoise"]]
        files = [(model_dir / e["file"], e["sha256"]) for e in entries]
    except (KeyError, TypeError, AttributeError) as e:
        raise StreamingError(f"{path}: malformed metadata ({type(e).__name__}: {e}); re-export the model") from None
    for f, digest in files:
        if not f.exists():
            raise StreamingError(f"{f} is missing; re-export the model")
        if sha256_file(f) != digest:
            raise StreamingError(f"{f} does not match the checksum in {METADATA_FILE}; re-export the model")


def load_metadata(model_dir: str | os.PathLike) -> dict:
    """Read ``tsdb_model.json`` and validate it (and the graph files it lists) as its format requires."""
    model_dir = Path(model_dir)
    path, meta = read_metadata(model_dir)
    cls = format_class(meta.get("format"), str(path))
    check_common(model_dir, path, meta, cls.FORMAT_VERSION, cls.METADATA_KEYS)
    try:
        cls.check_metadata(path, meta)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        if isinstance(e, StreamingError):
            raise
        raise StreamingError(f"{path}: malformed metadata ({type(e).__name__}: {e}); re-export the model") from None
    return meta


__all__ = ["METADATA_FILE", "check_common", "load_metadata", "model_format", "read_metadata", "sha256_file"]
