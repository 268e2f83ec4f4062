"""``tsdb bench gpu``: e2e, e2e-ckpt and depth-b4 trained on one GPU at a GPU-sized model.

Every arm runs the code of ``tsdb train`` (``train_model``: one Lightning fit per block,
``bf16-mixed``, checkpoints, the block leaves the GPU when done) on real windows (the first
of the config's datasets found locally; nothing is downloaded), with ``MemoryMeter``
measuring every step (``train.measure_steps``). Per arm: the largest step peak of
``torch.cuda.max_memory_allocated`` over its blocks, the exact training-state bytes, steps/s
(from the median synchronized step time after each block's first ``untimed_steps``, and over
whole fits with data loading, logging and checkpoint saves), the final training loss of each
block, and the bench's wall time against its budget. ``--tiny`` runs a small config, on CPU
unless ``--device`` says otherwise: the test suite's smoke run of this command.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from tsdb.bench.experiment import TaskSpec, build_task, machine_info
from tsdb.bench.memory import check_device, mib_text, ratio, ratio_text
from tsdb.config import ExperimentConfig, _Strict, packaged
from tsdb.data.registry import OFFLINE_VAR
from tsdb.errors import DataError, TsdbError
from tsdb.training.loop import train_model

CONFIG = packaged("configs", "bench", "gpu.yaml")
TINY = packaged("configs", "bench", "gpu-tiny.yaml")


class GpuBenchSpec(_Strict):
    name: str = "gpu"
    datasets: list[TaskSpec]             # training split of the first one found locally
    base: ExperimentConfig = ExperimentConfig()
    arms: dict[str, dict[str, dict[str, Any]]]
    untimed_steps: int = Field(10, ge=0)  # each block's first steps, left out of the step-time median
    budget_seconds: float = Field(480.0, gt=0)


def local_training_data(tasks: list[TaskSpec], root: str | None = None):
    """``(task, training split)`` of the first task whose data is on this machine; downloads
    are off while looking."""
    missing = []
    previous = os.environ.get(OFFLINE_VAR)
    os.environ[OFFLINE_VAR] = "1"
    try:
        for task in tasks:
            try:
                return task, build_task(task, root).train
            except DataError as e:
                missing.append(f"{task.dataset} ({e})")
    finally:
        if previous is None:
            os.environ.pop(OFFLINE_VAR)
        else:
            os.environ[OFFLINE_VAR] = previous
    raise TsdbError(f"gpu bench: no dataset of the config is available locally: {'; '.join(missing)}")


def run_gpu_bench(out: str | Path, tiny: bool = False, config: str | Path | None = None,
                  device: str | None = None, root: str | None = None, arms: list[str] | None = None,
                  keep_runs: bool = False, log=print, command: str = "tsdb bench gpu") -> dict:
    """Train every arm of the spec on ``device`` (default: cuda, cpu with ``tiny``) and write
    ``results.json`` and ``report.md`` to ``out``; run folders are deleted unless ``keep_runs``."""
    started = time.perf_counter()
    spec = GpuBenchSpec.from_yaml(config or (TINY if tiny else CONFIG))
    device = device or ("cpu" if tiny else "cuda")
    check_device(device, "run `tsdb bench gpu --tiny` for the CPU smoke run, or pass --device cpu")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task, data = local_training_data(spec.datasets, root)
    log(f"[gpu] data: {task.dataset} training split ({len(data)} series); device {device}")
    results = {"benchmark": "gpu", "name": spec.name, "command": command, "machine": machine_info(),
               "device": device, "dataset": task.dataset, "config": spec.model_dump(mode="json"), "arms": {}}
    for arm, overrides in spec.arms.items():
        if arms and arm not in arms:
            continue
        cfg = spec.base.with_overrides(**overrides).with_overrides(train={
            "accelerator": device, "progress": False, "measure_steps": spec.base.train.steps_per_block})
        run = out / "runs" / arm
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        _, summary = train_model(cfg, data, run)
        results["arms"][arm] = arm_figures(summary, spec.untimed_steps, time.perf_counter() - t0)
        if not keep_runs:
            shutil.rmtree(run, ignore_errors=True)
        f = results["arms"][arm]
        log(f"[gpu] {arm}: {f['params'] / 1e6:.1f}M params, peak {mib_text(f['peak_bytes'])} MiB, "
            f"{f['steps_per_second']:.1f} steps/s, final loss {f['final_loss_mean']:.4f}")
        (out / "results.json").write_text(json.dumps(results, indent=2))
    if not keep_runs:
        shutil.rmtree(out / "runs", ignore_errors=True)
    results["wall_seconds"] = time.perf_counter() - started
    results["within_budget"] = results["wall_seconds"] <= spec.budget_seconds
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_gpu_report(results, out)
    return results


def arm_figures(summary: dict, untimed: int, wall_seconds: float) -> dict:
    """One arm's figures from ``train_model``'s summary (every step measured)."""
    units = summary["units"]
    memory = [u["memory"] for u in units.values()]
    times = [t for m in memory for t in m["step_seconds"][untimed:]] or [
        t for m in memory for t in m["step_seconds"]]
    steps = sum(u["steps"] for u in units.values())
    median = statistics.median(times)
    out = {"params": summary["params"], "units": len(units), "unit_params": max(m["params"] for m in memory),
           "precision": memory[0]["precision"], "device": memory[0]["device"],
           "train_state_bytes": summary["train_state_bytes"],
           "saved_activation_bytes": summary["saved_activation_bytes"],
           "cuda_max_memory_allocated": summary.get("cuda_max_memory_allocated"),
           "step_peak_rss_bytes": max(m["step_peak_rss_bytes"] for m in memory),
           "steps": steps, "step_seconds_median": median, "steps_per_second": 1.0 / median,
           "fit_steps_per_second": steps / summary["train_seconds"], "train_seconds": summary["train_seconds"],
           "wall_seconds": wall_seconds,
           "final_loss": {name: u.get("final_loss") for name, u in units.items()}}
    out["peak_bytes"] = out["cuda_max_memory_allocated"] or out["step_peak_rss_bytes"]
    out["final_loss_mean"] = statistics.fmean(v for v in out["final_loss"].values() if v is not None)
    return out


def write_gpu_report(results: dict, out: Path) -> Path:
    arms = results["arms"]
    cfg = results["config"]
    model, train = cfg["base"]["model"], cfg["base"]["train"]
    cuda = results["device"].startswith("cuda")
    peak = "max_memory_allocated" if cuda else "step peak RSS (whole process)"
    e2e, ckpt = arms.get("e2e", {}), arms.get("e2e-ckpt", {})
    m = results["machine"]
    lines = [f"# Training on one GPU ({results['name']})", "",
             f"Produced by: `{results['command']}`; device `{results['device']}` ({m.get('cuda') or 'no GPU'}), "
             f"torch {m['torch']}; whole bench {results['wall_seconds'] / 60:.1f} min "
             f"({'within' if results['within_budget'] else 'OVER'} the {cfg['budget_seconds'] / 60:.0f}-minute "
             "budget).", "",
             f"Model: d = {model.get('d_model')}, L = {model.get('n_layers')}, context {model.get('context_length')}, "
             f"horizon {model.get('horizon')}, patch {model.get('patch_length')}; batch {train.get('batch_size')}, "
             f"{train.get('steps_per_block')} steps per block (depth-b4: per block, so each block gets e2e's "
             f"budget), precision `{train.get('precision')}`, data: `{results['dataset']}` training split. "
             "Trained by `train_model` (the code of `tsdb train`), every step measured by `MemoryMeter`.", "",
             f"| arm | params | params per block | {peak} MiB | training state MiB | median step ms | "
             "steps/s | steps/s whole fits | final loss (per block) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, f in arms.items():
        losses = ", ".join(f"{v:.4f}" for v in f["final_loss"].values() if v is not None)
        lines.append(f"| {name} | {f['params'] / 1e6:.1f}M | {f['unit_params'] / 1e6:.1f}M | "
                     f"{mib_text(f['peak_bytes'])} | {mib_text(f['train_state_bytes'])} | "
                     f"{1000 * f['step_seconds_median']:.1f} | "
                     f"{f['steps_per_second']:.1f} | {f['fit_steps_per_second']:.1f} | {losses} |")
    lines += ["", f"Median step: forward to optimizer step, synchronized, after each block's first "
              f"{cfg['untimed_steps']} steps. Whole fits add data loading, logging and checkpoint saves. The final "
              "loss is the last step's training loss (one batch); a depth block's loss covers its own noise band, "
              "so it does not compare with e2e's full-range loss."]
    depth = {n: f for n, f in arms.items() if n not in ("e2e", "e2e-ckpt")}
    vs = lambda a, b: ratio_text(ratio(a, b))  # noqa: E731
    if e2e and ckpt:
        lines += ["", f"Checkpointing: e2e / e2e-ckpt {peak} {vs(e2e['peak_bytes'], ckpt['peak_bytes'])}, step "
                      f"time e2e-ckpt / e2e {vs(ckpt['step_seconds_median'], e2e['step_seconds_median'])}."]
        for name, f in depth.items():
            lines.append(
                f"{name}: {peak} e2e / {name} {vs(e2e['peak_bytes'], f['peak_bytes'])}, e2e-ckpt / {name} "
                f"{vs(ckpt['peak_bytes'], f['peak_bytes'])}; training state "
                f"{vs(e2e['train_state_bytes'], f['train_state_bytes'])} against e2e, "
                f"{vs(ckpt['train_state_bytes'], f['train_state_bytes'])} against e2e-ckpt; training time "
                f"(all blocks) / e2e {vs(f['train_seconds'], e2e['train_seconds'])}.")
    lines += ["", "Written by `tsdb.bench.gpu.write_gpu_report` from `results.json` in this folder."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
