"""``tsdb pretrain``: train every arm of a `PretrainConfig` on the corpus stream, block by block.

Run directory::

    RUN/pretrain.yaml          the PretrainConfig
    RUN/<arm>/                 a `tsdb train` run directory per arm (config.yaml, units/<unit>/
                               last.ckpt + done.json, model.pt, training.json), so `tsdb export`,
                               `load_model` and fine-tuning read it like any other run
    RUN/<arm>/logs/            one log per block job (with --workers: progress bars)
    RUN/pretrain-log.jsonl     one line per invocation and arm: wall and CPU seconds, load

Every arm trains through `tsdb.training.loop.train_model` on `CorpusWindows` (the same
seeded stream for every arm, so the arms see the same windows and diffusion draws), one
``Trainer.fit`` per unit, resumable after a kill at the unit's last checkpoint. With
``workers > 1`` the units (all arms' blocks) are independent jobs run by that many
``tsdb pretrain --arm A --block K`` processes, the longest (the e2e model) first.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tsdb.errors import TsdbError
from tsdb.pretrain.config import PretrainConfig
from tsdb.pretrain.corpus import Corpus, CorpusWindows

CONFIG_FILE = "pretrain.yaml"
LOG_FILE = "pretrain-log.jsonl"


def corpus_windows(cfg: PretrainConfig, corpus: Corpus | None = None) -> CorpusWindows:
    """The training stream of ``cfg``: windows of the model's shape cut from the corpus."""
    m, s = cfg.model, cfg.stream
    return CorpusWindows(corpus or Corpus(cfg.corpus), m.context_length, m.horizon, seed=cfg.train.seed,
                         min_context=s.min_context, patch_length=m.patch_length,
                         partial_patch_prob=m.partial_patch_prob, series_per_chunk=s.series_per_chunk,
                         windows_per_series=s.windows_per_series, short_context_prob=s.short_context_prob)


def cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (DataLoader workers, block jobs)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def write_config(cfg: PretrainConfig, run_dir: Path) -> None:
    """Write ``pretrain.yaml``, or refuse a run directory holding another configuration."""
    path = run_dir / CONFIG_FILE
    if path.exists():
        old = PretrainConfig.from_yaml(path)
        if old.model_dump(exclude={"train": {"progress"}}) != cfg.model_dump(exclude={"train": {"progress"}}):
            raise TsdbError(f"{run_dir} holds a pretraining run with a different config; pick a new --out "
                            f"directory or delete {run_dir}")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def pretrain(cfg: PretrainConfig, run_dir: str | Path, arms: list[str] | None = None,
             blocks: list[int] | None = None, workers: int = 1, log=print) -> dict:
    """Train ``arms`` (default: all of ``cfg.arms``) into ``run_dir``; returns per arm the
    training summary (of the units trained here when ``blocks`` is given)."""
    run_dir = Path(run_dir)
    write_config(cfg, run_dir)
    arms = arms or cfg.arms
    unknown = sorted(set(arms) - set(cfg.arms))
    if unknown:
        raise TsdbError(f"arm {unknown[0]!r} is not in this config's arms {cfg.arms}")
    if workers > 1:
        return _pretrain_parallel(cfg, run_dir, arms, workers, log)
    from tsdb.training.loop import train_model

    windows = corpus_windows(cfg)
    out = {}
    for arm in arms:
        wall, cpu = time.perf_counter(), cpu_seconds()
        log(f"[pretrain] {arm}: training {'blocks ' + str(blocks) if blocks else 'every unit'} "
            f"({cfg.train.steps_per_block} steps each) on the corpus stream")
        _, summary = train_model(cfg.arm_config(arm), None, run_dir / arm, blocks=blocks, windows=windows)
        _log_usage(run_dir, arm, blocks, time.perf_counter() - wall, cpu_seconds() - cpu)
        for name, unit in summary["units"].items():
            log(f"[pretrain] {arm} {name}: {unit.get('steps')} steps, {unit['seconds']:.0f}s, final loss "
                f"{unit.get('final_loss', float('nan')):.4f}")
        out[arm] = summary
    return out


