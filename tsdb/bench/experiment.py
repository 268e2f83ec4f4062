"""Side-by-side experiments: train and evaluate a set of arms on one protocol.

Used by ``tsdb bench`` (fixed arm set per benchmark and tier) and ``tsdb ablate`` (a grid of
split strategies). Every arm sees the same data and windows and is scored by the same code;
our arms share width, per-block step budget and seeds.

Seeds: each tsdb arm runs once per seed of ``spec.seeds`` (a seed sets ``train.seed``: the
model's initialisation and the training windows and diffusion noise), stochastic peers
(neuralforecast, DeepAR) once per ``peer_seeds`` (default: the same seeds), deterministic
peers and baselines once. ``results.json`` keeps every seed's figures, their spread and the
per-window scores (seed means) that the paired bootstrap of ``tsdb.bench.stats`` resamples.

Layout (``OUT``)::

    spec.yaml, results.json, report.md, *.png
    arms/<name>/seed-<s>/metrics.json   one seed of a seeded arm (tsdb arms: its run/ beside it)
    arms/<name>/metrics.json            an arm that runs once

Every ``metrics.json`` holds the provenance record of what made it (``tsdb.provenance``: the
arm's full config and the data's identity: dataset files' sha256, the task's window
definition and a hash of the windows' contents). A rerun reuses a finished arm only when
both match, and otherwise stops with one line naming the difference.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

import tsdb.evaluation.plots as plots
from tsdb.evaluation.baselines import fit_deepar, seasonal_naive
from tsdb.evaluation.peers import PeerSpec, run_peer
from tsdb.bench.stats import (RESAMPLES, bootstrap_blocks, crps_ratio, mean_std_text, metric_bootstrap, min_max_text,
                              ratio_text, spread)
from tsdb.config import ExperimentConfig, ModelConfig, TrainConfig, _Strict
from tsdb.data.registry import describe, load_dataset
from tsdb.errors import TsdbError
from tsdb.evaluation.tasks import EvalTask, etth1_task, evaluate_predictor, m4_hourly_task, rolling_protocol_task
from tsdb.provenance import dataset_sha256, digest, mismatch, record
from tsdb.training.memory import peak_rss_bytes, reset_peak_rss
from tsdb.strategies import get_strategy
from tsdb.training.loop import train_model

SCHEMA = 2  # results.json: per-seed figures, spread, window scores, comparisons (1: one seed, no provenance)
# figures that vary with the seed: averaged in results.json, kept per seed, with their spread
SEED_FIGURES = ("crps", "mase", "mse", "mae", "coverage80", "train_seconds", "predict_seconds", "fit_predict_seconds",
                "cpu_seconds", "train_state_bytes", "saved_activation_bytes", "peak_rss_bytes")
WINDOW_FIGURES = ("crps_num", "mase", "mse", "mae")


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    protocol: Literal["m4-hourly", "etth1", "rolling"]
    dataset: str
    horizon: int | None = None      # etth1 / rolling
    lookback: int = 512             # etth1
    stride: int = 1                 # etth1 / rolling
    windows: int = 1                # rolling: the last `windows` windows of each series
    max_windows: int | None = None  # subsample evaluation windows (quick tiers); stated in results
    # "val": the protocol's validation window(s) instead of the test windows (tsdb tune chooses
    # settings there; the test windows are never read)
    split: Literal["test", "val"] = "test"


class DeepARSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = 10
    num_batches_per_epoch: int = 50
    batch_size: int = 32
    context_length: int | None = None


class ExperimentSpec(_Strict):
    """A benchmark or ablation: one task, our arms as overrides of ``base``, baselines."""

    name: str
    task: TaskSpec
    base: ExperimentConfig = ExperimentConfig()
    arms: dict[str, dict[str, dict[str, Any]]] = Field(default_factory=dict)
    baselines: list[Literal["seasonal-naive", "deepar"]] = Field(default_factory=list)
    deepar: DeepARSpec = DeepARSpec()
    # peers (tsdb.evaluation.peers) on the same windows: {arm name: {kind: ..., options}}
    peers: dict[str, PeerSpec] = Field(default_factory=dict)
    num_samples: int = 100
    # train.seed of every run of our arms (None: each arm once, with its own train.seed)
    seeds: list[int] | None = None
    # seeds of stochastic peers (neural, DeepAR); None: ``seeds``
    peer_seeds: list[int] | None = None
    # seeds that also run ``steps_sweep`` (None: every seed)
    sweep_seeds: list[int] | None = None
    # {arm: reference arm}: the arm's n_layers (then d_model) chosen so that its parameter
    # count matches the reference arm's within 3% (e.g. an e2e arm as large as depth-b4)
    match_params: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)   # {arm: what sets it apart}, shown in reports
    # how the base settings were chosen (printed in the report: a reader must know whether the
    # test windows took part)
    selection: str | None = None
    # the arm whose settings a validation-only command (``tsdb tune``) chose: the report
    # bootstraps it against the best peer in CRPS and in MASE, whether or not it scores lowest on test
    chosen: str | None = None
    bootstrap_resamples: int = Field(RESAMPLES, ge=100)
    # extra inference-time evaluations: {arm: [K, ...]} -> figures "crps_k" per K
    steps_sweep: dict[str, list[int]] = Field(default_factory=dict)
    anchors: dict[str, dict[str, float | None]] = Field(default_factory=dict)  # published numbers, cited
    # memory-only sweep: {arm: [K, ...]} -> training-state bytes of one step with loop_iters = K
    memory_sweep: dict[str, list[int]] = Field(default_factory=dict)
    _matched: dict = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _names_unique(self):
        clash = (set(self.baselines) | set(self.arms)) & set(self.peers) | set(self.baselines) & set(self.arms)
        if clash:
            raise ValueError(f"arm names used twice (baselines, peers, arms): {sorted(clash)}")
        for seeds in (self.seeds, self.peer_seeds):
            if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
                raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
        bad = {a: r for a, r in self.match_params.items() if a not in self.arms or r not in self.arms or a == r}
        if bad:
            raise ValueError(f"match_params must map one of our arms to another: {bad}")
        if self.chosen is not None and self.chosen not in self.arms:
            raise ValueError(f"chosen must name one of our arms ({sorted(self.arms)}), got {self.chosen!r}")
        return self

    def arm_config(self, name: str, seed: int | None = None) -> ExperimentConfig:
        """Arm ``name``'s config (with ``train.seed = seed`` when given); a ``match_params`` arm
        gets the layers (or width) that match its reference's parameter count."""
        cfg = self.base.with_overrides(**self.arms[name])
        if name in self.match_params:
            if name not in self._matched:   # (building models to count parameters: once per arm)
                ref = parameter_count(self.arm_config(self.match_params[name]))
                self._matched[name] = (match_parameters(cfg, ref).model.model_dump(), ref)
            cfg = cfg.with_overrides(model=self._matched[name][0])
        return cfg if seed is None else cfg.with_overrides(train={"seed": seed})

    def reference_params(self, name: str) -> int:
        """The parameter count a ``match_params`` arm was matched to."""
        self.arm_config(name)
        return self._matched[name][1]

    def names(self) -> list[str]:
        """Every arm of the spec in run order: baselines, peers, our arms."""
        return [*self.baselines, *self.peers, *self.arms]

    def unrun(self, results: dict) -> list[str]:
        """Arms of the spec that ``results`` lacks (a run restricted by ``--arms``)."""
        return [n for n in self.names() if n not in results["arms"]]

    def arm_seeds(self, name: str) -> list[int | None]:
        """The seeds arm ``name`` runs with; ``[None]``: once (a deterministic peer or baseline)."""
        if name in self.arms:
            return list(self.seeds) if self.seeds is not None else [self.arm_config(name).train.seed]
        stochastic = name == "deepar" if name in self.baselines else self.peers[name].seeded
        if not stochastic:
            return [None]
        seeds = self.peer_seeds if self.peer_seeds is not None else self.seeds
        return list(seeds) if seeds else [self.base.train.seed]

    def sweeps(self, name: str, seed: int | None) -> bool:
        return seed is None or self.sweep_seeds is None or seed in self.sweep_seeds


