"""``tsdb bench soak``: a long stream through the torch-free runtime, RSS sampled over time.

The model is the streaming benchmark's depth-b4 (``tsdb.bench.streaming.bench_config("depth")``,
random weights with the adaLN-Zero layers randomized: throughput and memory do not depend on
training), exported to ONNX once. ``series`` series are initialised with ``history`` values
each; then every tick gives each series one new value in one batched ``update`` (so a tick
is ``series`` streamed updates), ``forecast_every`` ticks a rotating group of
``forecast_batch`` series is forecast (``num_samples`` samples), and every
``checkpoint_every`` ticks the whole state is saved to a file (as ``tsdb stream --state``
does) and, once, loaded back. Values are per-series random walks with a daily cycle on
scales from 1e-3 to 1e6, with 1% missing readings (NaN).

Recorded: wall time, updates per second (update calls only and overall), forecast latency,
RSS (``VmRSS``) every ``rss_every`` ticks, the RSS at 10^5 updates and at the end, and the
number of non-finite forecasts (must be 0). One thread (onnxruntime ``intra_op_num_threads=1``).
Writes ``results.json``, ``report.md`` and ``rss.png``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

COMMAND = "tsdb bench soak --threads 1"


def rss_bytes() -> int:
    """Current resident set size of this process (VmRSS)."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024


def _values(rng: np.random.Generator, series: int, ticks: int, start: int) -> np.ndarray:
    """``[ticks, series]`` float32: random walks with a 24-step cycle, scale 1e-3 .. 1e6, 1% NaN."""
    scale = np.logspace(-3, 6, series)
    t = np.arange(start, start + ticks)[:, None]
    walk = rng.normal(size=(ticks, series)).cumsum(0) * 0.05
    x = scale * (5 + np.sin(2 * np.pi * t / 24 + np.arange(series)) + walk)
    x[rng.random(x.shape) < 0.01] = np.nan
    return x.astype(np.float32)


