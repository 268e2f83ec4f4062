"""``tsdb tune``: choose an arm's settings on the protocol's validation windows only.

A tuning spec (``tsdb/configs/tune/*.yaml``) names a benchmark config and one of its arms.
The benchmark's task is rebuilt on its **validation** split (M4 Hourly: the last 48 points
of every training series; ETTh1: the validation border; rolling protocols: the window
before the test windows; see ``tsdb.evaluation.tasks``), so the test windows are never read.
Every trial is the arm's config with overrides, trained on the validation task's training
part and scored there (CRPS, MASE, MSE, MAE) for each seed; the objective (the spec's
``objective``) is the mean validation CRPS, or the mean validation MASE, over the seeds.
Each trial is also compared with the spec's first variant (the reference, normally the
bench's settings) by a paired bootstrap over the validation windows of their seed-averaged
objective, so the report says whether a trial's difference from the settings the bench
runs is outside the noise.

Trials come from two sources, in this order:

- ``variants``: named override sets (an ablation of ideas, each measured);
- ``search``: an optuna TPE search over ``space`` (``"model.patch_length": {choices: [...]}``,
  ``"train.lr": {low: ..., high: ..., log: true}``), on top of the best variant.

Peers of the benchmark named in ``peers`` are scored on the same validation windows, as a
reference. ``OUT`` (default ``reports/tune-<name>``) gets ``results.json`` (every trial,
per seed, with train/eval CPU and wall seconds), ``report.md`` and ``chosen.yaml`` (the
chosen overrides of the arm). Trained models go to ``RUNS`` (default ``runs/tune-<name>``,
not committed); a trial whose training and inference settings were run before is reused,
and trials differing only in inference settings (``num_steps``, ``sampler``) share one
trained model.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import yaml
from pydantic import ValidationError

from tsdb.bench.experiment import ExperimentSpec, build_task, run_baseline, torch_predictor
from tsdb.bench.stats import bootstrap_blocks, metric_bootstrap
from tsdb.bench.tune_spec import TuneSpec, merge, nest
from tsdb.config import ExperimentConfig, ModelConfig, TrainConfig
from tsdb.errors import TsdbError
from tsdb.evaluation.peers import run_peer
from tsdb.evaluation.tasks import EvalTask, evaluate_predictor
from tsdb.pretrain.train import cpu_seconds as _cpu

# model fields that only change inference: trials differing in these share a trained model
INFERENCE_FIELDS = ("num_steps", "sampler", "num_samples")
FIGURES = ("crps", "mase", "mse", "mae", "coverage80")


# config fields added after trials were first cached: at their defaults they change nothing
# (a new field never changes what its default does), so they stay out of the cache keys and
# the runs cached before them are found again
NEWER_FIELDS = {"train": ("scale_weighting",), "model": ("location_window", "seasonal_prior")}
SECTIONS = {"train": TrainConfig, "model": ModelConfig}


def _key(data: dict) -> str:
    """The cache key of a dumped config (sections ``model``, ``train``, ... plus extras)."""
    def lean(section: str, values):
        newer = NEWER_FIELDS.get(section, ())
        if not isinstance(values, dict) or not newer:
            return values
        return {f: v for f, v in values.items() if f not in newer or v != SECTIONS[section].model_fields[f].default}
    data = {section: lean(section, values) for section, values in data.items()}
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def training_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with the inference-only fields at their defaults (the trained model's identity)."""
    defaults = ExperimentConfig().model
    return cfg.with_overrides(model={f: getattr(defaults, f) for f in INFERENCE_FIELDS},
                              train={"progress": False})