def parameter_count(cfg: ExperimentConfig) -> int:
    return sum(p.numel() for p in get_strategy(cfg.model).build().parameters())


def match_parameters(cfg: ExperimentConfig, target: int, tolerance: float = 0.03) -> ExperimentConfig:
    """``cfg`` with the ``n_layers`` whose parameter count is nearest ``target`` (the count is
    linear in the layers); if that misses by more than ``tolerance``, the nearest width
    (``d_model`` in steps of ``2 * n_heads``) where some layer count is within it."""
    step = 2 * cfg.model.n_heads
    d0 = cfg.model.d_model
    widths = sorted(range(step, 2 * d0 + 1, step), key=lambda d: (abs(d - d0), d))
    best = None
    for d in widths:
        at = lambda n: cfg.with_overrides(model={"d_model": d, "n_layers": n})  # noqa: E731
        one, two = parameter_count(at(1)), parameter_count(at(2))
        guess = max(1, round((target - one) / (two - one)) + 1)
        for n in sorted({max(1, guess - 1), guess, guess + 1}):
            try:
                count = parameter_count(at(n))
            except TsdbError:  # a layer count the strategy's blocks cannot split
                continue
            err = abs(count - target) / target
            if best is None or err < best[0]:
                best = (err, at(n))
        if best is not None and best[0] <= tolerance:
            return best[1]
    raise TsdbError(f"no n_layers/d_model gives {target} parameters within {tolerance:.0%} for "
                    f"strategy {cfg.model.strategy}; set the arm's shape by hand")


def build_task(spec: TaskSpec, root: str | None = None) -> EvalTask:
    dataset = load_dataset(spec.dataset, root)
    if spec.protocol == "m4-hourly":
        task = m4_hourly_task(dataset, split=spec.split)
    elif spec.protocol == "etth1":
        task = etth1_task(dataset, spec.horizon or 96, lookback=spec.lookback, stride=spec.stride, split=spec.split)
    else:
        horizon = spec.horizon or dataset.meta.get("prediction_length")
        task = rolling_protocol_task(dataset, horizon, spec.windows, spec.stride, split=spec.split)
    if spec.max_windows and task.num_windows > spec.max_windows:
        task = subsample_windows(task, spec.max_windows)
    return task


