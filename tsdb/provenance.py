"""What a result was made from: hashes of configs and data, and the one line that names a
mismatch.

A run directory (``tsdb train``) and every benchmark arm store a record ``{"config": ...,
"config_sha256": ..., "data": ..., "data_sha256": ...}``; a rerun that would reuse them
compares records and refuses a mismatch with one line naming the first fields that
differ (``model.d_model: 32 -> 64``) or the data (``files.m4_hourly_train.csv``,
``sha256``), instead of silently mixing configurations.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from tsdb.data.series import SeriesDataset


def digest(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def dataset_sha256(dataset: SeriesDataset) -> str:
    """sha256 over a dataset's content: name, frequency, and every series' id, start,
    values (float32) and covariates, in order."""
    h = hashlib.sha256(f"{dataset.name}\0{dataset.freq}\0{len(dataset)}\0".encode())
    for s in dataset:
        h.update(f"{s.item_id}\0{s.start}\0{len(s)}\0".encode())
        h.update(np.ascontiguousarray(s.target, dtype=np.float32).data)
        if s.past_covariates is not None:
            h.update(np.ascontiguousarray(s.past_covariates, dtype=np.float32).data)
    return h.hexdigest()


def dataset_identity(dataset: SeriesDataset) -> dict:
    """A dataset's identity for a run directory: name, size and content hash."""
    return {"dataset": dataset.name, "series": len(dataset), "values": int(sum(len(s) for s in dataset)),
            "sha256": dataset_sha256(dataset)}


def record(config: dict, data: dict) -> dict:
    """The provenance record stored beside a result."""
    return {"config": config, "config_sha256": digest(config), "data": data, "data_sha256": digest(data)}


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths whose values differ, as ``"path: old -> new"`` (values shortened)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                out.append(f"{path}: {_short(old.get(key, '(absent)'))} -> {_short(new.get(key, '(absent)'))}")
            else:
                out += differences(old[key], new[key], path)
        return out
    return [] if old == new else [f"{prefix or 'value'}: {_short(old)} -> {_short(new)}"]


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 24 else text[:21] + "..."


def mismatch(old: dict | None, new: dict) -> dict[str, str]:
    """What differs between a stored record ``old`` and ``new``, in words: ``{}`` when they
    match, else ``{"config": "model.d_model: 32 -> 64"}``, ``{"data": "sha256: ab12... ->
    cd34..."}`` (both when both differ) or ``{"record": "written by an older tsdb"}``."""
    if not isinstance(old, dict) or "config_sha256" not in old or "data_sha256" not in old:
        return {"record": "written by an older tsdb"}
    out = {}
    for what in ("config", "data"):
        if old[f"{what}_sha256"] != new[f"{what}_sha256"]:
            diff = differences(old.get(what), new[what]) or [f"sha256 {old[f'{what}_sha256'][:12]}..."]
            out[what] = "; ".join(diff[:3]) + ("; ..." if len(diff) > 3 else "")
    return out
