"""Timing helpers shared by the streaming benchmark's per-strategy measurements."""

from __future__ import annotations

import time

# what every strategy's StreamingSupport.measure times, per update (ms)
TIMED = ("ort_streaming", "ort_update", "torch_streaming", "torch_update", "torch_recompute", "torch_last_context")


def ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def timed(times: dict, key: str, fn, *args, **kwargs):
    """Call ``fn`` and store its wall time (ms) under ``key``."""
    c0 = time.perf_counter()
    out = fn(*args, **kwargs)
    times[key] = ms(c0)
    return out


def record(times: dict, step: dict) -> None:
    """One timed update: streaming = its update + its forecast."""
    step = dict(step)
    step["torch_streaming"] = step["torch_update"] + step.pop("torch_forecast")
    step["ort_streaming"] = step["ort_update"] + step.pop("ort_forecast")
    for k, v in step.items():
        times[k].append(v)