def subsample_windows(task: EvalTask, n: int) -> EvalTask:
    """Keep ``n`` evenly spaced test windows (a quick-tier knob, reported as ``num_windows``)."""
    keep = set(np.linspace(0, task.num_windows - 1, n).round().astype(int).tolist())
    pairs = [p for i, p in enumerate(task.test_data) if i in keep]
    task.test_data = _ListTestData(pairs)
    return task


class _ListTestData:
    """A fixed list of (input, label) pairs with TestData's ``input``/``label`` views."""

    def __init__(self, pairs):
        self._pairs = pairs
        self.input = [p[0] for p in pairs]
        self.label = [p[1] for p in pairs]

    def __iter__(self):
        return iter(self._pairs)

    def __len__(self):
        return len(self._pairs)


def torch_predictor(strategy, model, num_steps: int | None = None, seed: int = 0):
    """Wrap a trained strategy model as the ``SamplePredictor`` contract of ``evaluate``."""
    generator = torch.Generator().manual_seed(seed)

    def predict(contexts: np.ndarray, num_samples: int, covariates: np.ndarray | None = None) -> np.ndarray:
        kw = {} if covariates is None else {"covariates": torch.from_numpy(covariates)}
        with torch.inference_mode():
            out = strategy.forecast(model, torch.from_numpy(contexts), num_samples, num_steps=num_steps,
                                    generator=generator, **kw)
        return out.numpy()

    return predict


def function_evaluations(strategy, model, context: np.ndarray, covariates: np.ndarray | None = None,
                         num_steps: int | None = None) -> dict:
    """Counted, not computed: denoiser calls of one forecast (``nfe``; a Heun step is two but
    the last) and the transformer layers those calls ran per sample (``layer_passes``: a
    depth block runs its L/B layers, e2e all L, a looped call its core), from wrappers on
    every block's future path during one forecast of ``context [1, C]``."""
    calls: list[int] = []
    for i, block in enumerate(model.blocks):
        block.denoise_future = (lambda *a, _f=block.denoise_future, _i=i, **k: calls.append(_i) or _f(*a, **k))
    kw = {} if covariates is None else {"covariates": torch.from_numpy(covariates)}
    try:
        with torch.inference_mode():
            strategy.forecast(model, torch.from_numpy(context), 1, num_steps=num_steps,
                              generator=torch.Generator().manual_seed(0), **kw)
    finally:
        for block in model.blocks:
            del block.denoise_future
    if not calls:
        raise RuntimeError(f"{strategy.name}: no denoiser call was counted (the sampler bypasses denoise_future)")
    return {"nfe": len(calls), "layer_passes": sum(len(model.blocks[i].layers) for i in calls)}


def run_arm(spec: ExperimentSpec, name: str, seed: int | None, task: EvalTask, arm_dir: Path) -> dict:
    """Train (resumably) and evaluate one seed of one of our arms; figures for results.json."""
    cfg = spec.arm_config(name, seed)
    strategy = get_strategy(cfg.model)
    reset_peak_rss()
    model, summary = train_model(cfg, task.train, arm_dir / "run", strategy=strategy)
    figures = {k: summary[k] for k in ("train_seconds", "train_state_bytes", "saved_activation_bytes", "params")}
    figures["peak_rss_bytes"] = peak_rss_bytes()
    model.eval()
    c, n_cov = cfg.model.context_length, cfg.model.num_covariates
    probe = (task.contexts(c)[:1], task.covariates(c)[:1] if n_cov else None)
    metrics = evaluate_predictor(task, torch_predictor(strategy, model, seed=cfg.train.seed), c, spec.num_samples,
                                 num_covariates=n_cov, progress=cfg.train.progress)
    figures.update(metrics)
    figures.update(kind="tsdb", arm=strategy.arm_name(), seed=cfg.train.seed, num_steps=cfg.model.inference_steps,
                   sampler=strategy.sampler, n_layers=cfg.model.n_layers, d_model=cfg.model.d_model,
                   **function_evaluations(strategy, model, *probe))
    if name in spec.match_params:
        figures["matched_params"] = {"reference": spec.match_params[name],
                                     "reference_params": spec.reference_params(name)}
    if spec.sweeps(name, seed):
        for k in spec.steps_sweep.get(name, []):
            m = evaluate_predictor(task, torch_predictor(strategy, model, num_steps=k, seed=cfg.train.seed), c,
                                   spec.num_samples, num_covariates=n_cov, progress=cfg.train.progress)
            figures.setdefault("crps_by_steps", {})[str(k)] = m["crps"]
            nfe = function_evaluations(strategy, model, *probe, num_steps=k)["nfe"]
            figures.setdefault("nfe_by_steps", {})[str(k)] = nfe
    if name in spec.memory_sweep and seed == spec.arm_seeds(name)[0]:
        figures["saved_activation_bytes_by_iters"] = memory_at_iters(spec, name, spec.memory_sweep[name], task)
    return figures


