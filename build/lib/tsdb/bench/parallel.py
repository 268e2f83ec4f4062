"""``tsdb bench parallel``: wall time of block-parallel training (B blocks on N worker
processes) against sequential training of the same blocks in one process."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path

from tsdb.config import ExperimentConfig, packaged
from tsdb.training.parallel import train_parallel

CONFIG = packaged("configs", "bench", "parallel.yaml")


def run_parallel_bench(out: str | Path, workers: int = 2, log=print) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ExperimentConfig.from_yaml(CONFIG)
    cfg.train.progress = False
    data = ["--dataset", cfg.data.dataset, "--no-progress"]
    timings = {}
    for name, n in (("sequential", 1), (f"parallel-{workers}", workers)):
        run = out / "runs" / name
        shutil.rmtree(run, ignore_errors=True)
        start = time.perf_counter()
        # n = 1 is the plain `tsdb train` path: one process with every core, blocks in turn
        train_parallel(cfg, run, n, data)
        timings[name] = time.perf_counter() - start
        log(f"{name}: {timings[name]:.1f}s wall")
    ratio = timings[f"parallel-{workers}"] / timings["sequential"]
    results = {"name": "parallel", "blocks": cfg.model.n_blocks, "workers": workers,
               "steps_per_block": cfg.train.steps_per_block, "cpu_count": os.cpu_count(),
               "platform": platform.platform(), "wall_seconds": timings, "parallel_over_sequential": ratio}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(
        "# Block-parallel training\n\nProduced by: `tsdb bench parallel`\n\n"
        f"B = {cfg.model.n_blocks} blocks x {cfg.train.steps_per_block} steps (config `configs/bench/parallel.yaml`, "
        f"dataset `{cfg.data.dataset}`), on {os.cpu_count()} CPU cores. Sequential: one `tsdb train` process using "
        f"every core, blocks in turn. Parallel: {workers} `tsdb train --block ...` workers, each pinned to "
        f"{max(1, (os.cpu_count() or 1) // workers)} thread(s), then `assemble`.\n\n"
        "| schedule | wall seconds |\n|---|---|\n"
        + "".join(f"| {k} | {v:.1f} |\n" for k, v in timings.items())
        + f"\nparallel / sequential wall time: **{ratio:.2f}** (target <= 0.7).\n")
    return results