def run_soak(out_dir: str | Path, updates: int = 1_000_000, series: int = 1000, history: int = 336,
             forecast_every: int = 2, forecast_batch: int = 16, num_samples: int = 100,
             checkpoint_every: int = 100, reload_at: int = 25, rss_every: int = 5, seed: int = 0,
             progress: bool = True, model_cfg: dict | None = None) -> dict:
    """Run the soak and write its report into ``out_dir``; returns the results dict.

    The model is exported here (torch); the stream runs in a fresh process that imports only
    the runtime (onnxruntime + numpy), so its RSS is the runtime's own.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    from tsdb.bench.streaming import _model, bench_config
    from tsdb.export.onnx import export_progress

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    cfg, strategy, model = _model(None, model_cfg or bench_config("depth"))
    with tempfile.TemporaryDirectory(prefix="tsdb-soak-") as tmp:
        model_dir = Path(tmp) / "model"
        t0 = time.perf_counter()
        with export_progress(progress):
            strategy.streaming().export(model, model_dir, num_steps=cfg.inference_steps)
        export_s = time.perf_counter() - t0
        params = dict(model_dir=str(model_dir), state_file=str(Path(tmp) / "state.npz"), updates=updates,
                      series=series, history=history, forecast_every=forecast_every,
                      forecast_batch=forecast_batch, num_samples=num_samples, checkpoint_every=checkpoint_every,
                      reload_at=reload_at, rss_every=rss_every, seed=seed, progress=progress)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            stream = pool.submit(_stream, params).result()
    results = _summarize(cfg, strategy, export_s, params, stream)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _plot(results, out / "rss.png")
    (out / "report.md").write_text(_report(results))
    return results


def _stream(p: dict) -> dict:
    """The soak itself, in a process without torch: returns timings, RSS samples and counts."""
    import sys

    from tqdm.auto import tqdm

    from tsdb.cli.stream import import_runtime

    rt = import_runtime()
    rng = np.random.default_rng(p["seed"])
    series = p["series"]
    ids = [f"series-{i:05d}" for i in range(series)]
    ticks = -(-p["updates"] // series)
    f = rt.StreamingForecaster(p["model_dir"], intra_op_num_threads=1)
    t0 = time.perf_counter()
    f.update(ids, list(_values(rng, series, p["history"], 0).T))
    init_s = time.perf_counter() - t0
    rss = [{"updates": 0, "rss_mib": rss_bytes() / 2**20, "seconds": 0.0}]
    update_s, forecast_ms, save_ms, nonfinite, forecasts, done, reloaded = 0.0, [], [], 0, 0, 0, None
    chunk = 100                         # ticks of values drawn at once
    started = time.perf_counter()
    bar = tqdm(total=ticks * series, desc="soak", unit="update", unit_scale=True, disable=not p["progress"])
    for first in range(0, ticks, chunk):
        for row in _values(rng, series, min(chunk, ticks - first), p["history"] + first):
            c0 = time.perf_counter()
            f.update(ids, row[:, None])
            update_s += time.perf_counter() - c0
            done += series
            n = done // series
            if n % p["forecast_every"] == 0:
                k = p["forecast_batch"]
                group = [ids[(n // p["forecast_every"] * k + j) % series] for j in range(k)]
                c0 = time.perf_counter()
                fc = f.forecast(group, num_samples=p["num_samples"],
                                seed=[rt.series_seed(p["seed"], i, n) for i in group])
                forecast_ms.append((time.perf_counter() - c0) * 1e3)
                forecasts += len(group)
                nonfinite += int((~np.isfinite(fc.quantiles).all(axis=(1, 2))).sum())
            if n % p["checkpoint_every"] == 0 or n == p["reload_at"]:
                c0 = time.perf_counter()
                f.save_state(p["state_file"], extra={"tick": n})
                save_ms.append((time.perf_counter() - c0) * 1e3)
                if n == p["reload_at"]:     # a restart: the stream continues from the file
                    f = rt.StreamingForecaster(p["model_dir"], intra_op_num_threads=1)
                    reloaded = {"tick": f.load_state(p["state_file"])["tick"], "series": len(f)}
            if n % p["rss_every"] == 0:
                rss.append({"updates": done, "rss_mib": rss_bytes() / 2**20,
                            "seconds": time.perf_counter() - started})
            bar.update(series)
    bar.close()
    return dict(rss=rss, done=done, ticks=ticks, wall=time.perf_counter() - started, init_s=init_s,
                update_s=update_s, forecasts=forecasts, forecast_ms=forecast_ms, save_ms=save_ms,
                reloaded=reloaded, nonfinite=nonfinite, torch_loaded="torch" in sys.modules)


def _rss_at(rss: list[dict], updates: int) -> float:
    """RSS of the first sample at or after ``updates`` streamed updates."""
    return next(r["rss_mib"] for r in rss if r["updates"] >= updates)


def _summarize(cfg, strategy, export_s: float, p: dict, v: dict) -> dict:
    import onnxruntime
    import torch
    rss, done = v["rss"], v["done"]
    early = min(100_000, done)
    return {
        "benchmark": "soak",
        "command": COMMAND,
        "model": {"config": cfg.model_dump(), "arm": strategy.arm_name(), "export_seconds": export_s},
        "setup": {"updates": done, "series": p["series"], "ticks": v["ticks"], "history": p["history"],
                  "forecast_every_ticks": p["forecast_every"], "forecast_batch": p["forecast_batch"],
                  "num_samples": p["num_samples"], "checkpoint_every_ticks": p["checkpoint_every"],
                  "reload_at_tick": p["reload_at"],
                  "missing_share": 0.01, "value_scales": "1e-3 .. 1e6", "threads": 1,
                  "stream_process_imported_torch": v["torch_loaded"],
                  "machine": platform.machine(), "python": platform.python_version(), "cpus": os.cpu_count(),
                  "load_average_1min_at_end": os.getloadavg()[0],
                  "onnxruntime": onnxruntime.__version__, "torch (export only)": torch.__version__},
        "wall_seconds": v["wall"],
        "init_seconds": v["init_s"],
        "updates_per_second": done / v["wall"],
        "update_calls_updates_per_second": done / v["update_s"],
        "update_seconds": v["update_s"],
        "forecasts": v["forecasts"],
        "forecast_ms_median": statistics.median(v["forecast_ms"]),
        "forecast_ms_p99": float(np.percentile(v["forecast_ms"], 99)),
        "forecast_seconds": sum(v["forecast_ms"]) / 1e3,
        "state_saves": len(v["save_ms"]),
        "state_save_ms_median": statistics.median(v["save_ms"]) if v["save_ms"] else None,
        "state_reloaded": v["reloaded"],
        "nonfinite_forecasts": v["nonfinite"],
        "rss_mib_at_1e5": _rss_at(rss, early),
        "rss_mib_end": rss[-1]["rss_mib"],
        "rss_growth_1e5_to_end": rss[-1]["rss_mib"] / _rss_at(rss, early) - 1,
        "rss_mib_max_after_1e5": max(r["rss_mib"] for r in rss if r["updates"] >= early),
        "rss": rss,
    }


def _plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot([r["updates"] for r in res["rss"]], [r["rss_mib"] for r in res["rss"]], lw=1)
    ax.axvline(100_000, color="grey", lw=0.5, ls="--")
    ax.set_xlabel("streamed updates")
    ax.set_ylabel("RSS (MiB)")
    ax.set_ylim(0, max(r["rss_mib"] for r in res["rss"]) * 1.15)
    ax.set_title(f"tsdb soak: {res['setup']['series']} series, {res['setup']['updates']:,} updates")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _report(r: dict) -> str:
    s = r["setup"]
    rel = r["rss_growth_1e5_to_end"] * 100
    lines = [
        "# Soak: a long stream through the torch-free runtime", "",
        f"Produced by: `{r['command']}` ({s['machine']}, {s['cpus']} CPUs shared with other work: 1-minute load "
        f"average {s['load_average_1min_at_end']:.1f} at the end; Python {s['python']}, onnxruntime "
        f"{s['onnxruntime']}, {s['threads']} thread). Wall time of the stream {r['wall_seconds'] / 60:.1f} min (+ "
        f"{r['model']['export_seconds']:.0f} s ONNX export of the model). The stream runs in its own process, which "
        f"{'imported' if s['stream_process_imported_torch'] else 'never imported'} torch, so the RSS is the "
        "runtime's.", "",
        f"Model: `{r['model']['arm']}` of `tsdb bench streaming` (context {r['model']['config']['context_length']}, "
        f"horizon {r['model']['config']['horizon']}, patch {r['model']['config']['patch_length']}, random weights). "
        f"{s['series']} series initialised with {s['history']} values each, then {s['ticks']} ticks of one value per "
        f"series in one batched `update` ({s['updates']:,} streamed updates; values on scales {s['value_scales']}, "
        f"{s['missing_share']:.0%} missing); every {s['forecast_every_ticks']} ticks {s['forecast_batch']} series "
        f"(rotating) are forecast with {s['num_samples']} samples; every {s['checkpoint_every_ticks']} ticks the "
        f"whole state is saved to a file, and at tick {s['reload_at_tick']} the stream continues from a new "
        "forecaster loaded from that file (a restart; before 10^5 updates, so that the RSS from 10^5 on is one "
        "process state's).", "",
        "| figure | value |", "|---|---|",
        f"| streamed updates | {s['updates']:,} |",
        f"| throughput, overall (updates, forecasts and state saves) | {r['updates_per_second']:,.0f} updates/s |",
        f"| throughput, update calls only | {r['update_calls_updates_per_second']:,.0f} updates/s |",
        f"| forecasts | {r['forecasts']:,} ({r['forecast_ms_median']:.1f} ms median, {r['forecast_ms_p99']:.1f} ms "
        f"p99 per group of {s['forecast_batch']}) |",
        f"| non-finite forecasts | {r['nonfinite_forecasts']} |",
        f"| state saves | {r['state_saves']}"
        + (f" ({r['state_save_ms_median']:.0f} ms median) |" if r["state_saves"] else " |"),
        f"| reloaded mid-soak | tick {r['state_reloaded']['tick']}, {r['state_reloaded']['series']} series |"
        if r["state_reloaded"] else "| reloaded mid-soak | no |",
        f"| RSS at 10^5 updates | {r['rss_mib_at_1e5']:.1f} MiB |",
        f"| RSS at the end | {r['rss_mib_end']:.1f} MiB ({rel:+.1f}% vs 10^5; target within 10%) |",
        f"| highest RSS after 10^5 | {r['rss_mib_max_after_1e5']:.1f} MiB |",
        "", "![RSS over the soak](rss.png)", "",
        "Figures are written by `tsdb.bench.soak` from `results.json` in this folder.",
    ]
    return "\n".join(lines) + "\n"


__all__ = ["run_soak", "rss_bytes"]
