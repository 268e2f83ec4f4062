"""``tsdb bench streaming``: per-update latency of streaming inference vs recomputation.

For each history length T (the "context length" the stream has seen: 128, 512, 2048
values by default) a series is initialised with T values, then ``updates`` new values
arrive one at a time; after each, a forecast of ``num_samples`` samples is drawn. Timed
per update (median), single thread (``torch.set_num_threads(1)``, onnxruntime
``intra_op_num_threads=1``), the same noise for every method:

- ``ort_streaming``: the torch-free runtime (``tsdb_streaming``) on the exported graphs;
- ``torch_streaming``: ``tsdb.strategies.depth.streaming.update`` + ``forecast``;
- ``torch_recompute``: ``tsdb.strategies.depth.streaming.recompute_forecast`` on the full history so far
  (the library's ``encode_context`` over every token with the sliding window, then the
  sampler): the same numbers as streaming, recomputed from scratch;
- ``torch_last_context``: the plain library call ``strategy.forecast`` on the last
  ``context_length`` values (what one would do without streaming; it forgets what lies
  beyond the window, so its numbers differ once T > context_length).

Also recorded: the update and forecast parts separately, and the parity of ORT vs torch
streaming and of torch streaming vs recompute (max abs difference, normalized scale).
Writes ``results.json``, ``report.md`` and ``latency.png`` to ``out_dir``.
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tsdb.bench.timing import ms
from tsdb.cli.stream import import_runtime
from tsdb.config import ModelConfig
from tsdb.errors import TsdbError
from tsdb.export.onnx import export_progress
from tsdb.strategies import STRATEGIES, get_strategy, streamable

TARGETS = {"flat_ratio_max": 1.5, "speedup_min": 5.0, "parity_max": 1e-4}


def bench_config(strategy: str) -> dict:
    """The ``ModelConfig`` fields of the benchmark's model for ``strategy`` (its own choice)."""
    cls = STRATEGIES.get(strategy)
    if cls is None or cls.streaming_class is None:
        raise TsdbError(f"strategy {strategy!r} does not stream; choose one of {streamable()}")
    return {"strategy": strategy, **cls.streaming_class.bench_model}


def _model(run_dir, model_cfg):
    if run_dir is not None:
        from tsdb.training.loop import load_model
        cfg, strategy, model = load_model(run_dir)
        return cfg.model, strategy, model
    cfg = ModelConfig(**(model_cfg or bench_config("depth")))
    strategy = get_strategy(cfg)
    torch.manual_seed(0)
    model = strategy.build().eval()
    with torch.no_grad():  # randomize the adaLN-Zero layers so the network is not F = 0
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.05)
    return cfg, strategy, model


