"""``tsdb bench sampling``: library forecast time (``strategy.forecast``) against an older commit.

The same model (M4 Hourly quick-tier shape, weights randomized so every layer matters),
the same 32 contexts and the same noise are timed in subprocesses that import either this
checkout or a ``git worktree`` of ``--against REV``, alternating between the two so that
both see the same machine load; the samples of both are compared. The timing script uses
only the API both versions share (``ModelConfig``, ``get_strategy``, ``build``,
``forecast``), so any revision since the strategies existed can be measured.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SHAPE = dict(context_length=336, horizon=48, patch_length=16, d_model=64, n_heads=4, n_layers=8, n_blocks=4,
             p_mean=1.0, p_std=1.2, sigma_data=1.0, sampler="heun", num_steps=8)
TIMER = r"""
import json, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from tsdb.config import ModelConfig
from tsdb.strategies import get_strategy
work, repeats, tag, sampler = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
spec = json.load(open(f"{work}/spec.json"))
strategy = get_strategy(ModelConfig(**{**spec["shape"], "sampler": sampler}))
model = strategy.build().eval()
model.load_state_dict(torch.load(f"{work}/weights.pt", weights_only=True))
context = torch.from_numpy(np.load(f"{work}/context.npy"))
noise = torch.from_numpy(np.load(f"{work}/noise.npy"))
with torch.inference_mode():
    strategy.forecast(model, context, noise.shape[1], noise=noise)  # warm-up
    times = []
    for _ in range(repeats):  # CPU seconds of this process (1 thread): robust to other load
        t0 = time.process_time()
        samples = strategy.forecast(model, context, noise.shape[1], noise=noise)
        times.append(time.process_time() - t0)
np.save(f"{work}/samples-{tag}-{sampler}.npy", samples.numpy())
print(json.dumps(times))
"""


def _contexts(num_series: int, context_length: int, seed: int) -> np.ndarray:
    """The last ``context_length`` training values of M4 Hourly series (random walks if the
    files are not available)."""
    from tsdb.data.registry import load_dataset
    from tsdb.data.windows import last_context
    from tsdb.errors import TsdbError

    try:
        data = load_dataset("m4_hourly")
        return np.stack([last_context(s.target[:-48], context_length) for s in data.series[:num_series]])
    except TsdbError:
        rng = np.random.default_rng(seed)
        return (rng.normal(size=(num_series, context_length)).cumsum(-1) + 100).astype(np.float32)


def _randomized_weights(strategy, seed: int) -> dict:
    """Weights with the zero-initialised (adaLN-Zero) parameters randomized, so the network is not F = 0."""
    torch.manual_seed(seed)
    model = strategy.build()
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.05)
    return model.state_dict()


def _worktree(rev: str, root: Path, where: Path) -> Path:
    subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(where), rev], check=True,
                   capture_output=True)
    return where


def run_sampling_bench(out_dir: str | Path, against: str = "8ad1f17", num_series: int = 32, num_samples: int = 100,
                       rounds: int = 5, repeats: int = 3, seed: int = 0) -> dict:
    from tsdb.config import ModelConfig
    from tsdb.strategies import get_strategy

    root = Path(__file__).resolve().parents[2]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    strategy = get_strategy(ModelConfig(**SHAPE))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "spec.json").write_text(json.dumps({"shape": SHAPE}))
        torch.save(_randomized_weights(strategy, seed), work / "weights.pt")
        np.save(work / "context.npy", _contexts(num_series, SHAPE["context_length"], seed))
        rng = np.random.default_rng(seed)
        np.save(work / "noise.npy", rng.normal(size=(num_series, num_samples, SHAPE["horizon"])).astype(np.float32))
        trees = {"this checkout": root, against: _worktree(against, root, work / "old")}
        times: dict[str, list[float]] = {name: [] for name in trees}

        def timed(tree: Path, count: int, sampler: str) -> list[float]:
            proc = subprocess.run([sys.executable, "-c", TIMER, str(work), str(count), "new" if tree == root else "old",
                                   sampler], cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
                                  capture_output=True, text=True, check=True)
            return json.loads(proc.stdout.strip().splitlines()[-1])

        try:
            for _ in range(rounds):  # alternate, so both see the same load
                for name, tree in trees.items():
                    times[name] += timed(tree, repeats, SHAPE["sampler"])
            for tree in trees.values():
                timed(tree, 1, "euler")
            diff = {sampler: float(np.abs(np.load(work / f"samples-new-{sampler}.npy")
                                          - np.load(work / f"samples-old-{sampler}.npy")).max())
                    for sampler in ("euler", SHAPE["sampler"])}
            scale = float(np.abs(np.load(work / "samples-old-euler.npy")).max())
        finally:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(trees[against])],
                           capture_output=True)
    med = {name: statistics.median(t) for name, t in times.items()}
    results = {
        "command": f"tsdb bench sampling --against {against}",
        "shape": SHAPE, "num_series": num_series, "num_samples": num_samples,
        "threads": 1, "rounds": rounds, "repeats_per_round": repeats,
        "seconds": times, "median_seconds": med,
        "speedup": med[against] / med["this checkout"],
        "max_abs_diff_samples": diff,
        "max_abs_samples": scale,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "load_average": list(__import__("os").getloadavg()),
                    "date": time.strftime("%Y-%m-%d %H:%M")},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(_report(results, against))
    return results


def _report(r: dict, against: str) -> str:
    med = r["median_seconds"]
    return "\n".join([
        "# Library sampling time: `strategy.forecast`", "",
        f"Produced by `{r['command']}`. Model: depth-b4 at the M4 Hourly quick-tier shape "
        f"(C = 336, H = 48, P = 16, d = 64, 8 layers, Heun, K = 8, weights randomized), "
        f"{r['num_series']} series x {r['num_samples']} samples, 1 torch thread, "
        f"{r['rounds']} alternating rounds of {r['repeats_per_round']} timed calls per version. Timed in CPU "
        "seconds of the forecasting process (`time.process_time`, one thread), which other processes on a "
        f"shared machine disturb far less than wall time (load average at the end "
        f"{r['machine']['load_average'][0]:.1f} on 2 cores).", "",
        "| version | median CPU s per forecast | calls |", "|---|---|---|",
        *[f"| {name} | {med[name]:.3f} | {len(r['seconds'][name])} |" for name in med], "",
        f"Speed-up: **{r['speedup']:.2f}x** (Heun, K = 8). Where it comes from: the context keys/values are "
        "computed once per series and shared by its samples in one matrix product, instead of copied per sample "
        "and concatenated at every step; sigma conditioning is computed once per series and step; RoPE is one "
        "complex multiplication instead of strided real arithmetic; series are sampled in chunks of 1024 "
        "trajectories, whose activations stay in cache (4096 before).", "",
        "Same noise, same weights (raw scale; samples reach "
        f"{r['max_abs_samples']:.0f}): with Euler the two versions differ by at most "
        f"{r['max_abs_diff_samples']['euler']:.1e}, float rounding of a different summation order. With Heun they "
        f"differ by up to {r['max_abs_diff_samples'][SHAPE['sampler']]:.1e}: at {against} the corrector evaluation "
        "of a Heun step whose end sits on a band edge was routed by its sigma to the next block; now both "
        "evaluations of a step use the step's block (issue 10's routing fix).", "",
    ])
