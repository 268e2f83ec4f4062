"""``tsdb finetune-bench``: does a pretrained start beat training from scratch at the same
budget, does conversion from an end-to-end model work, and is a clean-target anchor needed?

Arms, all `depth` models of the pretraining run's shape trained with the same recipe (steps per
block, batch, warmup, seed) on the protocol's training data:

- ``scratch``: random initialisation;
- ``finetune``: every block from the pretrained depth model (blocks pretrained as blocks);
- ``finetune-anchor``: the same plus the anchor loss (the block's loss at sigma_min);
- ``convert``: blocks cut from the pretrained end-to-end model (`tsdb.pretrain.convert`);
- ``convert-anchor``: the same plus the anchor loss;
- ``zero-shot``, ``zero-shot-e2e``: the pretrained depth and e2e models untouched (references).

The learning rate of each trained arm is chosen from ``lrs`` on the protocol's validation
windows (M4: the last 48 points of each training series; ETTh1: the validation split) with
the first seed; the test windows are then scored for every seed. Every job (arm, dataset,
split, lr, seed) caches its metrics in ``OUT/jobs/``; jobs run in ``workers`` processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import yaml
from pydantic import Field

from tsdb.config import _Strict
from tsdb.errors import TsdbError
from tsdb.pretrain import WEIGHTS_FILE
from tsdb.provenance import differences

ARMS = ("scratch", "finetune", "finetune-anchor", "convert", "convert-anchor")
REFERENCES = ("zero-shot", "zero-shot-e2e")
# arms that take the learning rate chosen for another arm (same kind of start)
LR_FROM = {"finetune-anchor": "finetune", "convert": "finetune", "convert-anchor": "finetune"}


class FinetuneBenchConfig(_Strict):
    pretrained_run: str | None = None        # a `tsdb pretrain` run directory with depth/ and e2e/
    # or the pretrained models themselves (a run's arm folder or a shipped checkpoint folder);
    # each overrides `pretrained_run/<arm>`
    depth_model: str | None = None
    e2e_model: str | None = None
    datasets: list[str] = ["m4_hourly", "etth1_96"]
    arms: list[str] = list(ARMS)
    seeds: list[int] = [0, 1, 2]
    steps: int = Field(150, ge=1)            # per block
    lrs: list[float] = [3e-4, 1e-3]
    anchor_weight: float = 1.0
    num_samples: int = Field(50, ge=1)
    etth1_stride: int = Field(49, ge=1)
    workers: int = Field(2, ge=1)

    def model_dir(self, arm: str) -> Path:
        """The pretrained ``depth`` or ``e2e`` model this bench starts from."""
        explicit = getattr(self, f"{arm}_model")
        if explicit:
            return Path(explicit)
        if self.pretrained_run is None:
            raise TsdbError(f"finetune-bench: set {arm}_model or pretrained_run in the config "
                            f"(the pretrained {arm} model is needed by the arms {', '.join(self.arms)})")
        return Path(self.pretrained_run) / arm

    def depth_config(self):
        """The pretrained depth model's config (its shape is every trained arm's), read without
        loading its weights."""
        from tsdb.config import ExperimentConfig
        return ExperimentConfig.from_yaml(self.model_dir("depth") / "config.yaml")


def _tasks(dataset: str, context_length: int, stride: int, root=None):
    """``(validation task, test task)`` of a protocol."""
    from tsdb.data.registry import load_dataset
    from tsdb.data.series import SeriesDataset
    from tsdb.evaluation.tasks import etth1_task, m4_hourly_task
    from tsdb.pretrain.zeroshot import protocol_task

    test = protocol_task(dataset, context_length, stride, root)
    test.window_scores = True   # per-window CRPS for the paired bootstrap against scratch
    if dataset == "m4_hourly":
        full = load_dataset("m4_hourly", root)
        train = SeriesDataset(full.name, [s.slice(0, len(s) - 48) for s in full], full.freq, full.season_length,
                              dict(full.meta))
        return m4_hourly_task(train), test
    if dataset.startswith("etth1_"):
        return etth1_task(load_dataset("etth1", root), test.horizon, lookback=context_length, stride=stride,
                          split="val"), test
    raise TsdbError(f"finetune-bench: datasets are m4_hourly and etth1_<H>, got {dataset!r}")


def run_job(cfg: FinetuneBenchConfig, out: Path, job: dict) -> dict:
    """Train (unless a reference) and score one job; cached in its folder."""
    import torch

    from tsdb.pretrain.finetuning import finetune, finetune_config
    from tsdb.pretrain.zeroshot import zero_shot_predictor
    from tsdb.evaluation.tasks import evaluate_predictor
    from tsdb.strategies import get_strategy
    from tsdb.training.loop import load_model, train_model

    from tsdb.cli.main import _quiet

    _quiet()     # a spawned worker: the CLI's warning filters again
    torch.set_num_threads(1)
    folder = out / "jobs" / job_name(job)
    done = folder / "metrics.json"
    identity = job_identity(cfg, job)
    if done.exists():
        cached = json.loads(done.read_text())
        changed = differences(cached.get("identity"), identity)
        if changed:
            raise TsdbError(f"finetune-bench: {folder} was made otherwise ({'; '.join(changed[:3])}); "
                            f"delete {folder} or choose a new --out")
        return cached
    depth_cfg = cfg.depth_config()
    val, test = _tasks(job["dataset"], depth_cfg.model.context_length, cfg.etth1_stride)
    task = val if job["split"] == "val" else test
    started, cpu = time.perf_counter(), time.process_time()
    arm = job["arm"]
    anchor = cfg.anchor_weight if arm.endswith("-anchor") else 0.0
    if arm in REFERENCES:
        model_dir = cfg.model_dir("e2e" if arm == "zero-shot-e2e" else "depth")
    elif arm == "scratch":
        model_dir = folder / "run"
        ft_cfg = finetune_config(depth_cfg, task.train, cfg.steps, job["lr"], job["seed"], progress=False)
        train_model(ft_cfg, task.train, model_dir, strategy=get_strategy(ft_cfg.model))
    else:
        model_dir = folder / "run"
        source, blocks = ((cfg.model_dir("e2e"), depth_cfg.model.n_blocks) if arm.startswith("convert")
                          else (cfg.model_dir("depth"), None))
        finetune(source, task.train, model_dir, steps=cfg.steps, lr=job["lr"], seed=job["seed"], anchor_weight=anchor,
                 num_blocks=blocks, progress=False)
    train_cpu = time.process_time() - cpu
    _, strategy, model = load_model(model_dir)
    metrics = evaluate_predictor(task, zero_shot_predictor(strategy, model, task.horizon, seed=job["seed"]),
                                 depth_cfg.model.context_length, cfg.num_samples)
    metrics.update(job=job, identity=identity, train_cpu_seconds=train_cpu, wall_seconds=time.perf_counter() - started,
                   cpu_seconds=time.process_time() - cpu)
    folder.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(metrics, indent=2))
    return metrics


def job_identity(cfg: FinetuneBenchConfig, job: dict) -> dict:
    """What a cached job's figures depend on beyond its name: the recipe and the sha256 of the
    weights it starts from (a retrained pretrained model at the same path is a new start)."""
    arm = job["arm"]
    starts = ["depth"] + (["e2e"] if arm.startswith("convert") or arm == "zero-shot-e2e" else [])
    weights = {}
    for name in starts:
        folder = cfg.model_dir(name)
        path = folder / "model.pt" if (folder / "model.pt").exists() else folder / WEIGHTS_FILE
        weights[f"{name}_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
    return {"steps": cfg.steps, "anchor_weight": cfg.anchor_weight, "num_samples": cfg.num_samples,
            "etth1_stride": cfg.etth1_stride, **weights}


def job_name(job: dict) -> str:
    lr = "" if job.get("lr") is None else f"-lr{job['lr']:g}"
    return f"{job['dataset']}/{job['split']}/{job['arm']}{lr}-seed{job['seed']}"


def _run_all(cfg: FinetuneBenchConfig, out: Path, jobs: list[dict], log) -> list[dict]:
    def logged(metrics) -> list[dict]:   # each job's figure as it arrives, in job order
        results = []
        for job, m in zip(jobs, metrics):
            results.append(m)
            log(f"[finetune-bench] {job_name(job)}: CRPS {m['crps']:.4f}")
        return results

    if cfg.workers == 1:
        return logged(run_job(cfg, out, j) for j in jobs)
    ctx = get_context("spawn")   # fresh interpreters: no torch thread pools inherited across fork
    os.environ.update({"OMP_NUM_THREADS": "1", "TSDB_NUM_THREADS": "1"})
    with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx) as pool:
        futures = [pool.submit(run_job, cfg, out, j) for j in jobs]
        return logged(f.result() for f in futures)


def run_finetune_bench(cfg: FinetuneBenchConfig, out: str | Path, report_dir: str | Path | None = None,
                       command: str | None = None, log=print) -> dict:
    """Every arm x dataset x seed, learning rates chosen on validation; writes ``results.json``
    and ``report.md`` to ``out`` (the jobs' runs stay there) and, if given, ``report_dir``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    unknown = sorted(set(cfg.arms) - set(ARMS) - set(REFERENCES))
    if unknown:
        raise TsdbError(f"finetune-bench: unknown arm {unknown[0]!r}; arms are {', '.join(ARMS + REFERENCES)}")
    trained = [a for a in cfg.arms if a in ARMS]
    # 1. validation: each arm that chooses its own lr, at every lr, first seed
    choosers = sorted({LR_FROM.get(a, a) for a in trained})
    val_jobs = [dict(dataset=d, split="val", arm=a, lr=lr, seed=cfg.seeds[0])
                for d in cfg.datasets for a in choosers for lr in cfg.lrs]
    val = _run_all(cfg, out, val_jobs, log)
    chosen = {}
    for d in cfg.datasets:
        for a in choosers:
            scores = {j["lr"]: m["crps"] for j, m in zip(val_jobs, val) if j["dataset"] == d and j["arm"] == a}
            chosen[f"{d}/{a}"] = min(scores, key=scores.get)
    # 2. test: every arm and seed at its chosen lr, plus the untouched pretrained models
    test_jobs = [dict(dataset=d, split="test", arm=a, lr=chosen[f"{d}/{LR_FROM.get(a, a)}"], seed=s)
                 for d in cfg.datasets for a in trained for s in cfg.seeds]
    test_jobs += [dict(dataset=d, split="test", arm=a, lr=None, seed=cfg.seeds[0])
                  for d in cfg.datasets for a in cfg.arms if a in REFERENCES]
    test = _run_all(cfg, out, test_jobs, log)
    results = {"config": cfg.model_dump(mode="json"), "chosen_lr": chosen,
               "validation": [dict(job=j, crps=m["crps"], mase=m["mase"]) for j, m in zip(val_jobs, val)],
               "test": summarize(test_jobs, test), "against_scratch": against_scratch(cfg, test_jobs, test),
               "load_average": os.getloadavg()[0],
               "command": command or f"tsdb finetune-bench --config {out / 'config.yaml'} --out {out}"}
    for folder in [out] + ([Path(report_dir)] if report_dir else []):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        (folder / "results.json").write_text(json.dumps(results, indent=2))
        (folder / "report.md").write_text(render(results))
    return results


def against_scratch(cfg: FinetuneBenchConfig, jobs: list[dict], metrics: list[dict]) -> dict:
    """Per dataset, every other arm against ``scratch``: each arm's per-window CRPS averaged over
    its seeds, then a paired bootstrap over test windows (windows of one series that overlap
    resampled together)."""
    from tsdb.bench.stats import bootstrap_blocks, paired_bootstrap

    context = cfg.depth_config().model.context_length
    out = {}
    for dataset in cfg.datasets:
        scores: dict[str, list[dict]] = {}
        for j, m in zip(jobs, metrics):
            if j["dataset"] == dataset and "window_scores" in m:
                scores.setdefault(j["arm"], []).append(m["window_scores"])
        if "scratch" not in scores:
            continue
        task = _tasks(dataset, context, cfg.etth1_stride)[1]
        blocks = bootstrap_blocks([e["item_id"] for e in task.test_data.input], task.horizon,
                                  task.info.get("stride"))
        crps = {a: np.mean([w["crps_num"] for w in ws], axis=0) for a, ws in scores.items()}
        den = scores["scratch"][0]["abs_target"]
        out[dataset] = {a: paired_bootstrap(c, crps["scratch"], den, blocks) for a, c in crps.items() if a != "scratch"}
    return out


def summarize(jobs: list[dict], metrics: list[dict]) -> dict:
    """Per dataset and arm: mean and std over seeds of CRPS and MASE, the per-seed figures, and
    the CPU seconds of training."""
    out: dict = {}
    for j, m in zip(jobs, metrics):
        cell = out.setdefault(j["dataset"], {}).setdefault(j["arm"], {"seeds": [], "crps": [], "mase": [],
                                                                        "train_cpu_seconds": [], "lr": j["lr"]})
        cell["seeds"].append(j["seed"])
        cell["crps"].append(m["crps"])
        cell["mase"].append(m["mase"])
        cell["train_cpu_seconds"].append(m["train_cpu_seconds"])
    for arms in out.values():
        for cell in arms.values():
            for k in ("crps", "mase"):
                cell[f"{k}_mean"] = float(np.mean(cell[k]))
                cell[f"{k}_std"] = float(np.std(cell[k], ddof=1)) if len(cell[k]) > 1 else 0.0
        if "scratch" in arms:
            for cell in arms.values():
                cell["crps_vs_scratch"] = cell["crps_mean"] / arms["scratch"]["crps_mean"]
    return out


def _pm(cell: dict, key: str, digits: int) -> str:
    """Mean +- std over seeds; a one-seed reference has no spread to show."""
    if len(cell[key]) == 1:
        return f"{cell[f'{key}_mean']:.{digits}f} (1 seed)"
    return f"{cell[f'{key}_mean']:.{digits}f} +- {cell[f'{key}_std']:.{digits}f}"


def render(results: dict) -> str:
    c = results["config"]
    lines = ["# Fine-tuning from the pretrained model, conversion and the anchor loss", "",
             f"Produced by: `{results['command']}` (`config.yaml` beside this report).", "",
             f"Pretrained models: depth `{c.get('depth_model') or str(c['pretrained_run']) + '/depth'}`, e2e "
             f"`{c.get('e2e_model') or str(c['pretrained_run']) + '/e2e'}`. Every trained arm: {c['steps']} steps per block, learning "
             f"rate chosen from {c['lrs']} on the validation windows with seed {c['seeds'][0]} (chosen: "
             + ", ".join(f"{k} {v:g}" for k, v in results["chosen_lr"].items())
             + "; the anchor and conversion arms take the fine-tuning arm's). "
             f"Test: seeds {c['seeds']}, {c['num_samples']} samples, ETTh1 every {c['etth1_stride']}th window. "
             f"Anchor: weight {c['anchor_weight']} times the block's loss at sigma_min. "
             "Mean +- std over seeds; CRPS = mean weighted quantile loss over q = 0.1..0.9.", ""]
    lines += ["CRPS / scratch [95% CI]: each arm's per-window CRPS averaged over its seeds against scratch's, "
              "a paired bootstrap over test windows; **lower** / **higher** where the interval of the difference "
              "excludes 0, else a tie.", ""]
    for dataset, arms in results["test"].items():
        paired = results.get("against_scratch", {}).get(dataset, {})
        lines += [f"## {dataset}", "", "| arm | lr | CRPS mean +- std | CRPS / scratch [95% CI] | MASE mean +- std | "
                  "per seed CRPS | train CPU s |", "|---|---|---|---|---|---|---|"]
        for arm, cell in arms.items():
            p = paired.get(arm)
            vs = (f"{p['ratio']:.3f} [{p['ratio_ci'][0]:.3f}, {p['ratio_ci'][1]:.3f}] "
                  + {"a": "**lower**", "b": "**higher**", "tie": "tie"}[p["verdict"]]) if p else \
                f"{cell.get('crps_vs_scratch', float('nan')):.3f}"
            lines.append(f"| {arm} | {'-' if cell['lr'] is None else format(cell['lr'], 'g')} | "
                         f"{_pm(cell, 'crps', 4)} | {vs} | {_pm(cell, 'mase', 3)} | "
                         + ", ".join(f"{x:.4f}" for x in cell["crps"])
                         + f" | {np.mean(cell['train_cpu_seconds']):.0f} |")
        lines.append("")
    lines += ["Validation CRPS (learning-rate choice):", ""]
    for v in results["validation"]:
        j = v["job"]
        lines.append(f"- {j['dataset']} {j['arm']} lr {j['lr']:g}: {v['crps']:.4f}")
    lines += ["", "Figures are written by `tsdb.pretrain.finetune_bench` from `results.json` in this folder."]
    return "\n".join(lines) + "\n"
