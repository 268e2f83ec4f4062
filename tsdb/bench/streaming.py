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

import tsdb.strategies.depth.streaming as st
from tsdb.config import ModelConfig
from tsdb.data.windows import last_context
from tsdb.export.onnx import export_model
from tsdb.strategies import get_strategy
from tsdb.cli.stream import import_runtime

# depth-b4 at the width, patching and sampler of configs/bench/m4-hourly-quick.yaml, one layer per block
BENCH_MODEL = dict(strategy="depth", context_length=336, horizon=48, patch_length=16, d_model=64, n_heads=4,
                   n_layers=4, n_blocks=4, sampler="heun", num_steps=8)
# the horizon-b4 arm of configs/ablation/m4-hourly-quick.yaml (chunks of c = 12 = one patch)
HORIZON_BENCH_MODEL = dict(strategy="horizon", context_length=336, horizon=48, patch_length=12, d_model=32,
                           n_heads=4, n_layers=12, n_blocks=4, sampler="heun", num_steps=8)
# the looped arm of configs/ablation/m4-hourly-quick.yaml (its core is one graph looped on the host)
LOOPED_BENCH_MODEL = dict(strategy="looped", context_length=336, horizon=48, patch_length=12, d_model=32,
                          n_heads=4, n_layers=12, core_layers=8, loop_iters=8, sampler="heun", num_steps=8)
BENCH_MODELS = {"depth": BENCH_MODEL, "horizon": HORIZON_BENCH_MODEL, "looped": LOOPED_BENCH_MODEL}
TIMED = ("ort_streaming", "ort_update", "torch_streaming", "torch_update", "torch_recompute", "torch_last_context")
TARGETS = {"flat_ratio_max": 1.5, "speedup_min": 5.0, "parity_max": 1e-4}