class Tuner:
    """Runs trials of one spec on the validation task, caching every (config, seed)."""

    def __init__(self, spec: TuneSpec, runs: Path, root: str | None = None, log: Callable = print):
        self.spec, self.runs, self.log = spec, Path(runs), log
        self.bench = ExperimentSpec.from_yaml(spec.bench)
        if spec.arm not in self.bench.arms:
            raise TsdbError(f"{spec.bench} has no arm {spec.arm!r}; arms: {sorted(self.bench.arms)}")
        task_spec = self.bench.task.model_copy(update={**spec.task, "split": "val"})
        self.task_spec = task_spec
        self.task: EvalTask = build_task(task_spec, root)
        self.task.window_scores = True
        items = [entry.get("item_id") for entry in self.task.test_data.input]
        self.blocks = bootstrap_blocks(items, self.task.horizon, self.task.info.get("stride", task_spec.stride))
        self.abs_target: list[float] | None = None
        self.trials: dict[str, dict] = {}

    def config(self, overrides: dict) -> ExperimentConfig:
        return self.bench.arm_config(self.spec.arm).with_overrides(**merge(self.spec.overrides, overrides))

    def trial(self, name: str, overrides: dict) -> dict:
        """Train and score ``overrides`` for every seed (cached); the trial's record."""
        cfg = self.config(overrides)
        seeds = {}
        for seed in self.spec.seeds:
            seeds[str(seed)] = self._seed(cfg.with_overrides(train={"seed": seed}))
        record = {"name": name, "overrides": overrides, "config": cfg.model_dump(), "seeds": seeds}
        for f in FIGURES:
            values = [s[f] for s in seeds.values()]
            record[f] = float(np.mean(values))
            record[f"{f}_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        for f in ("train_cpu_seconds", "eval_cpu_seconds", "train_wall_seconds", "eval_wall_seconds"):
            record[f] = float(np.mean([s[f] for s in seeds.values()]))
        # per-window CRPS numerators and MASE averaged over seeds: what the bootstrap against the reference resamples
        for key in ("crps_num", "mase"):
            record[f"window_{key}"] = np.round(np.mean([s["window_scores"][key] for s in seeds.values()],
                                                       axis=0), 9).tolist()
        self.abs_target = next(iter(seeds.values()))["window_scores"]["abs_target"]
        seeds = {k: {f: v for f, v in s.items() if f != "window_scores"} for k, s in seeds.items()}
        record["seeds"] = seeds
        self.trials[name] = record
        self.log(f"[tune {self.spec.name}] {name}: val CRPS {record['crps']:.4f} (sd {record['crps_sd']:.4f}) "
                 f"MASE {record['mase']:.3f} MSE {record['mse']:.4f}  train {record['train_cpu_seconds']:.0f} "
                 f"CPU s/seed")
        return record

    def _seed(self, cfg: ExperimentConfig) -> dict:
        from tsdb.strategies import get_strategy
        from tsdb.training.loop import load_model, train_model

        train_cfg = training_config(cfg)
        run_dir = self.runs / "train" / _key(train_cfg.model_dump())
        eval_path = run_dir / f"val-{_key({**cfg.model_dump(), 'samples': self.spec.num_samples})}.json"
        if eval_path.exists():
            cached = json.loads(eval_path.read_text())
            if "mase" in cached.get("window_scores", {}):   # (older tsdb versions lack them: rescored)
                return cached
        cpu, wall = _cpu(), time.perf_counter()
        timing_path = run_dir / "train_seconds.json"
        if (run_dir / "model.pt").exists() and timing_path.exists():
            _, _, model = load_model(run_dir)
            timing = json.loads(timing_path.read_text())
        else:
            model, _ = train_model(train_cfg, self.task.train, run_dir)
            timing = {"train_cpu_seconds": _cpu() - cpu, "train_wall_seconds": time.perf_counter() - wall}
            timing_path.write_text(json.dumps(timing))
        model.eval()
        cpu, wall = _cpu(), time.perf_counter()
        strategy = get_strategy(cfg.model)
        metrics = evaluate_predictor(self.task, torch_predictor(strategy, model, seed=cfg.train.seed),
                                     cfg.model.context_length, self.spec.num_samples,
                                     num_covariates=cfg.model.num_covariates)
        out = {**{f: metrics[f] for f in FIGURES}, "num_windows": metrics["num_windows"], **timing,
               "eval_cpu_seconds": _cpu() - cpu, "eval_wall_seconds": time.perf_counter() - wall,
               "window_scores": {k: metrics["window_scores"][k] for k in ("crps_num", "abs_target", "mase")}}
        eval_path.write_text(json.dumps(out, indent=2))
        return out

    def versus(self, a: dict, b: dict) -> dict:
        """Paired bootstrap of trial ``a``'s objective against ``b``'s over the validation windows
        (MASE: the mean of per-window MASE, so every window weighs 1)."""
        key = {"crps": "window_crps_num", "mase": "window_mase"}[self.spec.objective]
        return metric_bootstrap(self.spec.objective, a[key], b[key], self.abs_target, self.blocks)

    def peer(self, name: str) -> dict:
        path = self.runs / "peers" / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
        if name in self.bench.baselines:
            figures = run_baseline(self.bench, name, self.task)
        elif name in self.bench.peers:
            figures = run_peer(self.bench.peers[name], self.task, self.bench.base.model.context_length,
                               self.bench.base.train.seed, self.spec.num_samples)
        else:
            raise TsdbError(f"{self.spec.bench} has no baseline or peer {name!r}")
        figures = {k: v for k, v in figures.items() if k in FIGURES or k in ("cpu_seconds", "train_seconds")}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=2))
        return figures

    def search(self, start: dict) -> None:
        """optuna TPE over the spec's space, each trial on top of ``start`` (the best variant)."""
        import optuna

        space = self.spec.search.space
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="minimize",
                                    sampler=optuna.samplers.TPESampler(seed=self.spec.search.seed))

        def objective(trial) -> float:
            params = {}
            for key, p in space.items():
                if p.choices is not None:
                    params[key] = trial.suggest_categorical(key, p.choices)
                elif p.int:
                    params[key] = trial.suggest_int(key, int(p.low), int(p.high), log=p.log)
                else:
                    params[key] = trial.suggest_float(key, p.low, p.high, log=p.log)
            overrides = merge(start, nest(params))
            try:
                self.config(overrides)
            except (TsdbError, ValidationError) as e:   # e.g. a context not a multiple of the patch
                self.log(f"[tune {self.spec.name}] search-{trial.number}: skipped ({str(e).splitlines()[0]})")
                raise optuna.TrialPruned() from None
            return self.trial(f"search-{trial.number}", overrides)[self.spec.objective]

        study.optimize(objective, n_trials=self.spec.search.trials)