def _log_usage(run_dir: Path, arm: str, blocks, wall: float, cpu: float) -> None:
    record = {"arm": arm, "blocks": blocks, "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
              "load_average": round(os.getloadavg()[0], 2), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(["tsdb", *sys.argv[1:]])}
    with open(run_dir / LOG_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def _units(cfg: PretrainConfig, arm: str) -> int:
    from tsdb.strategies import get_strategy

    strategy = get_strategy(cfg.arm_config(arm).model)
    return len(strategy.units(strategy.build()))


def _pretrain_parallel(cfg: PretrainConfig, run_dir: Path, arms: list[str], workers: int, log) -> dict:
    """Every unit of ``arms`` as its own ``tsdb pretrain --block`` process, ``workers`` at a time."""
    from tsdb.training.loop import assemble_run

    started, cpu = time.perf_counter(), cpu_seconds()
    units = {arm: _units(cfg, arm) for arm in arms}
    # fewest units = largest unit first: the e2e model is the longest job
    jobs = sorted(((arm, k) for arm in arms for k in range(units[arm])), key=lambda job: units[job[0]])
    env = dict(os.environ, TSDB_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    running: list[tuple[tuple[str, int], subprocess.Popen]] = []
    failed = []
    while jobs or running:
        while jobs and len(running) < workers:
            arm, k = jobs.pop(0)
            logs = run_dir / arm / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "tsdb.cli.main", "pretrain", "--config", str(run_dir / CONFIG_FILE),
                   "--out", str(run_dir), "--arm", arm, "--block", str(k)]
            log(f"[pretrain] {arm} unit {k}: started (log {logs / f'unit-{k}.log'})")
            with open(logs / f"unit-{k}.log", "a") as out:
                running.append(((arm, k), subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)))
        time.sleep(1.0)
        for job, proc in list(running):
            if proc.poll() is not None:
                running.remove((job, proc))
                log(f"[pretrain] {job[0]} unit {job[1]}: {'done' if proc.returncode == 0 else 'FAILED'}")
                if proc.returncode:
                    failed.append(job)
    if failed:
        arm, k = failed[0]
        raise TsdbError(f"pretraining job {arm} unit {k} failed; see {run_dir / arm / 'logs' / f'unit-{k}.log'}")
    _log_usage(run_dir, f"parallel ({workers} workers): {', '.join(arms)}", None,
               time.perf_counter() - started, cpu_seconds() - cpu)
    out = {}
    for arm in arms:
        summary = assemble_run(run_dir / arm)
        (run_dir / arm / "training.json").write_text(json.dumps(summary, indent=2))
        out[arm] = summary
    return out


def load_pretrain_config(run_dir: str | Path) -> PretrainConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise TsdbError(f"{run_dir} is not a pretraining run (no {CONFIG_FILE}); run `tsdb pretrain` first")
    return PretrainConfig.from_yaml(path)


def packaged_tier(cfg: PretrainConfig) -> str | None:
    """The packaged config (``configs/pretrain/<tier>.yaml``) equal to ``cfg``, if any."""
    from tsdb.config import packaged

    for entry in sorted(packaged("configs", "pretrain").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            try:
                if PretrainConfig.from_yaml(entry).model_dump(exclude={"train": {"progress"}}) == \
                        cfg.model_dump(exclude={"train": {"progress"}}):
                    return f"configs/pretrain/{entry.name}"
            except TsdbError:   # another kind of config (finetune-bench)
                continue
    return None


def usage(run_dir: str | Path) -> dict:
    """Wall and CPU seconds per arm, summed over the invocations in ``pretrain-log.jsonl``."""
    path = Path(run_dir) / LOG_FILE
    out: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)  # an arm's block jobs, or a parallel parent (wall = all arms)
            a = out.setdefault(r["arm"], {"wall_seconds": 0.0, "cpu_seconds": 0.0, "invocations": 0})
            a["wall_seconds"] += r["wall_seconds"]
            a["cpu_seconds"] += r["cpu_seconds"]
            a["invocations"] += 1
    return out
