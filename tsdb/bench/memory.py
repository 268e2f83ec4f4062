"""``tsdb bench memory``: training memory and step time against depth and width.

Arms: ``e2e`` (plain backprop through all layers), ``e2e-ckpt`` (the same model with
per-layer activation checkpointing, what a user short of memory turns on instead of
DiffusionBlocks) and ``depth-bB`` (B blocks, each trained alone). At every width d and
depth L each arm trains a few real steps on real windows, through the code of ``tsdb
train`` (``UnitModule`` in a Lightning fit, measured by ``MemoryMeter``): exact
training-state bytes, peak memory (RSS above the process baseline on CPU,
``max_memory_allocated`` on CUDA) and the median step time. The report states every
depth-bB figure as a ratio against both e2e and e2e-ckpt, beside the step time that
checkpointing costs.

Each point runs in a fresh process (forked from a server that has imported torch), so a
peak RSS is that point's own. A depth arm trains its first block (all blocks of a depth
model have the same shape) with the other blocks dropped and their memory handed back to
the OS (``malloc_trim``) before it starts, as on an accelerator, where they would sit in
host memory.
"""

from __future__ import annotations

import ctypes
import gc
import json
import multiprocessing
import statistics
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import torch
from pydantic import Field, ValidationError

import tsdb.evaluation.plots as plots
from tsdb.bench.experiment import TaskSpec, build_task, machine_info
from tsdb.config import ExperimentConfig, _Strict, packaged
from tsdb.data.windows import TrainingWindows
from tsdb.errors import TsdbError
from tsdb.strategies import get_strategy
from tsdb.training.loop import UnitModule, resolve_precision
from tsdb.training.memory import MemoryMeter, checkpoint_layers, rss_bytes

CONFIG = packaged("configs", "bench", "memory.yaml")
BASELINES = ("e2e", "e2e-ckpt")  # every depth-bB ratio is stated against both