def memory_at_iters(spec: ExperimentSpec, name: str, iters: list[int], task: EvalTask) -> dict:
    """Saved-activation bytes of one training step of a fresh model with ``loop_iters = K``."""
    from tsdb.data.windows import TrainingWindows
    from tsdb.training.memory import measure_training_step
    from tsdb.training.loop import make_optimizer
    out = {}
    for k in iters:
        cfg = spec.arm_config(name).with_overrides(model={"loop_iters": k})
        strategy = get_strategy(cfg.model)
        windows = TrainingWindows(task.train, cfg.model.context_length, cfg.model.horizon, seed=cfg.train.seed,
                                  covariates=cfg.model.num_covariates, draw_sets=strategy.draw_sets)
        batch = next(iter(torch.utils.data.DataLoader(windows, batch_size=cfg.train.batch_size)))
        unit = strategy.units(strategy.build())[0]
        stats = measure_training_step(unit.module, lambda: unit.loss(batch), lambda p: make_optimizer(p, cfg.train))
        out[str(k)] = stats["saved_activation_bytes"]
    return out


def run_baseline(spec: ExperimentSpec, name: str, task: EvalTask, seed: int | None = None) -> dict:
    if name == "seasonal-naive":
        t0 = time.perf_counter()
        figures = evaluate_predictor(task, seasonal_naive(task.season_length, task.horizon),
                                     max(task.season_length, 1), spec.num_samples)
        figures["train_seconds"] = 0.0
        figures["predict_seconds"] = time.perf_counter() - t0
        return figures
    context = spec.deepar.context_length or spec.base.model.context_length
    reset_peak_rss()
    arm = fit_deepar(task, context, epochs=spec.deepar.epochs,
                     num_batches_per_epoch=spec.deepar.num_batches_per_epoch,
                     batch_size=spec.deepar.batch_size, seed=spec.base.train.seed if seed is None else seed)
    figures = arm.evaluate(task, spec.num_samples)
    figures["peak_rss_bytes"] = peak_rss_bytes()
    figures["params"] = sum(p.numel() for p in arm.predictor.prediction_net.parameters())
    return figures


def task_identity(spec: TaskSpec, task: EvalTask) -> dict:
    """The data a task's figures come from: the dataset's files (sha256, checked against its
    card when loaded), the window definition, and hashes of the training series and of every
    test window's input and label."""
    files = {f["name"]: f["sha256"] for f in describe(spec.dataset).get("files", {}).values()}
    h = hashlib.sha256()
    for entry, label in zip(task.test_data.input, task.test_data.label):
        h.update(f"{entry.get('item_id')}\0{label['start']}\0".encode())
        h.update(np.ascontiguousarray(entry["target"], dtype=np.float32).data)
        h.update(np.ascontiguousarray(label["target"], dtype=np.float32).data)
    return {"dataset": spec.dataset, "files": files, "task": spec.model_dump(), "num_windows": task.num_windows,
            "train_sha256": dataset_sha256(task.train), "windows_sha256": h.hexdigest()}


def arm_provenance(spec: ExperimentSpec, name: str, seed: int | None, data: dict) -> dict:
    """The record stored with (and checked against) one run of an arm."""
    if name in spec.arms:
        cfg = spec.arm_config(name, seed)
        first = seed == spec.arm_seeds(name)[0]
        config = {"kind": "tsdb", "model": cfg.model.model_dump(), "train": cfg.train.model_dump(exclude={"progress"}),
                  "num_samples": spec.num_samples,
                  "steps_sweep": spec.steps_sweep.get(name, []) if spec.sweeps(name, seed) else [],
                  "memory_sweep": spec.memory_sweep.get(name, []) if first else []}
    elif name in spec.peers:
        config = {"kind": "peer", "peer": spec.peers[name].model_dump(), "lookback": spec.base.model.context_length,
                  "seed": spec.base.train.seed if seed is None else seed, "num_samples": spec.num_samples}
    else:
        config = {"kind": "baseline", "baseline": name, "num_samples": spec.num_samples}
        if name == "deepar":
            config.update(deepar=spec.deepar.model_dump(), lookback=spec.base.model.context_length,
                          seed=spec.base.train.seed if seed is None else seed)
    return record(config, data)


def arm_dir(out: Path, name: str, seed: int | None) -> Path:
    return out / "arms" / name / ("" if seed is None else f"seed-{seed}")


def with_new_defaults(stored: dict | None) -> dict | None:
    """A stored record with the fields it lacks (of the task, model and train specs) set to
    their defaults, rehashed.

    A record written before a field existed (``task.split``, ``model.linear_head``) was made
    with the behaviour that the field's default keeps (a new field never changes what its
    default does), so only a value the record did store can make a mismatch."""
    if not isinstance(stored, dict) or "data_sha256" not in stored or "config_sha256" not in stored:
        return stored
    out = dict(stored)
    for part, key, fields in (("data", "task", TaskSpec.model_fields), ("config", "model", ModelConfig.model_fields),
                              ("config", "train", TrainConfig.model_fields)):
        section = (out.get(part) or {}).get(key)
        if not isinstance(section, dict):
            continue
        absent = {k: f.default for k, f in fields.items()
                  if k not in section and not f.is_required() and k != "progress"}
        if absent:
            out[part] = {**out[part], key: {**section, **absent}}
            out[f"{part}_sha256"] = digest(out[part])
    return out