def run_tune(spec: TuneSpec, out: str | Path, runs: str | Path, root: str | None = None,
             only: list[str] | None = None, log: Callable = print, command: str | None = None) -> dict:
    """Run the spec's variants, then its search; write the report; returns the results."""
    started_cpu, started = _cpu(), time.perf_counter()
    tuner = Tuner(spec, Path(runs), root, log)
    log(f"[tune {spec.name}] validation task {tuner.task.name}: {tuner.task.num_windows} windows, "
        f"{len(tuner.task.train)} training series (test windows not read)")
    peers = {name: tuner.peer(name) for name in spec.peers}
    for name, overrides in spec.variants.items():
        if only and name not in only:
            continue
        tuner.trial(name, overrides)
    if spec.search.trials and not only:
        best = min(tuner.trials.values(), key=lambda t: t[spec.objective]) if tuner.trials else {"overrides": {}}
        tuner.search(best["overrides"])
    if not tuner.trials:
        raise TsdbError(f"no trial ran (variants: {sorted(spec.variants)}; --only {only})")
    chosen = min(tuner.trials.values(), key=lambda t: t[spec.objective])
    reference = next(iter(tuner.trials))
    for t in tuner.trials.values():
        if t["name"] != reference:
            t["vs_reference"] = tuner.versus(t, tuner.trials[reference])
    results = {
        "name": spec.name, "command": command or f"tsdb tune --config {spec.name}", "spec": spec.model_dump(),
        "task": {**tuner.task_spec.model_dump(), "num_windows": tuner.task.num_windows,
                 "info": tuner.task.info},
        "trials": tuner.trials, "peers": peers, "reference": reference, "objective": spec.objective,
        "windows": {"abs_target": tuner.abs_target, "block": tuner.blocks},
        "chosen": {"name": chosen["name"], "overrides": merge(spec.overrides, chosen["overrides"]),
                   "crps": chosen["crps"], "mase": chosen["mase"], "mse": chosen["mse"]},
        "cpu_seconds": _cpu() - started_cpu, "wall_seconds": time.perf_counter() - started,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "chosen.yaml").write_text(yaml.safe_dump(
        {"arm": spec.arm, "bench": spec.bench, "trial": chosen["name"],
         "validation": {k: chosen[k] for k in ("crps", "mase", "mse")},
         **merge(spec.overrides, chosen["overrides"])}, sort_keys=False))
    write_tune_report(results, out)
    return results