def run_streaming_bench(out_dir: str | Path, context_lengths=(128, 512, 2048), num_samples: int = 100,
                        updates: int | None = None, warmup: int = 3, run_dir: str | Path | None = None,
                        model_cfg: dict | None = None, seed: int = 0,
                        extra_lengths=(8192, 32768), extra_updates: int = 8) -> dict:
    """Measure and write the streaming benchmark; returns the results dict.

    ``context_lengths`` are the history lengths the targets are checked on;
    ``extra_lengths`` (fewer timed updates, since recomputation gets slow) show where the
    recompute overtakes the sampling cost.
    """
    rt = import_runtime()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg, strategy, model = _model(run_dir, model_cfg)
    online = strategy.streaming()
    if online is None:
        raise TsdbError(f"strategy {strategy.name!r} does not stream; choose one of {streamable()}")
    sampler = strategy.sampler
    tmp = tempfile.TemporaryDirectory(prefix="tsdb-bench-streaming-")
    model_dir = Path(tmp.name) / "model"   # the exported graphs are not part of the report
    t0 = time.perf_counter()
    with export_progress():
        meta = online.export(model, model_dir, num_steps=cfg.inference_steps)
    export_s = time.perf_counter() - t0
    p = cfg.patch_length
    updates = updates or max(16, 2 * p)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    rows = []
    try:
        for t in [*context_lengths, *extra_lengths]:
            n_upd = updates if t in context_lengths else extra_updates
            history = (rng.normal(size=t + warmup + n_upd).cumsum() * 0.3 + 10).astype(np.float32)
            f = rt.StreamingForecaster(model_dir, intra_op_num_threads=1, refresh="none",
                                       **online.runtime_options(num_samples))
            times, parity_ort, parity_rec, cache_tokens = online.measure(
                model, f, history, t, warmup, n_upd, num_samples, rng)
            row = {"history": t, **{f"{k}_ms": statistics.median(v) for k, v in times.items()},
                   **{f"{k}_mean_ms": statistics.fmean(v) for k, v in times.items()},
                   "parity_ort_vs_torch": parity_ort, "parity_stream_vs_recompute": parity_rec,
                   "cache_tokens": cache_tokens, "updates_timed": n_upd,
                   "recompute_timed": len(times["torch_recompute"]), "extra": t not in context_lengths}
            row["speedup_ort_vs_recompute"] = row["torch_recompute_ms"] / row["ort_streaming_ms"]
            row["speedup_torch_vs_recompute"] = row["torch_recompute_ms"] / row["torch_streaming_ms"]
            rows.append(row)
        onnx_bytes = sum(f.stat().st_size for f in model_dir.glob("*.onnx"))
        samples_sweep = (_samples_sweep(rt, model_dir, context_lengths[-1], rng)
                         if online.sweeps_samples else [])
    finally:
        torch.set_num_threads(threads)
        tmp.cleanup()

    spec_rows = [r for r in rows if not r["extra"]]
    first, last = spec_rows[0], spec_rows[-1]
    summary = {
        "flat_ratio_ort": last["ort_streaming_ms"] / first["ort_streaming_ms"],
        "flat_ratio_torch": last["torch_streaming_ms"] / first["torch_streaming_ms"],
        "recompute_growth": last["torch_recompute_ms"] / first["torch_recompute_ms"],
        "speedup_ort_vs_recompute": last["speedup_ort_vs_recompute"],
        "speedup_torch_vs_recompute": last["speedup_torch_vs_recompute"],
        "speedup_ort_update_vs_recompute": last["torch_recompute_ms"] / last["ort_update_ms"],
        "speedup_ort_vs_recompute_longest": rows[-1]["speedup_ort_vs_recompute"],
        "longest_history": rows[-1]["history"],
        "parity_ort_vs_torch": max(r["parity_ort_vs_torch"] for r in rows),
        "parity_stream_vs_recompute": max(r["parity_stream_vs_recompute"] for r in rows),
    }
    checks = {
        "streaming flat (ORT, last/first <= 1.5)": summary["flat_ratio_ort"] <= TARGETS["flat_ratio_max"],
        "streaming flat (torch, last/first <= 1.5)": summary["flat_ratio_torch"] <= TARGETS["flat_ratio_max"],
        f"ORT streaming >= 5x faster than recompute at {last['history']}":
            summary["speedup_ort_vs_recompute"] >= TARGETS["speedup_min"],
        "ORT vs torch parity <= 1e-4": summary["parity_ort_vs_torch"] <= TARGETS["parity_max"],
    }
    command = f"tsdb bench streaming --strategy {strategy.name}"
    results = {
        "benchmark": "streaming",
        "command": command,
        "model": {"config": cfg.model_dump(), "arm": strategy.arm_name(), "layout": strategy.describe(),
                  "params": meta["params"],
                  "onnx_bytes": onnx_bytes,
                  "export_seconds": export_s},
        "setup": {"num_samples": num_samples, "updates_timed": updates, "warmup": warmup, "threads": 1,
                  "sampler": sampler, "num_steps": cfg.inference_steps,
                  "denoiser_calls_per_forecast": online.calls_per_forecast(), "machine": platform.machine(),
                  "python": platform.python_version(), "torch": torch.__version__,
                  "onnxruntime": __import__("onnxruntime").__version__},
        "rows": rows, "samples_sweep": samples_sweep, "summary": summary, "targets": TARGETS,
        "checks": {k: bool(v) for k, v in checks.items()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _plot(rows, out / "latency.png", results)
    (out / "report.md").write_text(_report(results))
    return results


def _samples_sweep(rt, model_dir: Path, t: int, rng, counts=(1, 10, 100), repeats: int = 15) -> list[dict]:
    """ORT forecast time (no update) against the number of samples, after ``t`` values:
    how much of the per-update cost is the sampler's work on the samples."""
    f = rt.StreamingForecaster(model_dir, intra_op_num_threads=1, refresh="none")
    f.update(["s"], [(rng.normal(size=t).cumsum() * 0.3 + 10).astype(np.float32)])
    out = []
    for n in counts:
        noise = rng.normal(size=(1, n, f.horizon)).astype(np.float32)
        f.forecast(["s"], noise=noise)                       # warm-up
        times = []
        for _ in range(repeats):
            c0 = time.perf_counter()
            f.forecast(["s"], noise=noise)
            times.append(ms(c0))
        out.append({"history": t, "num_samples": n, "ort_forecast_ms": statistics.median(times)})
    return out


def _plot(rows, path: Path, results) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["history"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, label, style in (("ort_streaming_ms", "ORT streaming", "o-"),
                              ("torch_streaming_ms", "PyTorch streaming", "s-"),
                              ("torch_recompute_ms", "PyTorch recompute (full history)", "^--"),
                              ("torch_last_context_ms", "PyTorch, last context only", "v:"),
                              ("ort_update_ms", "ORT update only", "x-.")):
        ax.plot(xs, [r[key] for r in rows], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("history length (values seen)")
    ax.set_ylabel("median ms per update (1 thread)")
    m = results["model"]
    ax.set_title(f"update + forecast of {results['setup']['num_samples']} samples; "
                 f"{m['arm']}, {m['params'] / 1e3:.0f}k params", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _samples_line(sweep: list | None) -> list[str]:
    if not sweep:
        return []
    times = ", ".join(f"{x['num_samples']}: {x['ort_forecast_ms']:.2f} ms" for x in sweep)
    return [f"ORT forecast alone (no update) after {sweep[0]['history']} values, by number of samples: {times}.", ""]


def _report(res: dict) -> str:
    m, s, su = res["model"], res["setup"], res["summary"]
    c = m["config"]
    lines = [
        f"# Streaming inference benchmark ({m['config']['strategy']})",
        "",
        f"Model: `{m['arm']}` ({m['params']:,} parameters, ONNX {m['onnx_bytes'] / 1e6:.2f} MB), context_length "
        f"{c['context_length']}, horizon {c['horizon']}, patch {c['patch_length']}, d_model {c['d_model']}, "
        f"{m['layout']}; {s['sampler']} with {s['num_steps']} steps "
        f"({s['denoiser_calls_per_forecast']} denoiser calls per forecast). Random weights (latency does not "
        f"depend on them).",
        f"Per update: one new value, then a forecast of {s['num_samples']} samples; median of "
        f"{s['updates_timed']} updates after {s['warmup']} warm-up, 1 thread, same noise for every method. "
        f"Machine: {s['machine']}, shared CPU (absolute times are noisy; ratios are measured side by side).",
        "",
        "| history | ORT streaming ms | ORT update ms | torch streaming ms | torch update ms | torch recompute ms "
        "| torch last-context ms | speedup ORT vs recompute | parity ORT-torch | parity stream-recompute |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        name = f"{r['history']}{' (extra)' if r['extra'] else ''}"
        lines.append(f"| {name} | {r['ort_streaming_ms']:.2f} | {r['ort_update_ms']:.3f} | "
                     f"{r['torch_streaming_ms']:.2f} | {r['torch_update_ms']:.3f} | {r['torch_recompute_ms']:.2f} | "
                     f"{r['torch_last_context_ms']:.2f} | {r['speedup_ort_vs_recompute']:.2f}x | "
                     f"{r['parity_ort_vs_torch']:.1e} | {r['parity_stream_vs_recompute']:.1e} |")
    lines += [
        "",
        f"- Streaming growth from the first to the last history length: ORT {su['flat_ratio_ort']:.2f}x, "
        f"PyTorch {su['flat_ratio_torch']:.2f}x; recompute grows {su['recompute_growth']:.2f}x.",
        f"- At the longest history, ORT streaming is {su['speedup_ort_vs_recompute']:.2f}x faster than the "
        f"PyTorch recompute (PyTorch streaming {su['speedup_torch_vs_recompute']:.2f}x); the update alone is "
        f"{su['speedup_ort_update_vs_recompute']:.0f}x faster than the recompute. At "
        f"{su['longest_history']} values (extra point) ORT streaming is "
        f"{su['speedup_ort_vs_recompute_longest']:.1f}x faster.",
        f"- Parity (normalized scale, max abs): ORT vs PyTorch streaming {su['parity_ort_vs_torch']:.1e}; "
        f"PyTorch streaming vs recompute {su['parity_stream_vs_recompute']:.1e}.",
        "",
        "Targets:",
        "",
    ]
    lines += [f"- [{'x' if ok else ' '}] {name}" for name, ok in res["checks"].items()]
    lines += [
        "",
        *get_strategy(ModelConfig(**c)).streaming().explain(res),
        "",
        *_samples_line(res.get("samples_sweep")),
        "![latency](latency.png)",
        "",
        f"Written by `tsdb.bench.streaming.run_streaming_bench` (`{res['command']}`).",
    ]
    return "\n".join(lines) + "\n"
