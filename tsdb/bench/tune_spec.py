"""The ``tsdb tune`` spec (``tsdb/configs/tune/*.yaml``) and its checks, with no heavy import.

:func:`check` runs in ``tsdb.cli.preflight`` before torch is imported: the spec, the benchmark
it names, the tuned arm, the peers, ``--trials`` and every variant's overrides (validated as
an :class:`~tsdb.config.ExperimentConfig`) are checked, and a mistake is one line naming the
file and the fix. The tuner itself is :mod:`tsdb.bench.tune`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tsdb.config import ExperimentConfig, _Strict, resolve_config
from tsdb.errors import TsdbError


class SearchParam(BaseModel):
    """One searched field: ``choices``, or a range ``[low, high]`` (``log`` scale; ``int``)."""

    model_config = ConfigDict(extra="forbid")
    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    int: bool = False

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.choices is None) == (self.low is None or self.high is None):
            raise ValueError("give either choices or low and high")
        return self


class SearchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    trials: int = Field(0, ge=0)
    seed: int = 0
    space: dict[str, SearchParam] = Field(default_factory=dict)


class TuneSpec(_Strict):
    name: str
    bench: str                                   # the benchmark config whose arm is tuned
    arm: str
    task: dict[str, Any] = Field(default_factory=dict)          # overrides of the bench task
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)  # every trial (e.g. a proxy budget)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    num_samples: int = Field(100, gt=0)
    variants: dict[str, dict[str, dict[str, Any]]] = Field(default_factory=lambda: {"base": {}})
    search: SearchSpec = SearchSpec()
    peers: list[str] = Field(default_factory=list)  # bench baselines/peers scored on validation too
    # what the choice minimises: "crps" (a scale-weighted mean: on M4 Hourly a few large series
    # decide it) or "mase" (the mean of per-window MASE: every series counts alike)
    objective: Literal["crps", "mase"] = "crps"


def merge(*overrides: dict) -> dict:
    """Section-wise merge of override dicts (later wins)."""
    out: dict = {}
    for o in overrides:
        for section, values in (o or {}).items():
            out.setdefault(section, {}).update(values)
    return out


def nest(params: dict[str, Any]) -> dict:
    """``{"model.patch_length": 8}`` -> ``{"model": {"patch_length": 8}}``."""
    out: dict = {}
    for key, value in params.items():
        section, _, field = key.partition(".")
        if not field:
            raise TsdbError(f"search space key {key!r} must be section.field, e.g. model.patch_length")
        out.setdefault(section, {})[field] = value
    return out


def load_tune_spec(path: str | Path) -> TuneSpec:
    return TuneSpec.from_yaml(resolve_config(path))


def check(config: str, trials: list[str] | None = None) -> TuneSpec:
    """The spec at ``config``, or a one-line `TsdbError` saying what in it cannot run."""
    spec = load_tune_spec(config)
    where = f"{config}"
    bench_path = resolve_config(spec.bench)
    try:
        bench = yaml.safe_load(bench_path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        raise TsdbError(f"{where}: bench {spec.bench} is not valid YAML; fix or restore it") from None
    arms = bench.get("arms") or {}
    if spec.arm not in arms:
        raise TsdbError(f"{where}: {spec.bench} has no arm {spec.arm!r}; arms: {sorted(arms)}")
    known = set(bench.get("baselines") or []) | set(bench.get("peers") or {})
    unknown = [p for p in spec.peers if p not in known]
    if unknown:
        raise TsdbError(f"{where}: {spec.bench} has no baseline or peer {unknown[0]!r}; known: {sorted(known)}")
    missing = [t for t in trials or [] if t not in spec.variants]
    if missing:
        raise TsdbError(f"--trials {missing[0]!r} is not a variant of {where}; variants: {sorted(spec.variants)}")
    base = merge(bench.get("base") or {}, arms[spec.arm] or {}, spec.overrides)
    for name, overrides in spec.variants.items():
        try:
            ExperimentConfig.model_validate(merge(base, overrides))
        except ValidationError as e:
            first = e.errors()[0]
            raise TsdbError(f"{where}: variant {name!r}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    for key in spec.search.space:
        nest({key: None})
    if spec.search.trials and not trials and importlib.util.find_spec("optuna") is None:
        raise TsdbError(f"{where} searches with optuna, which is not installed: pip install 'tsdb[tune]' "
                        "(or drop search.trials)")
    return spec
