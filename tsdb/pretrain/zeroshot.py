"""Zero-shot evaluation of pretrained models on every protocol of the project, with the
GIFT-Eval summary: per dataset CRPS and MASE divided by seasonal naive's, and the geometric
mean of the ratios over datasets.

Protocols (the model's context length is the lookback everywhere):

- ``m4_hourly``: M4 Hourly test window, H = 48, seasonality 24 (protocol A);
- ``etth1_48`` / ``etth1_96``: ETTh1 test split in standardised space at H = 48 (GIFT-Eval's
  short horizon for hourly data) and H = 96 (protocol B; every ``etth1_stride``-th window);
- ``exchange_rate``: H = 30, the last 5 rolling windows (benchmarks.md C);
- ``vic_elec``: the demo protocol, H = 48, the last 28 days as rolling windows.

A horizon beyond the model's is reached by autoregressive rollout of each sample path
(`tsdb.pretrain.pipeline.sample_paths`). Results are cached per arm and protocol under
``RUN/zeroshot/``, so an interrupted evaluation resumes.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from tsdb.errors import TsdbError
from tsdb.evaluation.tasks import EvalTask, evaluate_predictor
from tsdb.pretrain.pipeline import sample_paths

PROTOCOLS = ("m4_hourly", "etth1_48", "etth1_96", "exchange_rate", "vic_elec")


def protocol_task(name: str, context_length: int, etth1_stride: int = 25, root: str | None = None) -> EvalTask:
    """The test windows of protocol ``name`` (see the module doc)."""
    from tsdb.bench.experiment import TaskSpec, build_task

    if name == "m4_hourly":
        return build_task(TaskSpec(protocol="m4-hourly", dataset="m4_hourly"), root)
    if name in ("etth1_48", "etth1_96"):
        return build_task(TaskSpec(protocol="etth1", dataset="etth1", horizon=int(name.split("_")[1]),
                                   lookback=context_length, stride=etth1_stride), root)
    if name == "exchange_rate":
        return build_task(TaskSpec(protocol="rolling", dataset="exchange_rate", horizon=30, windows=5, stride=30), root)
    if name == "vic_elec":   # tsdb.cli.demo's protocol
        return build_task(TaskSpec(protocol="rolling", dataset="vic_elec", horizon=48, windows=28, stride=48), root)
    raise TsdbError(f"unknown zero-shot protocol {name!r}; choose from {', '.join(PROTOCOLS)}")


def seasonal_naive_reference(task: EvalTask, num_samples: int) -> dict:
    """Seasonal naive on ``task``: statsforecast's ``SeasonalNaive`` with its intervals when the
    peers module and statsforecast are installed (``tsdb[peers]``), else tsdb's point-forecast
    seasonal naive, whose CRPS is inflated (ratios to it flatter the model); ``reference``
    says which."""
    try:
        from tsdb.evaluation.peers import statsforecast_peer
        out = statsforecast_peer(task, "seasonal-naive")
        out["reference"] = "statsforecast SeasonalNaive with its intervals (level 20/40/60/80 -> q0.1..0.9)"
        return out
    except ImportError:
        from tsdb.evaluation.baselines import seasonal_naive
        out = evaluate_predictor(task, seasonal_naive(task.season_length, task.horizon),
                                 max(task.season_length, 1), num_samples)
        out["reference"] = ("tsdb.evaluation.baselines.seasonal_naive, a point forecast (no intervals; its CRPS "
                            "is its absolute error, above the interval version's)")
        return out


def zero_shot_predictor(strategy, model, horizon: int, num_steps: int | None = None, seed: int = 0):
    """The `SamplePredictor` of a pretrained model at any ``horizon`` (rollout past the model's)."""
    generator = torch.Generator().manual_seed(seed)

    def predict(contexts: np.ndarray, num_samples: int) -> np.ndarray:
        return sample_paths(strategy, model, contexts, num_samples, horizon, num_steps, generator)

    return predict


def geometric_mean(values: list[float]) -> float:
    return float(math.exp(np.mean(np.log(values)))) if values else float("nan")


def _cached(path: Path, compute) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    wall, cpu = time.perf_counter(), time.process_time()
    out = compute()
    out["eval_wall_seconds"], out["eval_cpu_seconds"] = time.perf_counter() - wall, time.process_time() - cpu
    path.write_text(json.dumps(out, indent=2))
    return out


def evaluate_zero_shot(strategy, model, cfg_model, out_dir: Path, protocols: list[str], summary: list[str],
                       num_samples: int = 100, etth1_stride: int = 25, num_steps: int | None = None,
                       root: str | None = None, log=print) -> dict:
    """Score one model on ``protocols`` beside seasonal naive; cached per protocol in ``out_dir``."""
    context_length = cfg_model.context_length
    per = {}
    for name in protocols:
        task = protocol_task(name, context_length, etth1_stride, root)
        naive = _cached(out_dir.parent / "seasonal-naive" / f"{name}-stride{etth1_stride}.json",
                        lambda: seasonal_naive_reference(task, num_samples))
        ours = _cached(out_dir / f"{name}-stride{etth1_stride}.json", lambda: evaluate_predictor(
            task, zero_shot_predictor(strategy, model, task.horizon, num_steps), context_length, num_samples))
        ours["rollout"] = task.horizon > cfg_model.horizon
        per[name] = {"model": ours, "seasonal_naive": naive, "crps_ratio": ours["crps"] / naive["crps"],
                     "mase_ratio": ours["mase"] / naive["mase"]}
        log(f"[zero-shot] {name}: CRPS {ours['crps']:.4f} (seasonal naive {naive['crps']:.4f}, ratio "
            f"{per[name]['crps_ratio']:.3f}), MASE {ours['mase']:.3f} ({naive['mase']:.3f}), "
            f"{ours['num_windows']} windows")
    in_summary = [n for n in summary if n in per]
    return {"protocols": per, "summary": {
        "datasets": in_summary,
        "crps_ratio_geomean": geometric_mean([per[n]["crps_ratio"] for n in in_summary]),
        "mase_ratio_geomean": geometric_mean([per[n]["mase_ratio"] for n in in_summary]),
        "all_protocols_crps_ratio_geomean": geometric_mean([p["crps_ratio"] for p in per.values()]),
        "all_protocols_mase_ratio_geomean": geometric_mean([p["mase_ratio"] for p in per.values()]),
        "below_seasonal_naive_everywhere": all(p["crps_ratio"] < 1 for p in per.values())}}


def evaluate_pretrained_run(run_dir: str | Path, arms: list[str] | None = None, report_dir: str | Path | None = None,
                            protocols: list[str] | None = None, num_samples: int | None = None,
                            etth1_stride: int | None = None, root: str | None = None, log=print,
                            command: str | None = None, against: str | Path | None = None) -> dict:
    """``tsdb pretrain-eval``: every arm of a pretraining run on the zero-shot protocols.

    Writes ``RUN/zeroshot/results.json``; with ``report_dir`` also ``results.json``,
    ``report.md`` and the first arm's checkpoint (``model/``) there; ``against`` names another
    report of the same config (its other arms) to set memory and zero-shot beside.
    """
    from tsdb.pretrain.checkpoint import as_shipped
    from tsdb.pretrain.train import load_pretrain_config
    from tsdb.training.loop import load_model

    run_dir = Path(run_dir)
    cfg = load_pretrain_config(run_dir)
    z = cfg.zero_shot
    protocols = protocols or z.protocols
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise TsdbError(f"unknown zero-shot protocol {unknown[0]!r}; choose from {', '.join(PROTOCOLS)}")
    num_samples = num_samples or z.num_samples
    stride = etth1_stride or z.etth1_stride
    results = {"run": str(run_dir), "settings": {"protocols": protocols, "summary": z.summary,
                                                 "num_samples": num_samples, "etth1_stride": stride,
                                                 "num_steps": z.num_steps or cfg.model.inference_steps,
                                                 "torch_threads": torch.get_num_threads()},
               "arms": {}}
    for arm in arms or cfg.arms:
        if not (run_dir / arm / "model.pt").exists():
            raise TsdbError(f"{run_dir / arm} has no trained model yet; finish `tsdb pretrain` first")
        arm_cfg, strategy, model = load_model(run_dir / arm)
        as_shipped(model)   # the figures describe the weights a checkpoint ships
        log(f"[zero-shot] {arm}: {sum(p.numel() for p in model.parameters()):,} parameters")
        results["arms"][arm] = evaluate_zero_shot(strategy, model, arm_cfg.model, run_dir / "zeroshot" / arm,
                                                  protocols, z.summary, num_samples, stride, z.num_steps, root, log)
    results["load_average"] = os.getloadavg()[0]
    path = run_dir / "zeroshot" / "results.json"
    path.write_text(json.dumps(results, indent=2))
    results["path"] = str(path)
    if report_dir is not None:
        from tsdb.pretrain.report import write_pretrain_report
        results["path"] = str(write_pretrain_report(run_dir, results, Path(report_dir), command,
                                                    None if against is None else Path(against)))
    return results
