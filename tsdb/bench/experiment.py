"""Side-by-side experiments: train and evaluate a set of arms on one protocol.

Used by ``tsdb bench`` (fixed arm set per benchmark and tier) and ``tsdb ablate`` (a grid of
split strategies). Every arm sees the same data, seed and per-block step budget; results
go to ``OUT/results.json`` as ``{"arms": {name: figures}}`` and ``OUT/report.md``. A
finished arm (``OUT/arms/<name>/metrics.json``) is not retrained.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

import tsdb.evaluation.plots as plots
from tsdb.evaluation.baselines import fit_deepar, seasonal_naive
from tsdb.evaluation.peers import PeerSpec, run_peer
from tsdb.config import ExperimentConfig, _Strict
from tsdb.data.registry import load_dataset
from tsdb.evaluation.tasks import EvalTask, etth1_task, evaluate_predictor, m4_hourly_task, rolling_protocol_task
from tsdb.training.memory import peak_rss_bytes, reset_peak_rss
from tsdb.strategies import get_strategy
from tsdb.training.loop import train_model


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
    # extra inference-time evaluations: {arm: [K, ...]} -> figures "crps_k" per K
    steps_sweep: dict[str, list[int]] = Field(default_factory=dict)
    anchors: dict[str, dict[str, float | None]] = Field(default_factory=dict)  # published numbers, cited
    # memory-only sweep: {arm: [K, ...]} -> training-state bytes of one step with loop_iters = K
    memory_sweep: dict[str, list[int]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _names_unique(self):
        clash = (set(self.baselines) | set(self.arms)) & set(self.peers) | set(self.baselines) & set(self.arms)
        if clash:
            raise ValueError(f"arm names used twice (baselines, peers, arms): {sorted(clash)}")
        return self

    def arm_config(self, name: str) -> ExperimentConfig:
        return self.base.with_overrides(**self.arms[name])


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


def run_arm(spec: ExperimentSpec, name: str, task: EvalTask, out: Path) -> dict:
    """Train (resumably) and evaluate one of our arms; figures for results.json."""
    cfg = spec.arm_config(name)
    strategy = get_strategy(cfg.model)
    reset_peak_rss()
    model, summary = train_model(cfg, task.train, out / "arms" / name / "run", strategy=strategy)
    figures = {k: summary[k] for k in ("train_seconds", "train_state_bytes", "saved_activation_bytes", "params")}
    figures["peak_rss_bytes"] = peak_rss_bytes()
    model.eval()
    metrics = evaluate_predictor(task, torch_predictor(strategy, model, seed=cfg.train.seed),
                                 cfg.model.context_length, spec.num_samples,
                                 num_covariates=cfg.model.num_covariates)
    figures.update(metrics)
    figures["arm"] = strategy.arm_name()
    figures["num_steps"] = cfg.model.inference_steps
    for k in spec.steps_sweep.get(name, []):
        m = evaluate_predictor(task, torch_predictor(strategy, model, num_steps=k, seed=cfg.train.seed),
                               cfg.model.context_length, spec.num_samples, num_covariates=cfg.model.num_covariates)
        figures.setdefault("crps_by_steps", {})[str(k)] = m["crps"]
    if name in spec.memory_sweep:
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
        windows = TrainingWindows(task.train, cfg.model.context_length, cfg.model.horizon, seed=cfg.train.seed,
                                  covariates=cfg.model.num_covariates)
        batch = next(iter(torch.utils.data.DataLoader(windows, batch_size=cfg.train.batch_size)))
        strategy = get_strategy(cfg.model)
        unit = strategy.units(strategy.build())[0]
        stats = measure_training_step(unit.module, lambda: unit.loss(batch), lambda p: make_optimizer(p, cfg.train))
        out[str(k)] = stats["saved_activation_bytes"]
    return out


def run_baseline(spec: ExperimentSpec, name: str, task: EvalTask) -> dict:
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
                     batch_size=spec.deepar.batch_size, seed=spec.base.train.seed)
    figures = arm.evaluate(task, spec.num_samples)
    figures["peak_rss_bytes"] = peak_rss_bytes()
    figures["params"] = sum(p.numel() for p in arm.predictor.prediction_net.parameters())
    return figures


def run_experiment(spec: ExperimentSpec, out: str | Path, root: str | None = None,
                   only: list[str] | None = None, log=print, command: str | None = None) -> dict:
    """Run every baseline and arm of ``spec`` into ``out``; returns the results dict."""
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    task = build_task(spec.task, root)
    log(f"[{spec.name}] task {task.name}: {task.num_windows} windows, horizon {task.horizon}, "
        f"{len(task.train)} training series")
    results = {"name": spec.name, "task": {**spec.task.model_dump(), "num_windows": task.num_windows},
               "machine": _machine(), "arms": {}}
    names = [*spec.baselines, *spec.peers, *spec.arms]
    for name in names:
        if only and name not in only:
            continue
        path = out / "arms" / name / "metrics.json"
        if path.exists():
            results["arms"][name] = json.loads(path.read_text())
            log(f"[{spec.name}] {name}: done earlier, reusing {path}")
            continue
        log(f"[{spec.name}] {name}: training and evaluating")
        if name in spec.baselines:
            figures = run_baseline(spec, name, task)
        elif name in spec.peers:
            figures = run_peer(spec.peers[name], task, spec.base.model.context_length, spec.base.train.seed,
                               spec.num_samples)
        else:
            figures = run_arm(spec, name, task, out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=2))
        results["arms"][name] = figures
        log(f"[{spec.name}] {name}: CRPS {figures['crps']:.4f}  MASE {figures['mase']:.3f}  "
            f"train {figures.get('train_seconds', 0):.0f}s")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    results["command"] = command or _default_command(spec)
    results["wall_seconds"] = time.perf_counter() - started  # this invocation (reused arms cost ~0)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(spec, results, out)
    return results


def _machine() -> dict:
    return {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _fmt(v, digits=4):
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def write_report(spec: ExperimentSpec, results: dict, out: Path) -> Path:
    """``report.md`` with the results table, ratios to the e2e arm, anchors and plots."""
    arms = results["arms"]
    e2e = arms.get("e2e", {})
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
             "exact (params + grads + AdamW state + saved activations of one step of the largest unit); "
             "peak RSS is the process high-water mark after the arm's training, reset before it, and "
             "includes heap the process kept from earlier arms, so compare arms by the exact bytes.", "",
             "| arm | CRPS | MASE | MSE | MAE | CRPS / e2e | train s | train-state MiB | saved act. MiB | e2e / arm state | peak RSS MiB | params |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    mib = lambda b: None if b is None else b / 2**20  # noqa: E731
    for name, f in arms.items():
        ratio = f["crps"] / e2e["crps"] if e2e.get("crps") else None
        mem_ratio = (e2e["train_state_bytes"] / f["train_state_bytes"]
                     if e2e.get("train_state_bytes") and f.get("train_state_bytes") else None)
        lines.append("| " + " | ".join([
            name, _fmt(f["crps"]), _fmt(f["mase"], 3), _fmt(f["mse"], 3), _fmt(f["mae"], 3), _fmt(ratio, 3),
            _fmt(f.get("train_seconds"), 1), _fmt(mib(f.get("train_state_bytes")), 2),
            _fmt(mib(f.get("saved_activation_bytes")), 2), _fmt(mem_ratio, 2),
            _fmt(mib(f.get("peak_rss_bytes")), 0), _fmt(f.get("params"))]) + " |")
    budgets = {n: f for n, f in arms.items() if "budget" in f}
    if budgets:
        lines += ["", "Peer budgets (each peer's own settings; seconds are wall time of fit + predict on this "
                  "machine, CPU seconds include worker processes):", ""]
        for n, f in budgets.items():
            settings = ", ".join(f"{k} {v}" for k, v in f["budget"].items()
                                 if k not in ("val_mse_by_alpha", "alphas_tried") and v not in (None, {}, []))
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
        lines += ["", "CRPS against inference steps K:", ""]
        for n, d in sweeps.items():
            lines.append(f"- {n}: " + ", ".join(f"K={k}: {v:.4f}" for k, v in d.items()))
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
    plots.bar_chart({n: f["crps"] for n, f in arms.items()}, out / "crps.png", "CRPS (lower is better)",
                    spec.name, reference=e2e.get("crps"), reference_label="e2e")
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
    if name.startswith("ablation-"):
        return f"tsdb ablate --config configs/ablation/{name.removeprefix('ablation-')}-{tier}.yaml"
    return f"tsdb bench {name} --tier {tier}"