def _reusable(path: Path, prov: dict, out: Path) -> dict | None:
    """The stored figures at ``path`` if they were made from ``prov``'s config and data; a
    mismatch stops the run with one line naming what differs."""
    if not path.exists():
        return None
    stored = json.loads(path.read_text())
    diff = mismatch(with_new_defaults(stored.get("provenance")), prov)
    if diff:
        words = {"config": "made with another config", "data": "made on other data",
                 "record": "without a provenance record"}
        what = " and ".join(f"{words[k]} ({v})" for k, v in diff.items())
        raise TsdbError(f"{path.parent} holds results {what}; delete {path.parent} to rerun it, or use another "
                        f"--out than {out}")
    return stored


def run_experiment(spec: ExperimentSpec, out: str | Path, root: str | None = None,
                   only: list[str] | None = None, log=print, command: str | None = None) -> dict:
    """Run every baseline, peer and arm of ``spec`` (every seed) into ``out``; returns the
    results dict. With ``only``, other arms are reused where finished and skipped otherwise."""
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    task = build_task(spec.task, root)
    task.window_scores = True
    data = task_identity(spec.task, task)
    log(f"[{spec.name}] task {task.name}: {task.num_windows} windows, horizon {task.horizon}, "
        f"{len(task.train)} training series")
    items = [entry.get("item_id") for entry in task.test_data.input]
    results = {"schema": SCHEMA, "name": spec.name,
               "task": {**spec.task.model_dump(), "num_windows": task.num_windows},
               "machine": machine_info(), "data": {k: data[k] for k in ("files", "train_sha256", "windows_sha256")},
               "windows": {"abs_target": None,
                           "block": bootstrap_blocks(items, task.horizon, task.info.get("stride", spec.task.stride))},
               "arms": {}}
    for name in spec.names():
        runs = {}
        seeds = spec.arm_seeds(name)
        legacy = out / "arms" / name / "metrics.json"
        if seeds != [None] and legacy.exists():
            raise TsdbError(f"{legacy} is a single-seed result without a provenance record (written by an older "
                            f"tsdb); delete {legacy.parent} to rerun it with seeds {seeds}, or use another --out")
        for seed in seeds:
            path = arm_dir(out, name, seed) / "metrics.json"
            label = name if seed is None else f"{name} seed {seed}"
            prov = arm_provenance(spec, name, seed, data)
            stored = _reusable(path, prov, out)
            if stored is not None:
                runs[seed] = stored
                log(f"[{spec.name}] {label}: done earlier, reusing {path}")
                continue
            if only and name not in only:
                continue
            log(f"[{spec.name}] {label}: training and evaluating")
            if name in spec.baselines:
                figures = {**run_baseline(spec, name, task, seed), "kind": "baseline", "stochastic": name == "deepar"}
            elif name in spec.peers:
                figures = {**run_peer(spec.peers[name], task, spec.base.model.context_length,
                                      spec.base.train.seed if seed is None else seed, spec.num_samples),
                           "kind": "peer", "stochastic": spec.peers[name].stochastic}
            else:
                figures = run_arm(spec, name, seed, task, arm_dir(out, name, seed))
            figures["provenance"] = prov
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(figures, indent=2))
            runs[seed] = figures
            log(f"[{spec.name}] {label}: CRPS {figures['crps']:.4f}  MASE {figures['mase']:.3f}  "
                f"train {figures.get('train_seconds', 0):.0f}s")
        if runs:
            if results["windows"]["abs_target"] is None:
                results["windows"]["abs_target"] = next(iter(runs.values()))["window_scores"]["abs_target"]
            results["arms"][name] = aggregate(runs)
    results["comparisons"] = comparisons(results, spec.bootstrap_resamples, spec.chosen)
    results["command"] = command or _default_command(spec)
    results["wall_seconds"] = time.perf_counter() - started  # this invocation (reused arms cost ~0)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(spec, results, out)
    return results