class MemoryBenchSpec(_Strict):
    """Points: every arm at every (width, depth); ``n_heads = width / head_dim``."""

    name: str = "memory"
    task: TaskSpec                       # the data: this protocol's training split
    base: ExperimentConfig = ExperimentConfig()
    arms: dict[str, dict[str, dict[str, Any]]]
    depths: list[int]
    widths: list[int]
    head_dim: int = Field(32, gt=0)
    warmup: int = Field(1, ge=0)         # steps before the timed ones (their memory counts too)
    timed: int = Field(3, gt=0)          # timed steps per point; the report gives the median

    def point_config(self, arm: str, width: int, depth: int) -> ExperimentConfig:
        if arm not in self.arms:
            raise TsdbError(f"memory bench: unknown arm {arm!r}; the config has {sorted(self.arms)}")
        overrides = {**self.arms[arm]}
        overrides["model"] = {**overrides.get("model", {}), "d_model": width,
                              "n_heads": max(1, width // self.head_dim), "n_layers": depth}
        try:
            return self.base.with_overrides(**overrides)
        except ValidationError as e:
            raise TsdbError(f"memory bench: arm {arm} at width {width}, depth {depth}: "
                            f"{e.errors()[0]['msg']}") from None


def run_memory_bench(out: str | Path, config: str | Path | None = None, device: str | None = None,
                     root: str | None = None, arms: list[str] | None = None, log=print,
                     command: str = "tsdb bench memory") -> dict:
    """Measure every point of the spec (each in a fresh process) and write ``results.json``,
    ``report.md`` and ``memory.png`` to ``out``."""
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = MemoryBenchSpec.from_yaml(config or CONFIG)
    if device:
        spec.base = spec.base.with_overrides(train={"accelerator": device})
    check_device(spec.base.train.accelerator)
    names = [a for a in spec.arms if not arms or a in arms]
    threads = torch.get_num_threads()
    results = {"benchmark": "memory", "name": spec.name, "command": command, "machine": machine_info(),
               "config": spec.model_dump(mode="json"), "threads": threads, "points": []}
    for width in spec.widths:
        for depth in spec.depths:
            for arm in names:  # the arms of one (width, depth) run back to back: alike machine load
                cfg = spec.point_config(arm, width, depth)
                t0 = time.perf_counter()
                point = {"arm": arm, "width": width, "depth": depth,
                         **_in_fresh_process(cfg, spec, root, threads)}
                results["points"].append(point)
                log(f"[memory] {arm:>9} d={width} L={depth}: " + (
                    f"train state {point['train_state_bytes'] / 2**20:.0f} MiB, peak {_peak(point) / 2**20:.0f} "
                    f"MiB, step {point['step_seconds_median']:.2f}s wall, {point['step_cpu_seconds_median']:.2f}s CPU "
                    f"({time.perf_counter() - t0:.0f}s)"
                    if "error" not in point else f"failed: {point['error']}"))
                (out / "results.json").write_text(json.dumps(results, indent=2))
    results["wall_seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_memory_report(results, out)
    return results


def check_device(accelerator: str, fix: str = "use --device cpu") -> None:
    if accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        raise TsdbError(f"device {accelerator!r} requested but CUDA is not available here (torch "
                        f"{torch.__version__}); {fix}")


def _in_fresh_process(cfg: ExperimentConfig, spec: MemoryBenchSpec, root: str | None, threads: int) -> dict:
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload([__name__])  # children fork with torch and lightning imported
    args = (cfg.model_dump(), spec.task.model_dump(), root, spec.warmup, spec.timed, threads)
    try:
        with ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=1) as pool:
            return pool.submit(measure_point, *args).result()
    except Exception as e:  # noqa: BLE001 - a point that dies (e.g. out of memory) is reported, not fatal
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}


def _trim_heap() -> None:
    """glibc: give the free pages of the heap back to the OS (``malloc_trim``), so that memory
    freed before a measurement does not sit in the resident set during it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_point(cfg_data: dict, task_data: dict, root: str | None, warmup: int, timed: int,
                  threads: int) -> dict:
    """One point (run in its own process): ``warmup + timed`` real training steps of the
    arm's first unit, measured by ``MemoryMeter``."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*(LeafSpec|does not have many workers).*")
    torch.set_num_threads(threads)
    cfg = ExperimentConfig.model_validate(cfg_data)
    data = build_task(TaskSpec.model_validate(task_data), root).train
    gc.freeze()  # what is loaded so far stays: later collections only scan the new objects
    # one step of a tiny model of the same arm first: what the first fit of a process loads and
    # keeps (lazy imports, thread pools, allocator arenas) then sits in the baseline
    tiny = cfg.with_overrides(model={"d_model": 16, "n_heads": 2, "n_layers": cfg.model.n_blocks})
    _fit_first_unit(tiny, data, 1)
    gc.collect()
    _trim_heap()
    baseline = rss_bytes()
    figures, model_params, units = _fit_first_unit(cfg, data, warmup + timed)
    wall, cpu = figures.pop("step_seconds")[warmup:], figures.pop("step_cpu_seconds")[warmup:]
    return {**figures, "model_params": model_params, "units": units, "rss_baseline_bytes": baseline,
            "tokens_per_sample": (cfg.model.context_length + cfg.model.horizon) // cfg.model.patch_length,
            "batch_size": cfg.train.batch_size, "step_seconds": wall, "step_seconds_median": statistics.median(wall),
            "step_cpu_seconds": cpu, "step_cpu_seconds_median": statistics.median(cpu)}


def _fit_first_unit(cfg: ExperimentConfig, data, steps: int) -> tuple[dict, int, int]:
    """``steps`` training steps of the first unit of ``cfg``'s model, the others dropped;
    returns the unit's ``MemoryMeter`` figures, the model's parameter count and its units."""
    L.seed_everything(cfg.train.seed, verbose=False)
    strategy = get_strategy(cfg.model)
    model = strategy.build()
    if cfg.train.activation_checkpointing:
        checkpoint_layers(model)
    units = strategy.units(model)
    for other in units[1:]:
        other.module.to("meta")  # only the block in training is alive
    _trim_heap()
    unit = units[0]
    windows = TrainingWindows(data, cfg.model.context_length, cfg.model.horizon, seed=cfg.train.seed,
                              patch_length=cfg.model.patch_length,
                              partial_patch_prob=cfg.model.partial_patch_prob, covariates=cfg.model.num_covariates)
    meter = MemoryMeter([unit.name], steps=steps)
    trainer = L.Trainer(max_steps=steps, accelerator=cfg.train.accelerator, devices=1,
                        precision=resolve_precision(cfg.train), gradient_clip_val=cfg.train.grad_clip,
                        callbacks=[meter], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(UnitModule(unit, cfg.train, windows))
    return dict(meter.figures[unit.name]), sum(p.numel() for p in model.parameters()), len(units)


# -- report -------------------------------------------------------------------------------

def _peak(point: dict) -> float:
    """Peak memory of a step: CUDA max allocated, else the RSS peak above the process baseline."""
    if point.get("cuda_max_memory_allocated") is not None:
        return point["cuda_max_memory_allocated"]
    return point["step_peak_rss_bytes"] - point["rss_baseline_bytes"]


def step_time(point: dict) -> float:
    """A step's time: on CPU the median CPU time of the process (other jobs on a shared machine
    stretch wall time, not CPU time), on CUDA the median synchronized wall time."""
    return point["step_seconds_median"] if point["device"].startswith("cuda") else point["step_cpu_seconds_median"]


def step_times(point: dict) -> list[float]:
    """Every timed step's time, as ``step_time`` measures it."""
    return point["step_seconds"] if point["device"].startswith("cuda") else point["step_cpu_seconds"]


def step_time_label(pts: dict) -> str:
    cuda = next(iter(pts.values()), {}).get("device", "cpu").startswith("cuda")
    return "median step wall time" if cuda else "median step CPU time"


def index_points(results: dict) -> dict[tuple[int, int, str], dict]:
    return {(p["width"], p["depth"], p["arm"]): p for p in results["points"] if "error" not in p}


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing."""
    return a / b if a and b else None


def ratio_text(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}x"


def mib_text(v: float | None) -> str:
    return "n/a" if v is None else f"{v / 2**20:,.0f}"


def depth_arms(results: dict) -> list[str]:
    return [a for a in results["config"]["arms"] if a not in BASELINES]


def ratio_rows(results: dict, metric=lambda p: p["train_state_bytes"]) -> list[dict]:
    """Per (width, depth): e2e params, every depth arm's figure as ratios against e2e and
    e2e-ckpt, and the step time of e2e-ckpt over e2e."""
    pts = index_points(results)
    rows = []
    for width in results["config"]["widths"]:
        for depth in results["config"]["depths"]:
            e2e, ckpt = pts.get((width, depth, "e2e")), pts.get((width, depth, "e2e-ckpt"))
            row = {"width": width, "depth": depth, "params": e2e and e2e["model_params"],
                   "ckpt_time": ratio(ckpt and step_time(ckpt), e2e and step_time(e2e)),
                   # the widest the ratio gets over the timed steps: fastest / slowest, slowest / fastest
                   "ckpt_time_range": (ratio(min(step_times(ckpt)), max(step_times(e2e))),
                                       ratio(max(step_times(ckpt)), min(step_times(e2e)))) if e2e and ckpt else None}
            for arm in depth_arms(results):
                p = pts.get((width, depth, arm))
                for base, ref in zip(BASELINES, (e2e, ckpt)):
                    row[f"{base}/{arm}"] = ratio(ref and metric(ref), p and metric(p))
            rows.append(row)
    return rows


def write_memory_report(results: dict, out: Path) -> Path:
    cfg = results["config"]
    pts = index_points(results)
    arms = [a for a in cfg["arms"] if any(k[2] == a for k in pts)]
    deep = [a for a in depth_arms(results) if a in arms]
    first = next(iter(pts.values()), {})
    device = first.get("device", "cpu")
    peak_name = "CUDA max allocated" if device.startswith("cuda") else "peak RSS above baseline"
    m = results["machine"]
    lines = [f"# Training memory against depth and width ({results['name']})", "",
             f"Produced by: `{results['command']}` (config `configs/bench/memory.yaml`); wall time "
             f"{results.get('wall_seconds', 0) / 60:.1f} min on {m['platform']}, torch {m['torch']}, "
             f"{results['threads']} thread(s), device `{device}`, precision `{first.get('precision', '?')}`.", "",
             f"Each point trains {cfg['warmup']} + {cfg['timed']} real steps of one unit (Lightning fit, AdamW, "
             f"gradient clipping) on windows of `{cfg['task']['dataset']}` ({cfg['task']['protocol']} training "
             f"split), batch {first.get('batch_size')} x {first.get('tokens_per_sample')} tokens "
             f"(context {cfg['base']['model']['context_length']}, horizon {cfg['base']['model']['horizon']}, "
             f"patch {cfg['base']['model']['patch_length']}), heads of width {cfg['head_dim']}, in a fresh "
             "process per point. Measured by `MemoryMeter`, the callback `tsdb train` uses:", "",
             "- **training state**: exact bytes of parameters + gradients + AdamW state + the tensors autograd "
             "saves for backward (unique storages; for e2e-ckpt the inputs each checkpointed layer keeps), the "
             "largest over the point's steps;",
             f"- **peak**: {peak_name} during a step (max over steps; on CPU the resident set's high-water mark "
             "minus the process's RSS before the model was built, so it adds allocator slack and temporaries "
             "such as a layer's recomputed activations to the exact bytes);",
             f"- **step time**: median of the {cfg['timed']} timed steps, forward to optimizer step; on CPU the "
             "process's CPU time (with 1 thread, the work of the step), on CUDA synchronized wall time. The "
             "machine is shared with other jobs, which stretch wall-clock times by varying amounts from point to "
             "point, so the CPU-time medians are the figures to compare; wall-clock medians follow them.", "",
             "`e2e-ckpt` is e2e with per-layer activation checkpointing (`train.activation_checkpointing`, "
             "`torch.utils.checkpoint`, non-reentrant): the baseline a user short of memory would pick. A depth "
             "arm's figures are those of its first block (blocks share a shape); its other blocks are dropped "
             "during the measurement, as on an accelerator, where they wait in host memory. Every depth ratio "
             "below is stated against both e2e and e2e-ckpt (figure of the baseline / figure of the arm).", ""]
    lines += _headline(results, pts, deep)
    lines += ["", "## Training-state bytes (exact, MiB)", "",
              "| d | L | e2e params | " + " | ".join(arms) + " |", "|---" * (3 + len(arms)) + "|"]
    for width in cfg["widths"]:
        for depth in cfg["depths"]:
            e2e = pts.get((width, depth, "e2e"), {})
            lines.append(f"| {width} | {depth} | {e2e.get('model_params', 0) / 1e6:.1f}M | " + " | ".join(
                mib_text(pts.get((width, depth, a), {}).get("train_state_bytes")) for a in arms) + " |")
    lines += _ratio_table(results, "Training-state ratios (baseline / arm)", lambda p: p["train_state_bytes"], deep)
    lines += ["", f"## Peak memory ({peak_name}, MiB)", "",
              "| d | L | " + " | ".join(arms) + " |", "|---" * (2 + len(arms)) + "|"]
    for width in cfg["widths"]:
        for depth in cfg["depths"]:
            lines.append(f"| {width} | {depth} | " + " | ".join(
                mib_text(_peak(pts[(width, depth, a)]) if (width, depth, a) in pts else None) for a in arms) + " |")
    lines += _ratio_table(results, "Peak-memory ratios (baseline / arm)", _peak, deep)
    lines += _time_table(results, pts, arms, deep)
    lines += _components(results, pts, arms)
    failed = [p for p in results["points"] if "error" in p]
    if failed:
        lines += ["", "Points that failed: " + "; ".join(f"{p['arm']} d={p['width']} L={p['depth']}: {p['error']}"
                                                          for p in failed)]
    _plot(results, pts, arms, out / "memory.png", peak_name)
    lines += ["", "![memory and step time against depth](memory.png)", "",
              "Written by `tsdb.bench.memory.write_memory_report` from `results.json` in this folder."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _headline(results: dict, pts: dict, deep: list[str]) -> list[str]:
    cfg = results["config"]
    width, depth = max(cfg["widths"]), max(cfg["depths"])
    e2e, ckpt = pts.get((width, depth, "e2e")), pts.get((width, depth, "e2e-ckpt"))
    if not e2e or not ckpt:
        return []
    vs = lambda a, b: ratio_text(ratio(a, b))  # noqa: E731
    state, step = (lambda p: p["train_state_bytes"]), step_time  # noqa: E731
    lines = ["## At the largest model", "",
             f"d = {width}, L = {depth}: {e2e['model_params'] / 1e6:.1f}M parameters. Checkpointing cuts e2e's "
             f"training state {vs(state(e2e), state(ckpt))} and its peak {vs(_peak(e2e), _peak(ckpt))} for "
             f"{vs(step(ckpt), step(e2e))} the step time.", ""]
    for arm in deep:
        p = pts.get((width, depth, arm))
        if p:
            b = p["units"]
            lines.append(
                f"- **{arm}**: training state e2e / {arm} = **{vs(state(e2e), state(p))}**, e2e-ckpt / {arm} = "
                f"**{vs(state(ckpt), state(p))}**; peak {vs(_peak(e2e), _peak(p))} against e2e, "
                f"{vs(_peak(ckpt), _peak(p))} against e2e-ckpt; a block step takes {vs(step(p), step(e2e))} of an "
                f"e2e step ({b} blocks x the same step budget: {vs(b * step(p), step(e2e))} e2e's training time, "
                f"{vs(b * step(p), step(ckpt))} e2e-ckpt's).")
    target = pts.get((width, depth, "depth-b4"))
    if target and e2e["model_params"] >= 50e6:
        r = ratio(state(e2e), state(target))
        lines += ["", f"Target (issue 10): depth-b4 against e2e at least 3.8x at 50M+ parameters: {ratio_text(r)}, "
                      f"{'met' if r and r >= 3.8 else 'NOT met'}."]
    return lines


def _ratio_table(results: dict, title: str, metric, deep: list[str]) -> list[str]:
    cols = [f"{base} / {arm}" for arm in deep for base in BASELINES]
    lines = ["", f"{title}:", "", "| d | L | " + " | ".join(cols) + " | e2e / e2e-ckpt |",
             "|---" * (3 + len(cols)) + "|"]
    pts = index_points(results)
    for row in ratio_rows(results, metric):
        e2e, ckpt = pts.get((row["width"], row["depth"], "e2e")), pts.get((row["width"], row["depth"], "e2e-ckpt"))
        own = ratio(e2e and metric(e2e), ckpt and metric(ckpt))
        lines.append(f"| {row['width']} | {row['depth']} | " + " | ".join(
            ratio_text(row[f"{base}/{arm}"]) for arm in deep for base in BASELINES) + f" | {ratio_text(own)} |")
    return lines


def _time_table(results: dict, pts: dict, arms: list[str], deep: list[str]) -> list[str]:
    cfg = results["config"]
    label = step_time_label(pts)
    lines = ["", f"## Step time ({label} of {cfg['timed']} timed steps, seconds)", "",
             "A depth arm's time is one block step; with the same step budget per block its B blocks "
             "together take B times that per e2e step (the `B x` columns, against e2e).", "",
             "| d | L | " + " | ".join(arms) + " | e2e-ckpt / e2e | "
             + " | ".join(f"B x {a} / e2e" for a in deep) + " |",
             "|---" * (3 + len(arms) + len(deep)) + "|"]
    wall = ["", "Wall-clock medians (seconds; they include the time other jobs held the cores):", "",
            "| d | L | " + " | ".join(arms) + " | e2e-ckpt / e2e |", "|---" * (3 + len(arms)) + "|"]
    for width in cfg["widths"]:
        for depth in cfg["depths"]:
            here = {a: pts[(width, depth, a)] for a in arms if (width, depth, a) in pts}
            t = {a: step_time(p) for a, p in here.items()}
            all_blocks = [ratio(here[a]["units"] * t[a], t.get("e2e")) if a in t else None for a in deep]
            lines.append(f"| {width} | {depth} | " + " | ".join(f"{t[a]:.2f}" if a in t else "n/a" for a in arms)
                         + f" | {ratio_text(ratio(t.get('e2e-ckpt'), t.get('e2e')))} | "
                         + " | ".join(ratio_text(v) for v in all_blocks) + " |")
            w = {a: p["step_seconds_median"] for a, p in here.items()}
            wall.append(f"| {width} | {depth} | " + " | ".join(f"{w[a]:.2f}" if a in w else "n/a" for a in arms)
                        + f" | {ratio_text(ratio(w.get('e2e-ckpt'), w.get('e2e')))} |")
    return lines + (wall if label.endswith("CPU time") else [])


def _components(results: dict, pts: dict, arms: list[str]) -> list[str]:
    cfg = results["config"]
    width, depth = max(cfg["widths"]), max(cfg["depths"])
    lines = ["", f"## Where the bytes are (d = {width}, L = {depth}, MiB)", "",
             "| arm | unit params | params | grads | AdamW state | saved activations | training state | peak |",
             "|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        p = pts.get((width, depth, arm))
        if p:
            lines.append(f"| {arm} | {p['params'] / 1e6:.1f}M | " + " | ".join(mib_text(p[k]) for k in (
                "param_bytes", "grad_bytes", "optimizer_bytes", "saved_activation_bytes", "train_state_bytes"))
                + f" | {mib_text(_peak(p))} |")
    lines += ["", "Saved activations grow with batch x tokens; parameters, gradients and optimizer state do not. "
              "At a larger batch, activations weigh more, checkpointing saves more, and the ratio against "
              "e2e-ckpt falls; this table gives the parts to redo the sum for another batch."]
    return lines


def _plot(results: dict, pts: dict, arms: list[str], path: Path, peak_name: str) -> None:
    cfg = results["config"]
    colors = dict(zip(arms, ("black", "grey", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")))
    dashes = dict(zip(cfg["widths"], ("-", "--", ":", "-.")))
    panels = {"training state (MiB)": lambda p: p["train_state_bytes"] / 2**20,
              f"{peak_name} (MiB)": lambda p: _peak(p) / 2**20,
              f"{step_time_label(pts)} (s)": step_time}
    series, styles = [], {}
    for ylabel, metric in panels.items():
        lines = {}
        for arm in arms:
            for width in cfg["widths"]:
                xs = [d for d in cfg["depths"] if (width, d, arm) in pts]
                key = f"{arm} d={width}"
                lines[key] = (xs, [metric(pts[(width, d, arm)]) for d in xs])
                styles[key] = {"color": colors.get(arm), "linestyle": dashes.get(width, "-")}
        series.append((ylabel, lines))
    plots.line_panels(series, path, "depth L (layers)", styles=styles, logx=True, logy=True)
