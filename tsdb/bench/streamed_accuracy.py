"""``tsdb bench streamed-accuracy``: streamed forecasts scored against cold ``strategy.forecast``
at the same forecast origins, per normalisation refresh policy.

For each dataset of the config (M4 Hourly and ETTh1 by default) and each strategy (depth,
horizon, looped), a small model is trained on the protocol's training split (one seed:
the comparison is streamed against cold forecasts of the same model), exported, and
served by the torch-free runtime (``tsdb_streaming.StreamingForecaster``, what ``tsdb
stream`` runs). Every series is initialised with its history up to the start of the
streamed period, then receives the period one value per ``update``; at each forecast
origin the runtime's forecast is kept. The cold forecast is ``strategy.forecast`` on the
last ``context_length`` values before the same origin (the path ``tsdb bench`` evaluates),
with the same standard-normal noise where the two samplers take the same noise (depth,
looped), so the difference measures the streaming state, not Monte-Carlo noise. Both are
scored by ``EvalTask.evaluate`` (gluonts.ev) on the protocol's windows; the ratio of
streamed to cold CRPS gets a paired bootstrap interval over the windows.

What can make a streamed forecast differ from the cold one:

- normalisation: the runtime freezes each series' loc/scale when it (re)initialises the
  series (its cached keys/values are computed with them); the cold path normalises every
  context afresh. The refresh policies trade update cost for fresher statistics;
- receptive field: the cache's deeper layers attend over a sliding window, so they see
  values older than the last ``context_length`` (a cold forecast never does);
- the unfinished patch: between patch boundaries the stream forecasts from a partial token
  (the models train with ``partial_patch_prob`` > 0); the cold context is cut at the origin
  into whole patches.

A per-dataset check re-initialises every series from exactly its last ``context_length``
values at the first origin: the runtime must then reproduce the cold samples (parity).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from tsdb.bench.experiment import TaskSpec, build_task, _machine
from tsdb.bench.stats import paired_bootstrap
from tsdb.config import ExperimentConfig, _Strict, packaged
from tsdb.data.registry import load_dataset
from tsdb.errors import TsdbError
from tsdb.evaluation import plots
from tsdb.evaluation.tasks import ETT_VAL_END, EvalTask
from tsdb.strategies import get_strategy
from tsdb.training.loop import train_model

CONFIG = packaged("configs", "bench", "streamed_accuracy.yaml")
COMMAND = "tsdb bench streamed-accuracy"


class StreamTask(_Strict):
    task: TaskSpec
    stream: int | None = None   # m4-hourly: values streamed before the test origin
    model: dict[str, Any] = Field(default_factory=dict)  # the protocol's shape (context, horizon)


class Policy(_Strict):
    """A runtime refresh policy: ``StreamingForecaster(refresh=..., refresh_every=...)``, plus
    ``at_forecast``: ``refresh_series`` right before each forecast."""

    refresh: Literal["warmup", "none"] = "warmup"
    refresh_every: int | Literal["context", "patch"] | None = None
    at_forecast: bool = False

    def every(self, cfg) -> int | None:
        return {"context": cfg.context_length, "patch": cfg.patch_length}.get(self.refresh_every, self.refresh_every)


class StreamedAccuracySpec(_Strict):
    name: str = "streamed-accuracy"
    num_samples: int = 100
    seed: int = 0
    datasets: dict[str, StreamTask]
    base: ExperimentConfig = ExperimentConfig()
    strategies: dict[str, dict[str, dict[str, Any]]]
    policies: dict[str, Policy]

    def config(self, dataset: str, strategy: str) -> ExperimentConfig:
        over = self.strategies[strategy]
        return self.base.with_overrides(**{**over, "model": {**self.datasets[dataset].model, **over.get("model", {})}})


@dataclass
class Stream:
    """Per series: the history a stream is initialised with and the values it then receives
    (one at a time); forecasts are made after ``offsets[k]`` streamed values. Window
    ``i * len(offsets) + k`` of ``task`` is series ``i`` at origin ``k``."""

    ids: list
    history: list[np.ndarray]
    values: np.ndarray
    offsets: list[int]
    task: EvalTask


def build_stream(spec: StreamTask, root: str | None = None) -> Stream:
    task = build_task(spec.task, root)
    if spec.task.protocol == "m4-hourly":
        n = spec.stream or 0
        short = [s.item_id for s in task.train if len(s) <= n]
        if n < 1 or short:
            raise TsdbError(f"m4-hourly stream: {n} values to stream needs every training series longer "
                            f"(shortest: {short[:1]})")
        history = [s.target[:len(s) - n] for s in task.train]
        values = np.stack([s.target[len(s) - n:] for s in task.train])
        stream = Stream([s.item_id for s in task.train], history, values, [n], task)
    elif spec.task.protocol == "etth1":
        raw = load_dataset(spec.task.dataset, root)
        per_series = task.num_windows // len(raw)
        first, lookback, stride = ETT_VAL_END, spec.task.lookback, spec.task.stride
        scaled = [task.scaler.transform(s.target[:first + (per_series - 1) * stride], i) for i, s in enumerate(raw)]
        stream = Stream([s.item_id for s in raw], [x[first - lookback:first] for x in scaled],
                        np.stack([x[first:] for x in scaled]), [k * stride for k in range(per_series)], task)
    else:
        raise TsdbError(f"streamed-accuracy supports the m4-hourly and etth1 protocols, not {spec.task.protocol!r}")
    # the stream up to each origin ends with exactly the window's input (what the cold path reads)
    contexts = task.contexts(64)
    for i in range(len(stream.ids)):
        for k, off in enumerate(stream.offsets):
            seen = np.concatenate([stream.history[i], stream.values[i, :off]])[-64:]
            if not np.array_equal(seen, contexts[i * len(stream.offsets) + k], equal_nan=True):
                raise AssertionError(f"stream of {stream.ids[i]} does not match window {k} of {task.name}")
    return stream


def _noise(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def cold_forecasts(strategy, model, task: EvalTask, noise: np.ndarray | None, num_samples: int,
                   rng: np.random.Generator, batch: int = 128) -> np.ndarray:
    """``strategy.forecast`` on every window's last ``context_length`` values; ``noise [N, S, H]``
    where the strategy's sampler takes it as the stream's does (else drawn from ``rng``)."""
    contexts = task.contexts(strategy.cfg.context_length)
    out = []
    for a in range(0, len(contexts), batch):
        ctx = torch.from_numpy(contexts[a:a + batch])
        eps = None if noise is None else torch.from_numpy(noise[a:a + batch])
        with torch.inference_mode():
            out.append(strategy.forecast(model, ctx, num_samples, noise=eps,
                                         generator=torch.Generator().manual_seed(int(rng.integers(1 << 31)))).numpy())
    return np.concatenate(out)


def streamed_forecasts(model_dir: Path, stream: Stream, policy: Policy, cfg, num_samples: int, seed: int,
                       noise: np.ndarray | None) -> tuple[np.ndarray, dict]:
    """Stream every series through the runtime with ``policy``; the samples at each origin
    ``[N, S, H]`` (window order) and the cost: refreshes and seconds spent in updates."""
    from tsdb_streaming import StreamingForecaster
    from tsdb_streaming.core import refresh_due

    every = policy.every(cfg)
    f = StreamingForecaster(model_dir, refresh=policy.refresh, refresh_every=every, num_samples=num_samples,
                            seed=seed)
    n, m = len(stream.ids), len(stream.offsets)
    out = np.empty((n, m, num_samples, cfg.horizon), np.float32)
    counts = np.array([len(h) for h in stream.history])
    refreshes = int(sum(refresh_due(policy.refresh, every, cfg.context_length, 0, int(c)) for c in counts))
    t0 = time.perf_counter()
    f.update(stream.ids, stream.history)
    update_seconds, t = time.perf_counter() - t0, 0
    for k, off in enumerate(stream.offsets):
        t0 = time.perf_counter()
        while t < off:
            f.update(stream.ids, stream.values[:, t])
            refreshes += sum(refresh_due(policy.refresh, every, cfg.context_length, int(c) + t, int(c) + t + 1)
                             for c in counts)
            t += 1
        if policy.at_forecast:
            f.refresh_series(stream.ids)
            refreshes += n
        update_seconds += time.perf_counter() - t0
        eps = None if noise is None else noise[np.arange(n) * m + k]
        out[:, k] = f.forecast(stream.ids, noise=eps, quantiles=()).samples
    return out.reshape(n * m, num_samples, cfg.horizon), {
        "refreshes_per_series": refreshes / n, "update_seconds": update_seconds,
        "values_streamed": int(stream.values.shape[1] if m else 0)}


def parity_at_first_origin(model_dir: Path, stream: Stream, cfg, cold: np.ndarray, noise: np.ndarray,
                           num_samples: int) -> float:
    """Max |runtime - cold| / scale when the runtime starts each series from exactly its last
    ``context_length`` values at the first origin (the two must agree)."""
    from tsdb_streaming import StreamingForecaster

    f = StreamingForecaster(model_dir, refresh="none", num_samples=num_samples)
    m, off = len(stream.offsets), stream.offsets[0]
    contexts = [np.concatenate([h, v[:off]])[-cfg.context_length:] for h, v in zip(stream.history, stream.values)]
    f.update(stream.ids, contexts)
    rows = np.arange(len(stream.ids)) * m
    samples = f.forecast(stream.ids, noise=noise[rows], quantiles=()).samples
    scale = np.array([np.nanstd(c) or 1.0 for c in contexts])[:, None, None]
    return float(np.max(np.abs(samples - cold[rows]) / scale))


def run_streamed_accuracy(out: str | Path = "reports/streamed-accuracy", spec: StreamedAccuracySpec | None = None,
                          work: str | Path = "runs/streamed-accuracy", root: str | None = None,
                          progress: bool = False, log=print) -> dict:
    """Train (resumably), export and stream every (dataset, strategy) pair under every policy;
    writes ``out/results.json``, ``out/report.md`` and a plot."""
    spec = spec or StreamedAccuracySpec.from_yaml(CONFIG)
    out, work = Path(out), Path(work)
    out.mkdir(parents=True, exist_ok=True)
    started, cpu0 = time.perf_counter(), time.process_time()
    results = {"benchmark": "streamed-accuracy", "name": spec.name, "command": COMMAND, "machine": _machine(),
               "spec": spec.model_dump(mode="json"), "rows": []}
    for ds_name, ds in spec.datasets.items():
        stream = build_stream(ds, root)
        stream.task.window_scores = True
        log(f"[{spec.name}] {ds_name}: {len(stream.ids)} series, {len(stream.offsets)} origin(s), "
            f"{stream.values.shape[1]} values streamed, {stream.task.num_windows} windows")
        for st_name in spec.strategies:
            cfg = spec.config(ds_name, st_name)
            cfg.train.progress = progress
            strategy = get_strategy(cfg.model)
            run_dir = work / f"{ds_name}-{st_name}"
            model, summary = train_model(cfg, stream.task.train, run_dir / "run", strategy=strategy)
            model.eval()
            model_dir = run_dir / "onnx"
            meta = model_dir / "tsdb_model.json"
            if not meta.exists() or meta.stat().st_mtime < (run_dir / "run" / "model.pt").stat().st_mtime:
                strategy.streaming().export(model, model_dir)
            rng = np.random.default_rng(spec.seed)
            noise = (_noise(rng, (stream.task.num_windows, spec.num_samples, cfg.model.horizon))
                     if strategy.streaming().same_forecast_noise else None)
            t0 = time.perf_counter()
            cold = cold_forecasts(strategy, model, stream.task, noise, spec.num_samples, rng)
            cold_seconds = time.perf_counter() - t0
            cold_metrics = stream.task.evaluate(cold)
            row = {"dataset": ds_name, "strategy": st_name, "arm": strategy.arm_name(),
                   "params": summary["params"], "train_seconds": summary["train_seconds"],
                   "steps_per_block": cfg.train.steps_per_block, "windows": stream.task.num_windows,
                   "cold": _figures(cold_metrics), "cold_seconds": cold_seconds, "same_noise": noise is not None,
                   "policies": {}}
            if noise is not None:
                row["parity_reinit_vs_cold"] = parity_at_first_origin(model_dir, stream, cfg.model, cold, noise,
                                                                      spec.num_samples)
            log(f"[{spec.name}] {ds_name} {st_name}: cold CRPS {row['cold']['crps']:.4f} "
                f"MASE {row['cold']['mase']:.3f} (train {summary['train_seconds']:.0f}s)")
            for p_name, policy in spec.policies.items():
                samples, cost = streamed_forecasts(model_dir, stream, policy, cfg.model, spec.num_samples,
                                                   spec.seed, noise)
                metrics = stream.task.evaluate(samples)
                boot = paired_bootstrap(metrics["window_scores"]["crps_num"], cold_metrics["window_scores"]["crps_num"],
                                        cold_metrics["window_scores"]["abs_target"],
                                        _blocks(stream), seed=spec.seed)
                row["policies"][p_name] = {**_figures(metrics), **cost, "crps_ratio": boot["ratio"],
                                           "crps_ratio_ci": boot["ratio_ci"], "verdict": boot["verdict"]}
                log(f"[{spec.name}] {ds_name} {st_name} {p_name}: CRPS {metrics['crps']:.4f} "
                    f"({boot['ratio']:.3f} of cold), {cost['refreshes_per_series']:.0f} refreshes per series")
            results["rows"].append(row)
            _save(results, spec, out, started, cpu0)
    results["choice"] = choose_policy(results)
    _save(results, spec, out, started, cpu0)
    return results


def _blocks(stream: Stream) -> list[int]:
    """Bootstrap blocks: a series' windows whose horizons overlap resample together."""
    from tsdb.bench.stats import bootstrap_blocks
    items = [i for i in stream.ids for _ in stream.offsets]
    stride = stream.offsets[1] - stream.offsets[0] if len(stream.offsets) > 1 else None
    return bootstrap_blocks(items, stream.task.horizon, stride)