def aggregate(runs: dict[int | None, dict]) -> dict:
    """One arm's entry in results.json from its runs (one per seed): every seed-dependent
    figure averaged over seeds, with ``per_seed`` figures, their ``spread`` and the per-window
    scores averaged over seeds (what the bootstrap resamples)."""
    first = next(iter(runs.values()))
    out = {k: v for k, v in first.items() if k not in ("window_scores", "provenance", "seed")}
    out["data_sha256"] = first["provenance"]["data_sha256"]
    seeds = [s for s in runs if s is not None]
    out["seeds"] = seeds
    out["per_seed"] = {str(s): {**{k: f[k] for k in SEED_FIGURES if f.get(k) is not None},
                                "config_sha256": f["provenance"]["config_sha256"],
                                **({"crps_by_steps": f["crps_by_steps"]} if "crps_by_steps" in f else {})}
                       for s, f in runs.items() if s is not None}
    if seeds:
        out["spread"] = {k: spread([f.get(k) for f in runs.values()])
                         for k in SEED_FIGURES if any(f.get(k) is not None for f in runs.values())}
        out.update({k: v["mean"] for k, v in out["spread"].items()})
    sweeps = [f["crps_by_steps"] for f in runs.values() if "crps_by_steps" in f]
    if sweeps:
        out["crps_by_steps"] = {k: float(np.mean([d[k] for d in sweeps])) for k in sweeps[0]}
        out["spread_by_steps"] = {k: spread([d[k] for d in sweeps]) for k in sweeps[0]}
    scores = [f["window_scores"] for f in runs.values() if f.get("window_scores")]
    if scores:
        out["window_scores"] = {k: np.round(np.mean([w[k] for w in scores], axis=0), 9).tolist()
                                for k in WINDOW_FIGURES}
    return out


def _is_ours(f: dict) -> bool:
    return f.get("kind", "tsdb" if "train_state_bytes" in f else "peer") == "tsdb"


def comparisons(results: dict, resamples: int = RESAMPLES, chosen: str | None = None) -> list[dict]:
    """Paired bootstraps of CRPS: tsdb's best arm (lowest mean CRPS, e2e arms aside) against
    the best peer or baseline and against every e2e arm, then every other tsdb arm against
    the first e2e arm; then the ``chosen`` arm (picked on validation windows) against the best
    peer in CRPS and against the peer of lowest MASE in MASE. Needs the per-window scores of
    schema 2."""
    windows = results.get("windows") or {}
    arms = {n: f for n, f in results["arms"].items() if f.get("window_scores")}
    if windows.get("abs_target") is None or not arms:
        return []
    ours = [n for n, f in arms.items() if _is_ours(f)]
    refs = [n for n in ours if arms[n].get("arm") == "e2e"]
    candidates = [n for n in ours if n not in refs]
    others = [n for n, f in arms.items() if not _is_ours(f)]
    pairs = []
    if candidates:
        best = min(candidates, key=lambda n: arms[n]["crps"])
        if others:
            pairs.append((best, min(others, key=lambda n: arms[n]["crps"]), "best tsdb arm vs best peer"))
        pairs += [(best, r, "best tsdb arm vs e2e") for r in refs]
        if refs:
            pairs += [(n, refs[0], "tsdb arm vs e2e") for n in candidates if n != best]
    out = [compare(results, a, b, role, resamples) for a, b, role in pairs]
    if chosen in candidates and others:
        if chosen != best:
            out.append(compare(results, chosen, min(others, key=lambda n: arms[n]["crps"]),
                               "validation-chosen arm vs best peer", resamples))
        out.append(compare(results, chosen, min(others, key=lambda n: arms[n]["mase"]),
                           "validation-chosen arm vs best peer", resamples, metric="mase"))
    return out


def compare(results: dict, a: str, b: str, role: str, resamples: int = RESAMPLES, metric: str = "crps") -> dict:
    """Paired bootstrap of arm ``a``'s CRPS (``metric="mase"``: mean per-window MASE, every
    window weighing 1) against arm ``b``'s over the test windows (their seed-averaged window
    scores), labelled ``role``; the figures keep the keys ``crps_a``/``crps_b``."""
    windows, arms = results["windows"], results["arms"]
    key = {"crps": "crps_num", "mase": "mase"}[metric]
    boot = metric_bootstrap(metric, arms[a]["window_scores"][key], arms[b]["window_scores"][key],
                            windows["abs_target"], windows.get("block"), resamples)
    return {"a": a, "b": b, "role": role, "metric": metric, **boot}


