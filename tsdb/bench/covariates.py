"""``tsdb bench covariates``: CRPS on vic_elec with and without the temperature covariate.

Two arms of the same depth-b4 model (``configs/bench/covariates.yaml``), same data and
per-block budget, differ only in ``model.num_covariates`` (0 vs 1 = Temperature); each pair
is trained and evaluated with several seeds (``SEEDS``; arm ``<name>-seed<s>``), because a
few hundred steps per block leave seed-to-seed differences of the size of the effect.
Evaluation on the last 28 days (rolling windows of 48 half-hours, stride 48), seasonal naive
alongside. It runs through :func:`tsdb.bench.experiment.run_experiment`, so finished arms are reused.

The covariate's horizon values are the observed temperatures of each test day: an oracle
temperature forecast. The gain measured is an upper bound on what a real day-ahead weather
forecast would give, not a deployable accuracy figure.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from tsdb.bench.experiment import ExperimentSpec, run_experiment
from tsdb.config import packaged

CONFIG = packaged("configs", "bench", "covariates.yaml")
WITHOUT, WITH = "depth-b4", "depth-b4-temperature"
SEEDS = (0, 1, 2)


def covariates_spec(config: str | Path | None = None, steps: int | None = None, windows: int | None = None,
                    num_samples: int | None = None, model: dict | None = None,
                    seeds: tuple[int, ...] = SEEDS) -> ExperimentSpec:
    """The benchmark's spec: its two arms (``WITHOUT``, ``WITH``) once per seed, with optional
    budget overrides (tests use a tiny one)."""
    spec = ExperimentSpec.from_yaml(config or CONFIG)
    data = spec.model_dump()
    if steps is not None:
        train = data["base"]["train"]
        train.update(steps_per_block=steps, warmup_steps=min(train["warmup_steps"], steps))
    if model:
        data["base"]["model"].update(model)
    if windows is not None:
        data["task"]["windows"] = windows
    if num_samples is not None:
        data["num_samples"] = num_samples
    templates = data["arms"]
    if set(templates) != {WITHOUT, WITH}:
        raise ValueError(f"{config or CONFIG}: the covariates benchmark needs exactly the arms {WITHOUT} and {WITH}")
    data["arms"] = {f"{name}-seed{s}": {**over, "train": {**over.get("train", {}), "seed": s}}
                    for s in seeds for name, over in templates.items()}
    return ExperimentSpec.model_validate(data)


def run_covariates_bench(out: str | Path = "reports/covariates", spec: ExperimentSpec | None = None,
                         root: str | None = None, only: list[str] | None = None, progress: bool = True,
                         log=print, command: str | None = None) -> dict:
    """Train and evaluate every arm (and seasonal naive) into ``out``; returns results.json's dict
    with a ``covariates`` summary (per seed and mean CRPS with/without, their ratio)."""
    spec = spec or covariates_spec()
    spec.base.train.progress = progress
    out = Path(out)
    results = run_experiment(spec, out, root=root, only=only, log=log, command=command or "tsdb bench covariates")
    arms = results["arms"]
    per_seed = {}
    for name in arms:
        if name.startswith(f"{WITHOUT}-seed"):
            seed = name.rsplit("-seed", 1)[1]
            a, b = arms[name], arms.get(f"{WITH}-seed{seed}")
            if b is not None:
                per_seed[seed] = {"crps_without": a["crps"], "crps_with": b["crps"], "ratio": b["crps"] / a["crps"],
                                  "mase_without": a["mase"], "mase_with": b["mase"]}
    if per_seed:
        rows = per_seed.values()
        mean = {k: statistics.fmean(r[k] for r in rows) for k in ("crps_without", "crps_with", "mase_without",
                                                                   "mase_with")}
        results["covariates"] = {
            "covariate": "Temperature", "future_values": "observed (oracle forecast)", "seeds": per_seed,
            **{f"mean_{k}": v for k, v in mean.items()},
            "ratio_of_mean_crps": mean["crps_with"] / mean["crps_without"],
            "ratios": [r["ratio"] for r in rows],
        }
        (out / "results.json").write_text(json.dumps(results, indent=2))
    write_covariates_report(spec, results, out)
    return results


def write_covariates_report(spec: ExperimentSpec, results: dict, out: Path) -> Path:
    arms = results["arms"]
    model, train = spec.base.model, spec.base.train
    lines = [
        "# Covariates: vic_elec with and without temperature", "",
        "Produced by: `tsdb bench covariates` (config `configs/bench/covariates.yaml`).", "",
        f"Task: `{spec.task.protocol}` on `{spec.task.dataset}`, horizon {results['task'].get('horizon')}, "
        f"the last {spec.task.windows} windows with stride {spec.task.stride} ({results['task']['num_windows']} "
        f"windows). Model: `{model.strategy}`, B = {model.n_blocks}, d_model {model.d_model}, {model.n_layers} "
        f"layers, context {model.context_length}, patch {model.patch_length}; {train.steps_per_block} steps per "
        f"block, batch {train.batch_size}; {spec.num_samples} samples, {model.sampler} with "
        f"{model.inference_steps} steps. Each pair of arms (`{WITHOUT}-seedS`, `{WITH}-seedS`) shares data, seed "
        "and budget; the second adds Temperature as a known-future covariate (context channel + future-token "
        "input, normalized per window).", "",
        "**Oracle note.** The temperature over each forecast day is the *observed* temperature, i.e. a perfect "
        "temperature forecast. The gain below is an upper bound on what a real day-ahead weather forecast "
        "would give.", "",
        "| arm | CRPS | MASE | MAE | MSE | coverage 80% | train s | params |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v, d=4: "n/a" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))  # noqa: E731
    for name, f in arms.items():
        lines.append(f"| {name} | {fmt(f['crps'])} | {fmt(f['mase'], 3)} | {fmt(f['mae'], 1)} | "
                     f"{fmt(f['mse'], 0)} | {fmt(f.get('coverage80'), 3)} | {fmt(f.get('train_seconds'), 1)} | "
                     f"{fmt(f.get('params'))} |")
    cov = results.get("covariates")
    if cov:
        lines += ["", "| seed | CRPS without | CRPS with | with / without |", "|---|---|---|---|"]
        lines += [f"| {s} | {r['crps_without']:.4f} | {r['crps_with']:.4f} | {r['ratio']:.3f} |"
                  for s, r in cov["seeds"].items()]
        lines += ["", f"Mean over {len(cov['seeds'])} seed(s): CRPS {cov['mean_crps_without']:.4f} without, "
                      f"{cov['mean_crps_with']:.4f} with temperature, ratio of means "
                      f"**{cov['ratio_of_mean_crps']:.3f}** (per seed {min(cov['ratios']):.3f} to "
                      f"{max(cov['ratios']):.3f}); MASE {cov['mean_mase_without']:.3f} -> {cov['mean_mase_with']:.3f}."]
    if (out / "crps.png").exists():
        lines += ["", "![CRPS per arm](crps.png)"]
    lines += ["", "Figures are written by `tsdb.bench.covariates` from `results.json` in this folder."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