def _figures(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("crps", "mase", "mse", "mae", "coverage80")}


def choose_policy(results: dict, target: float = 1.02) -> dict:
    """The cheapest policy (fewest refreshes) whose streamed CRPS is within ``target`` of cold
    for depth on every dataset; else the one with the smallest worst ratio."""
    depth = [r for r in results["rows"] if r["strategy"] == "depth"]
    if not depth:
        return {}
    names = list(depth[0]["policies"])
    worst = {p: max(r["policies"][p]["crps_ratio"] for r in depth) for p in names}
    cost = {p: sum(r["policies"][p]["refreshes_per_series"] for r in depth) for p in names}
    ok = [p for p in names if worst[p] <= target]
    pick = min(ok, key=lambda p: (cost[p], worst[p])) if ok else min(names, key=lambda p: worst[p])
    return {"policy": pick, "meets_target": bool(ok), "target": target, "worst_ratio": worst, "refreshes": cost}


def _save(results: dict, spec: StreamedAccuracySpec, out: Path, started: float, cpu0: float) -> None:
    results["wall_seconds"] = time.perf_counter() - started
    results["cpu_seconds"] = time.process_time() - cpu0
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, out)


def write_report(results: dict, out: Path) -> Path:
    spec = StreamedAccuracySpec.model_validate(results["spec"])
    base = spec.base
    lines = [f"# {results['name']}: streamed against cold forecasts", "",
             f"Produced by: `{results['command']}` (config `configs/bench/streamed_accuracy.yaml`). "
             f"Machine: {results['machine']['platform']}, torch {results['machine']['torch']}, "
             f"{results['machine']['threads']} thread(s); {results['wall_seconds'] / 60:.1f} min wall, "
             f"{results['cpu_seconds'] / 60:.1f} CPU min of this process.", "",
             f"Models: d_model {base.model.d_model}, {base.model.n_layers} layers, B = {base.model.n_blocks}, "
             f"patch {base.model.patch_length}, {base.train.steps_per_block} steps per block (batch "
             f"{base.train.batch_size}), partial-patch windows {base.model.partial_patch_prob}, trained on each "
             f"protocol's training split, **one seed** ({spec.seed}): the comparison is the same model streamed "
             f"and cold, not a claim about the strategies' accuracy. {spec.num_samples} samples per forecast; "
             "depth and looped use the same noise for both paths (horizon's sampler takes its noise in another "
             "layout, so its two paths draw independently).", "",
             "Streamed: the torch-free runtime (`tsdb_streaming`, what `tsdb stream` serves), each series "
             "initialised with its history, then one value per update; cold: `strategy.forecast` on the last "
             "`context_length` values at the same origin. CRPS ratio = streamed / cold with a 95% paired "
             "bootstrap interval over windows; refreshes: re-initialisations per series over the stream.", ""]
    for ds in spec.datasets:
        rows = [r for r in results["rows"] if r["dataset"] == ds]
        if not rows:
            continue
        task = spec.datasets[ds]
        where = (f"initialised {task.stream} values before the test origin, one origin per series"
                 if task.task.protocol == "m4-hourly" else
                 f"initialised with the {task.task.lookback} rows before the test period, a forecast every "
                 f"{task.task.stride} rows")
        lines += [f"## {ds} ({rows[0]['windows']} windows; {where})", "",
                  "| strategy | policy | CRPS | CRPS streamed / cold [95% CI] | MASE | refreshes per series | "
                  "update s |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['arm']} | cold | {r['cold']['crps']:.4f} | 1 | {r['cold']['mase']:.3f} | | |")
            for p, f in r["policies"].items():
                lines.append(f"| {r['arm']} | {p} | {f['crps']:.4f} | **{f['crps_ratio']:.3f}** "
                             f"[{f['crps_ratio_ci'][0]:.3f}, {f['crps_ratio_ci'][1]:.3f}] | {f['mase']:.3f} | "
                             f"{f['refreshes_per_series']:.0f} | {f['update_seconds']:.1f} |")
        checks = [f"{r['arm']} {r['parity_reinit_vs_cold']:.1e}" for r in rows if "parity_reinit_vs_cold" in r]
        if checks:
            lines += ["", "Check: each series re-initialised from exactly its last `context_length` values at the "
                      "first origin, the runtime's samples against cold (max |difference| / scale): "
                      + ", ".join(checks) + "."]
        lines.append("")
    choice = results.get("choice")
    if choice:
        ok = "meets" if choice["meets_target"] else "misses"
        lines += ["## Choice", "",
                  f"Policy **{choice['policy']}**: the cheapest whose depth CRPS is within "
                  f"{(choice['target'] - 1) * 100:.0f}% of cold on every dataset (worst ratio "
                  f"{choice['worst_ratio'][choice['policy']]:.3f}; it {ok} the target). Worst depth ratio per "
                  "policy: " + ", ".join(f"{p} {v:.3f}" for p, v in choice["worst_ratio"].items()) + "."]
    if (out / "streamed_vs_cold.png").exists() or results["rows"]:
        _plot(results, out)
        lines += ["", "![streamed / cold CRPS](streamed_vs_cold.png)"]
    lines += ["", "Figures are written by `tsdb.bench.streamed_accuracy` from `results.json` in this folder."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _plot(results: dict, out: Path) -> None:
    values = {f"{r['dataset']}/{r['strategy']}/{p}": f["crps_ratio"] for r in results["rows"]
              for p, f in r["policies"].items()}
    ranges = {f"{r['dataset']}/{r['strategy']}/{p}": tuple(f["crps_ratio_ci"]) for r in results["rows"]
              for p, f in r["policies"].items()}
    plots.bar_chart(values, out / "streamed_vs_cold.png", "CRPS streamed / cold (95% CI)", results["name"],
                    reference=1.0, reference_label="cold", ranges=ranges)