def machine_info() -> dict:
    return {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _fmt(v, digits=4):
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _seeds_text(f: dict) -> str:
    return str(len(f["seeds"])) if f.get("seeds") else "1"


def comparison_lines(comps: list[dict]) -> list[str]:
    """The paired-bootstrap tables of a report: CRPS, then (when there are any) MASE."""
    if not comps:
        return []

    def table(metric: str) -> list[str]:
        rows = []
        for c in comps:
            if c.get("metric", "crps") != metric:
                continue
            word = {"a": f"{c['a']} lower", "b": f"{c['b']} lower", "tie": "tie"}[c["verdict"]]
            rows.append(f"| {c['role']} | {c['a']} | {c['b']} | {c['crps_a']:.4f} | {c['crps_b']:.4f} | "
                        f"{c['diff']:+.4f} [{c['diff_ci'][0]:+.4f}, {c['diff_ci'][1]:+.4f}] | "
                        f"{c['ratio']:.3f} [{c['ratio_ci'][0]:.3f}, {c['ratio_ci'][1]:.3f}] | {word} |")
        name = metric.upper()
        head = [f"| comparison | a | b | {name} a | {name} b | a - b [CI] | a / b [CI] | verdict |",
                "|---|---|---|---|---|---|---|---|"]
        return head + rows if rows else []

    c0 = comps[0]
    lines = ["", f"Paired bootstrap of CRPS over the test windows ({c0['resamples']} resamples of {c0['blocks']} "
             f"blocks of windows, tsdb arms' scores averaged over their seeds per window first; "
             f"{c0['level']:.0%} percentile intervals). A difference whose interval contains 0 is a tie.", "",
             *table("crps")]
    mase = table("mase")
    if mase:
        lines += ["", "The same for the mean per-window MASE (every window weighs 1):", "", *mase]
    return lines


def write_report(spec: ExperimentSpec, results: dict, out: Path) -> Path:
    """``report.md`` with the results table (seed means and spread), ratios to the e2e arm,
    function evaluations, the paired bootstrap, anchors and plots. Renders results.json of
    schema 1 (one seed, no window scores) too."""
    arms = results["arms"]
    e2e = arms.get("e2e", {})
    seeded = any(f.get("seeds") for f in arms.values())
    lines = [f"# {spec.name}", "",
             f"Produced by: `{results.get('command') or _default_command(spec)}`", "",
             f"Task: `{spec.task.protocol}` on `{spec.task.dataset}`, {results['task']['num_windows']} test windows. "
             f"Machine: {results['machine']['platform']}, torch {results['machine']['torch']}, "
             f"{results['machine']['threads']} threads, GPU: {results['machine']['cuda'] or 'none'}."
             + (f" Wall time of the run: {results['wall_seconds'] / 60:.1f} min (arms reused from an earlier "
                "run cost ~0)." if results.get("wall_seconds") else ""), "",
             "Point forecasts: MASE and MAE use the sample median, MSE the sample mean; CRPS is the mean "
             "weighted quantile loss over q = 0.1..0.9 (gluonts.ev). Seasonal naive is a point forecast "
             "(all samples equal), so its CRPS is its point-forecast quantile loss. Train-state bytes are "
             "exact (params + grads + AdamW state + saved activations, measured by MemoryMeter on the first real training steps of the largest unit); "
             "peak RSS is the process high-water mark after the arm's training, reset before it, and "
             "includes heap the process kept from earlier arms, so compare arms by the exact bytes."]
    if spec.selection:
        lines += ["", f"Settings: {spec.selection}"]
    missing = spec.unrun(results)
    if missing:
        lines += ["", f"Arms of the spec not in this run (not selected by `--arms`): {', '.join(missing)}."]
    if seeded:
        lines += ["", "Seeds: every figure of an arm run with several seeds is the mean over its seeds (a seed sets "
                  "the model's initialisation and the training windows and noise); CRPS and MASE show mean ± std "
                  "(sample std), the CRPS range is min-max over seeds, and CRPS / e2e is the ratio of means with "
                  "the range of per-seed ratios (seed s against e2e's seed s). Deterministic peers run once. "
                  "K, NFE, layers: inference steps, denoiser calls per forecast (a Heun step counts 2 except the "
                  "last) and transformer layers those calls run per sample, counted during one forecast."]
        most = max(len(g.get("seeds") or []) for g in arms.values())
        short = [f"{n} ({len(f.get('seeds') or []) or 1})" for n, f in arms.items()
                 if f.get("stochastic") and len(f.get("seeds") or []) < most]
        if short:
            lines += ["", "Stochastic peers run with fewer seeds than the tsdb arms (to fit the CPU budget; the "
                      f"spec fixes their seed or lists fewer peer_seeds): {', '.join(short)}."]
    lines += ["", "| arm | seeds | CRPS | CRPS range | MASE | MSE | MAE | CRPS / e2e | K, NFE, layers | train s | "
                  "train-state MiB | saved act. MiB | e2e / arm state | peak RSS MiB | params |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    mib = lambda b: None if b is None else b / 2**20  # noqa: E731
    for name, f in arms.items():
        mem_ratio = (e2e["train_state_bytes"] / f["train_state_bytes"]
                     if e2e.get("train_state_bytes") and f.get("train_state_bytes") else None)
        evals = (f"{f.get('num_steps')}, {f['nfe']}, {f['layer_passes']}" if "nfe" in f else
                 _fmt(f.get("num_steps")))
        label = name + (f" ({spec.labels[name]})" if name in spec.labels else "")
        lines.append("| " + " | ".join([
            label, _seeds_text(f), mean_std_text(f, "crps", 4), min_max_text(f, "crps", 4), mean_std_text(f, "mase", 3),
            _fmt(f["mse"], 3), _fmt(f["mae"], 3), ratio_text(*crps_ratio(f, e2e)), evals,
            _fmt(f.get("train_seconds"), 1), _fmt(mib(f.get("train_state_bytes")), 2),
            _fmt(mib(f.get("saved_activation_bytes")), 2), _fmt(mem_ratio, 2),
            _fmt(mib(f.get("peak_rss_bytes")), 0), _fmt(f.get("params"))]) + " |")
    matched = {n: f for n, f in arms.items() if f.get("matched_params")}
    for n, f in matched.items():
        m = f["matched_params"]
        lines += ["", f"`{n}` is sized to `{m['reference']}`'s parameter count: {f['params']} parameters "
                  f"({f.get('n_layers')} layers, d_model {f.get('d_model')}) against {m['reference_params']} "
                  f"({(f['params'] / m['reference_params'] - 1) * 100:+.1f}%)."]
    comps = results.get("comparisons")
    if comps is None:
        comps = comparisons(results, spec.bootstrap_resamples, spec.chosen)
    lines += comparison_lines(comps)
    budgets = {n: f for n, f in arms.items() if "budget" in f}
    if budgets:
        lines += ["", "Peer budgets (each peer's own settings; seconds are wall time of fit + predict on this "
                  "machine, CPU seconds include worker processes):", ""]
        for n, f in budgets.items():
            settings = ", ".join(f"{k} {v}" for k, v in f["budget"].items()
                                 if k not in ("val_mse_by_alpha", "alphas_tried", "seed") and v not in (None, {}, []))
            lines.append(f"- {n} ({f['library']}): {settings}; {_fmt(f['fit_predict_seconds'], 0)} s, "
                         f"{_fmt(f['cpu_seconds'], 0)} CPU s")
    if spec.anchors:
        lines += ["", "Published reference numbers (cited from shared/benchmarks.md, not measured here):", "",
                  "| system | " + " | ".join(next(iter(spec.anchors.values())).keys()) + " |",
                  "|---|" + "---|" * len(next(iter(spec.anchors.values())))]
        for sys_name, vals in spec.anchors.items():
            lines.append(f"| {sys_name} | " + " | ".join(_fmt(v) for v in vals.values()) + " |")
    sweeps = {n: f["crps_by_steps"] for n, f in arms.items() if "crps_by_steps" in f}
    if sweeps:
        lines += ["", "CRPS against inference steps K (NFE in brackets; mean over the seeds that ran the sweep):", ""]
        for n, d in sweeps.items():
            nfe = arms[n].get("nfe_by_steps") or {}
            lines.append(f"- {n}: " + ", ".join(f"K={k}" + (f" ({nfe[k]})" if k in nfe else "") + f": {v:.4f}"
                                               for k, v in d.items()))
        plots.line_chart({n: ([int(k) for k in d], list(d.values())) for n, d in sweeps.items()},
                         out / "crps_vs_steps.png", "inference steps K", "CRPS", spec.name, logx=True)
        lines += ["", "![CRPS vs K](crps_vs_steps.png)"]
    mem_sweeps = {n: f["saved_activation_bytes_by_iters"] for n, f in arms.items()
                  if "saved_activation_bytes_by_iters" in f}
    if mem_sweeps:
        lines += ["", "Saved-activation MiB of one training step against training iterations K "
                  "(a fresh model, same batch):", ""]
        for n, d in mem_sweeps.items():
            lines.append(f"- {n}: " + ", ".join(f"K={k}: {v / 2**20:.2f}" for k, v in d.items()))
    depth_by_b = {int(n.split("-b")[1]): f["crps"] for n, f in arms.items()
                  if n.startswith("depth-b") and n.split("-b")[1].isdigit()}
    if depth_by_b and e2e.get("crps"):
        depth_by_b[1] = e2e["crps"]  # B = 1 is the e2e arm
        xs = sorted(depth_by_b)
        plots.line_chart({"depth (equiprob, gamma 0.05)": (xs, [depth_by_b[b] for b in xs])},
                         out / "crps_vs_blocks.png", "blocks B (B = 1 is e2e)", "CRPS", spec.name)
        lines += ["", "![CRPS vs B](crps_vs_blocks.png)"]
    ranges = {n: (f["spread"]["crps"]["min"], f["spread"]["crps"]["max"]) for n, f in arms.items()
              if (f.get("spread") or {}).get("crps", {}).get("n", 0) > 1}
    plots.bar_chart({n: f["crps"] for n, f in arms.items()}, out / "crps.png",
                    "CRPS (lower is better)" + (", whiskers: min-max over seeds" if ranges else ""),
                    spec.name, reference=e2e.get("crps"), reference_label="e2e", ranges=ranges)
    ours = {n: f["train_state_bytes"] / 2**20 for n, f in arms.items() if f.get("train_state_bytes")}
    if ours:
        plots.bar_chart(ours, out / "memory.png", "training-state MiB (one step)", spec.name,
                        reference=ours.get("e2e"), reference_label="e2e")
        lines += ["", "![CRPS per arm](crps.png) ![memory per arm](memory.png)"]
    lines += ["", "Figures are written by `tsdb.bench.experiment.write_report` from `results.json` in this folder."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _default_command(spec: ExperimentSpec) -> str:
    name, _, tier = spec.name.rpartition("-")
    if tier not in ("quick", "full"):   # a program's spec (e.g. covariates): its name is the command's
        return f"tsdb bench {spec.name}"
    if name.startswith("ablation-"):
        return f"tsdb ablate --config configs/ablation/{name.removeprefix('ablation-')}-{tier}.yaml"
    return f"tsdb bench {name} --tier {tier}"