def _fmt(v: float, digits: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _compact(overrides: dict) -> str:
    items = [f"{k}={v}" for section in overrides.values() for k, v in section.items()]
    return ", ".join(items) or "(arm as in the bench)"


def _trials_cpu_seconds(trials: dict) -> float:
    """Training (once per trained model and seed) plus every evaluation, in CPU seconds."""
    trained, evals = {}, 0.0
    for t in trials.values():
        model = {k: v for k, v in t["config"]["model"].items() if k not in INFERENCE_FIELDS}
        for seed, s in t["seeds"].items():
            trained[_key({"model": model, "train": t["config"]["train"], "seed": seed})] = s["train_cpu_seconds"]
            evals += s["eval_cpu_seconds"]
    return sum(trained.values()) + evals


def _budget(config: dict) -> str:
    m, t = config["model"], config["train"]
    return (f"{t['steps_per_block']} x {m['n_blocks']}, batch {t['batch_size']}, context {m['context_length']}, "
            f"{m['sampler']} K={m['num_steps']}")


def _versus(trial: dict, name: str) -> str:
    """``ratio [lo, hi], verdict`` of a trial against the reference trial."""
    v = trial.get("vs_reference")
    if v is None:
        return "reference"
    word = {"a": f"{name} lower", "b": "reference lower", "tie": "tie"}[v["verdict"]]
    return f"{v['ratio']:.3f} [{v['ratio_ci'][0]:.3f}, {v['ratio_ci'][1]:.3f}], {word}"


def write_tune_report(results: dict, out: Path) -> Path:
    spec = results["spec"]
    task = results["task"]
    seeds = spec["seeds"]
    ref = results["reference"]
    objective = results.get("objective", "crps")
    metric = objective.upper()
    lines = [f"# tune-{results['name']}", "", f"Produced by: `{results['command']}`", "",
             f"Arm `{spec['arm']}` of `{spec['bench']}`, scored on the **validation** split of "
             f"`{task['protocol']}` / `{task['dataset']}` ({task['num_windows']} windows; the test windows are "
             f"not read). Every trial: seeds {seeds}, {spec['num_samples']} samples; common overrides: "
             f"{_compact(spec['overrides'])}. CRPS = mean weighted quantile loss 0.1..0.9, MASE on the sample "
             "median, MSE on the sample mean (gluonts.ev); mean over seeds, sd across seeds. CPU seconds "
             "are this process's (1 torch thread) per seed; the machine is shared, so wall time says little.", "",
             "Budget per seed: training steps per block x blocks, batch size, context length, sampler and "
             "its steps K; CPU seconds per seed (trials that differ only in inference share a trained model "
             "and its training seconds).", "",
             f"Objective: the lowest mean validation {metric} over the seeds chooses. {metric} / {ref}: the "
             f"trial's seed-averaged validation {metric} over that of `{ref}` (the reference: the spec's first "
             "variant), with a 95% paired bootstrap interval over the validation windows and its verdict (an "
             "interval containing 1 is a tie).", "",
             f"| trial | overrides | budget | val CRPS | sd | per seed | {metric} / {ref} [95% CI] | val MASE | val MSE "
             "| train CPU s | eval CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, t in results["trials"].items():
        per_seed = " / ".join(f"{s['crps']:.4f}" for s in t["seeds"].values())
        lines.append(f"| {name} | {_compact(t['overrides'])} | {_budget(t['config'])} | {_fmt(t['crps'])} | "
                     f"{_fmt(t['crps_sd'])} | {per_seed} | {_versus(t, name)} | {_fmt(t['mase'], 3)} | "
                     f"{_fmt(t['mse'], 4)} | {t['train_cpu_seconds']:.0f} | {t['eval_cpu_seconds']:.0f} |")
    if results["peers"]:
        best = results["chosen"]["crps"]
        lines += ["", "Peers on the same validation windows (the benchmark's settings), and the chosen trial's "
                  "CRPS over theirs (below 1: the chosen trial is better):", "",
                  "| peer | val CRPS | val MASE | val MSE | chosen / peer CRPS |", "|---|---|---|---|---|"]
        for name, f in results["peers"].items():
            lines.append(f"| {name} | {_fmt(f['crps'])} | {_fmt(f['mase'], 3)} | {_fmt(f['mse'], 4)} | "
                         f"{_fmt(best / f['crps'], 3)} |")
    c = results["chosen"]
    if len(seeds) < 3:
        lines += ["", f"{len(seeds)} seed(s) per trial: differences between trials smaller than their spread are not "
                  "established (a claimed difference needs at least 3 seeds)."]
    lines += ["", f"Chosen by validation {metric}: **{c['name']}** (val CRPS {_fmt(c['crps'])}, MASE {_fmt(c['mase'], 3)}, "
              f"MSE {_fmt(c['mse'], 4)}), overrides of the arm: {_compact(c['overrides'])} "
              f"(`chosen.yaml`); against `{ref}`: {_versus(results['trials'][c['name']], c['name'])}.", "",
              f"All trials: {_trials_cpu_seconds(results['trials']) / 60:.1f} CPU min (each trained model counted "
              f"once); this invocation: {results['cpu_seconds'] / 60:.1f} CPU min, {results['wall_seconds'] / 60:.1f} "
              "min wall (trials reused from earlier invocations cost ~0 here)."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path

