"""Block-parallel training: blocks are independent jobs, so N of them train at once.

Each worker is a ``tsdb train --block ...`` process (the same command a cluster array job
runs), pinned to its own GPU when there are several, or to its share of CPU threads.
``assemble_run`` joins the finished blocks into ``model.pt``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from tsdb.config import ExperimentConfig
from tsdb.errors import TsdbError
from tsdb.strategies import get_strategy
from tsdb.training.loop import assemble_run


def num_units(cfg: ExperimentConfig) -> int:
    strategy = get_strategy(cfg.model)
    return len(strategy.units(strategy.build()))


def train_parallel(cfg: ExperimentConfig, run_dir: str | Path, workers: int, data_args: list[str],
                   log=print) -> dict:
    """Train every unit of ``cfg`` with ``workers`` concurrent processes; returns the summary
    of ``assemble_run`` plus ``wall_seconds``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "config.yaml"
    if not config.exists():
        cfg.to_yaml(config)
    n = num_units(cfg)
    workers = max(1, min(workers, n))
    gpus = torch.cuda.device_count()
    threads = max(1, (os.cpu_count() or 1) // workers)
    procs = []
    start = time.perf_counter()
    for w in range(workers):
        blocks = [str(b) for b in range(w, n, workers)]
        env = dict(os.environ, TSDB_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(w % gpus)
        cmd = [sys.executable, "-m", "tsdb.cli.main", "train", "--config", str(config), "--out", str(run_dir),
               "--block", *blocks, *data_args]
        log(f"worker {w}: blocks {', '.join(blocks)}")
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    failed = [(w, p.communicate()[1]) for w, p in enumerate(procs) if p.wait() != 0]
    if failed:
        w, err = failed[0]
        last = err.strip().splitlines()[-1] if err.strip() else "no output"
        raise TsdbError(f"block worker {w} failed: {last}")
    summary = assemble_run(run_dir)
    summary["wall_seconds"] = time.perf_counter() - start
    return summary