def _model(run_dir, model_cfg):
    if run_dir is not None:
        from tsdb.training.loop import load_model
        cfg, strategy, model = load_model(run_dir)
        return cfg.model, strategy, model
    cfg = ModelConfig(**(model_cfg or BENCH_MODEL))
    strategy = get_strategy(cfg)
    torch.manual_seed(0)
    model = strategy.build().eval()
    with torch.no_grad():  # randomize the adaLN-Zero layers so the network is not F = 0
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.05)
    return cfg, strategy, model


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


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
    sampler = st.sampler_for(strategy)
    tmp = tempfile.TemporaryDirectory(prefix="tsdb-bench-streaming-")
    model_dir = Path(tmp.name) / "model"   # the exported graphs are not part of the report
    t0 = time.perf_counter()
    if strategy.name == "horizon":
        from tsdb.strategies.horizon.export import export_horizon_model
        meta = export_horizon_model(model, strategy, model_dir)
    else:
        meta = export_model(model, strategy, model_dir, sampler=sampler, num_steps=cfg.inference_steps)
    export_s = time.perf_counter() - t0
    p = cfg.patch_length
    updates = updates or max(16, 2 * p)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    rows = []
    measure = _measure_horizon if strategy.name == "horizon" else _measure_depth
    try:
        for t in [*context_lengths, *extra_lengths]:
            n_upd = updates if t in context_lengths else extra_updates
            history = (rng.normal(size=t + warmup + n_upd).cumsum() * 0.3 + 10).astype(np.float32)
            f = rt.StreamingForecaster(model_dir, intra_op_num_threads=1, refresh="none",
                                       **({"num_samples": num_samples} if strategy.name == "horizon" else {}))
            times, parity_ort, parity_rec, cache_tokens = measure(
                cfg, strategy, model, f, history, t, warmup, n_upd, num_samples, rng, sampler)
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
                         if strategy.name != "horizon" else [])
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
    command = "tsdb bench streaming" + ("" if strategy.name == "depth" else f" --strategy {strategy.name}")
    results = {
        "benchmark": "streaming",
        "command": command,
        "model": {"config": cfg.model_dump(), "arm": strategy.arm_name(), "params": meta["params"],
                  "onnx_bytes": onnx_bytes,
                  "export_seconds": export_s},
        "setup": {"num_samples": num_samples, "updates_timed": updates, "warmup": warmup, "threads": 1,
                  "sampler": sampler, "num_steps": cfg.inference_steps,
                  "denoiser_calls_per_forecast": _calls(cfg, strategy, sampler), "machine": platform.machine(),
                  "python": platform.python_version(), "torch": torch.__version__,
                  "onnxruntime": __import__("onnxruntime").__version__},
        "rows": rows, "samples_sweep": samples_sweep, "summary": summary, "targets": TARGETS,
        "checks": {k: bool(v) for k, v in checks.items()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _plot(rows, out / "latency.png", results)
    (out / "report.md").write_text(_report(results))
    return results


def _timed(times: dict, key: str, fn, *args, **kwargs):
    c0 = time.perf_counter()
    out = fn(*args, **kwargs)
    times[key] = _ms(c0)
    return out


def _measure_depth(cfg, strategy, model, f, history, t, warmup, n_upd, num_samples, rng, sampler):
    """Depth/e2e/looped: per update, the ORT and PyTorch streaming update + forecast, the
    recompute from the full history and the plain library call on the last context."""
    hz = cfg.horizon
    schedule = strategy.schedule(cfg.inference_steps)
    h = torch.from_numpy(history)[None]
    state = st.init_state(model, h[:, :t])
    f.update(["s"], [history[:t]])
    times = {k: [] for k in TIMED}
    parity_ort, parity_rec = 0.0, 0.0
    for i in range(warmup + n_upd):
        x = h[:, t + i:t + i + 1]
        noise = torch.from_numpy(rng.normal(size=(1, num_samples, hz)).astype(np.float32))
        scale = float(state.scale)
        step: dict = {}
        state = _timed(step, "torch_update", st.update, model, state, x)
        y_torch = _timed(step, "torch_forecast", st.forecast, model, state, noise, schedule, sampler=sampler)
        _timed(step, "ort_update", f.update, ["s"], [history[t + i]])
        y_ort = _timed(step, "ort_forecast", f.forecast, ["s"], noise=noise.numpy()).samples
        y_rec = _timed(step, "torch_recompute", st.recompute_forecast, model, h[:, :t + i + 1], noise, schedule,
                       sampler=sampler, pending=int(state.pending_count[0]), loc=state.loc, scale=state.scale,
                       next_token=int(state.tokens[0]), init_length=t)
        ctx = torch.from_numpy(last_context(history[:t + i + 1], cfg.context_length))[None]
        _timed(step, "torch_last_context", strategy.forecast, model, ctx, num_samples, noise=noise)
        if i >= warmup:
            _record(times, step)
        parity_ort = max(parity_ort, float(np.abs(y_ort - y_torch.numpy()).max()) / scale)
        parity_rec = max(parity_rec, float((y_torch - y_rec).abs().max()) / scale)
    return times, parity_ort, parity_rec, int(state.k[0].shape[3])


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
            times.append(_ms(c0))
        out.append({"history": t, "num_samples": n, "ort_forecast_ms": statistics.median(times)})
    return out


def _record(times: dict, step: dict) -> None:
    """One timed update: streaming = its update + its forecast."""
    step = dict(step)
    step["torch_streaming"] = step["torch_update"] + step.pop("torch_forecast")
    step["ort_streaming"] = step["ort_update"] + step.pop("ort_forecast")
    for k, v in step.items():
        times[k].append(v)


def _measure_horizon(cfg, strategy, model, f, history, t, warmup, n_upd, num_samples, rng, sampler,
                     recompute_every: int = 8):
    """Horizon: per update, the ORT and PyTorch streaming update (an observed roll every
    c values, buffering otherwise) + forecast (B or B + 1 free rolls), the replay from init
    over the full history (``streaming_horizon.recompute_forecast``: the same numbers,
    timed every ``recompute_every``-th update since it re-encodes the history per
    trajectory) and the cold start ``strategy.forecast`` on the last context."""
    import tsdb.strategies.horizon.streaming as sh

    kw = sh.sampler_kwargs(strategy)
    hz, c, s = cfg.horizon, model.chunk_length, num_samples
    h = torch.from_numpy(history)[None]
    init_noise = torch.from_numpy(rng.normal(size=(1, s, 2 * hz)).astype(np.float32))
    state = sh.init_state(model, h[:, :t], s, init_noise, **kw)
    f.update(["s"], [history[:t]], init_noise=init_noise.numpy())
    times = {k: [] for k in TIMED}
    parity_ort, parity_rec = 0.0, 0.0
    rolls = []
    for i in range(warmup + n_upd):
        x = h[:, t + i:t + i + 1]
        fresh = torch.from_numpy(rng.normal(size=(1, s, int(sh.rolls_due(model, state, 1)[0]) * c))
                                 .astype(np.float32))
        rolls.append(fresh)
        noise = torch.from_numpy(rng.normal(size=(1, s, hz + c)).astype(np.float32))
        scale = float(state.scale)
        step: dict = {}
        state = _timed(step, "torch_update", sh.update, model, state, x, fresh, **kw)
        y_torch = _timed(step, "torch_forecast", sh.forecast, model, state, noise, **kw)
        _timed(step, "ort_update", f.update, ["s"], [history[t + i]], noise=[fresh[0].numpy()])
        y_ort = _timed(step, "ort_forecast", f.forecast, ["s"], noise=noise.numpy()).samples
        ctx = torch.from_numpy(last_context(history[:t + i + 1], cfg.context_length))[None]
        cold = torch.cat([init_noise, noise[..., :hz]], -1)     # [1, S, 3H] for the cold start
        _timed(step, "torch_last_context", strategy.forecast, model, ctx, s, noise=cold)
        if i >= warmup and (i - warmup) % recompute_every == 0 or i == warmup + n_upd - 1:
            y_rec = _timed(step, "torch_recompute", sh.recompute_forecast, model, h[:, :t + i + 1], t, init_noise,
                           torch.cat(rolls, -1), noise, **kw)
            parity_rec = max(parity_rec, float((y_torch - y_rec).abs().max()) / scale)
        if i >= warmup:
            _record(times, step)
        parity_ort = max(parity_ort, float(np.abs(y_ort - y_torch.numpy()).max()) / scale)
    return times, parity_ort, parity_rec, int(state.k[0].shape[3])


def _calls(cfg, strategy, sampler: str) -> int:
    """Block calls per forecast: the sampler's, or for horizon B rolls x per-roll sub-step
    evaluations x B blocks (every block reads the whole window)."""
    if strategy.name == "horizon":
        sub = strategy.substeps(None)
        evals = 2 * sub - 1 if sampler == "heun" else sub   # the last sub-step is Euler
        return cfg.n_blocks * evals * cfg.n_blocks
    k = cfg.inference_steps
    return 2 * k - 1 if sampler == "heun" else k


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


def _where_time_goes(res: dict) -> list[str]:
    m, s = res["model"], res["setup"]
    c = m["config"]
    if m["config"]["strategy"] == "horizon":
        chunk = c["horizon"] // c["n_blocks"]
        return [
            f"Where the time goes (horizon): a forecast runs {c['n_blocks']} free rolls "
            f"({c['n_blocks'] + 1} with values pending inside a chunk) of "
            f"{s['denoiser_calls_per_forecast'] // c['n_blocks']} block calls each over {s['num_samples']} windows, every emitted chunk entering a per-trajectory "
            f"cache; an update buffers values and runs one observed roll every {chunk} values, so update times "
            "are spiky (the `_mean_ms` fields of results.json include the rolls; the table shows medians). "
            "The recompute is the replay from initialisation over the full history "
            "(`streaming_horizon.recompute_forecast`, the same numbers as streaming): every roll re-encodes the "
            "whole history, per trajectory for the free rolls, so it grows with the history; it was timed on "
            f"{res['rows'][0]['recompute_timed']} updates per length. The last-context column is the cold start "
            "`strategy.forecast` on the last context_length values: what one would run without a state; its "
            "numbers differ from streaming with deeper blocks (see `tsdb.strategies.horizon.streaming`).",
        ]
    return [
        "Where the time goes: a forecast runs the sampler, "
        f"{s['denoiser_calls_per_forecast']} denoiser calls over {s['num_samples']} samples x "
        f"{c['horizon'] // c['patch_length']} future tokens, whatever the history; streaming removes the "
        "context encoding (the update column) but not the sampler, so the speedup over recomputation is "
        "1 + encode / sample and reaches large factors only when the history is long compared with the "
        "sampling work.",
    ]


def _samples_line(sweep: list | None) -> list[str]:
    if not sweep:
        return []
    times = ", ".join(f"{x['num_samples']}: {x['ort_forecast_ms']:.2f} ms" for x in sweep)
    return [f"ORT forecast alone (no update) after {sweep[0]['history']} values, by number of samples: {times}.", ""]


def _layout(c: dict) -> str:
    if c["strategy"].startswith("looped"):
        prelude = c["n_layers"] - c["core_layers"]
        return f"a prelude of {prelude} layers and a core of {c['core_layers']} layers applied once per sampler step"
    return f"{c['n_layers']} layers in {c['n_blocks']} blocks"


def _report(res: dict) -> str:
    m, s, su = res["model"], res["setup"], res["summary"]
    c = m["config"]
    lines = [
        f"# Streaming inference benchmark ({m['config']['strategy']})",
        "",
        f"Model: `{m['arm']}` ({m['params']:,} parameters, ONNX {m['onnx_bytes'] / 1e6:.2f} MB), context_length "
        f"{c['context_length']}, horizon {c['horizon']}, patch {c['patch_length']}, d_model {c['d_model']}, "
        f"{_layout(c)}; {s['sampler']} with {s['num_steps']} steps "
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
        *_where_time_goes(res),
        "",
        *_samples_line(res.get("samples_sweep")),
        "![latency](latency.png)",
        "",
        f"Written by `tsdb.bench.streaming.run_streaming_bench` (`{res['command']}`).",
    ]
    return "\n".join(lines) + "\n"
