"""``tsdb bench covariates``: CRPS on vic_elec with and without the temperature covariate.

Two arms of the same depth-b4 model (``configs/bench/covariates.yaml``), same data and
per-block budget, differ only in ``model.num_covariates`` (0 vs 1 = Temperature); each arm
runs every seed of the spec's ``seeds`` (a few hundred steps per block leave seed-to-seed
differences of the size of the effect), and a paired bootstrap over the test windows sets
the two arms' seed-averaged scores side by side. Evaluation on the last 28 days (rolling
windows of 48 half-hours, stride 48), seasonal naive alongside. It runs through
:func:`tsdb.bench.experiment.run_experiment`, so finished arms are reused.

The covariate's horizon values are the observed temperatures of each test day: an oracle
temperature forecast. The gain measured is an upper bound on what a real day-ahead weather
forecast would give, not a deployable accuracy figure.
"""

from __future__ import annotations

import json
from pathlib import Path

from tsdb.bench.experiment import ExperimentSpec, compare, run_experiment
from tsdb.bench.stats import mean_std_text
from tsdb.config import packaged

CONFIG = packaged("configs", "bench", "covariates.yaml")
WITHOUT, WITH = "depth-b4", "depth-b4-temperature"


def covariates_spec(config: str | Path | None = None, steps: int | None = None, windows: int | None = None,
                    num_samples: int | None = None, model: dict | None = None,
                    seeds: list[int] | None = None) -> ExperimentSpec:
    """The benchmark's spec: its two arms (``WITHOUT``, ``WITH``), each run with every seed,
    with optional budget overrides (tests use a tiny one)."""
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
    if seeds is not None:
        data["seeds"] = list(seeds)
    if set(data["arms"]) != {WITHOUT, WITH}:
        raise ValueError(f"{config or CONFIG}: the covariates benchmark needs exactly the arms {WITHOUT} and {WITH}")
    return ExperimentSpec.model_validate(data)


def covariate_effect(results: dict, resamples: int) -> dict | None:
    """``WITH`` against ``WITHOUT``: per-seed CRPS and their ratio, the ratio of the seed
    means, and a paired bootstrap over the test windows of the seed-averaged scores."""
    arms = results["arms"]
    a, b = arms.get(WITH), arms.get(WITHOUT)
    if a is None or b is None:
        return None
    per_seed = {s: {"crps_without": b["per_seed"][s]["crps"], "crps_with": f["crps"],
                    "ratio": f["crps"] / b["per_seed"][s]["crps"]}
                for s, f in a.get("per_seed", {}).items() if s in b.get("per_seed", {})}
    boot = compare(results, WITH, WITHOUT, "with vs without the covariate", resamples)
    return {"covariate": "Temperature", "future_values": "observed (oracle forecast)", "seeds": per_seed,
            "mean_crps_without": b["crps"], "mean_crps_with": a["crps"], "mean_mase_without": b["mase"],
            "mean_mase_with": a["mase"], "ratio_of_mean_crps": a["crps"] / b["crps"],
            "ratios": [r["ratio"] for r in per_seed.values()], "bootstrap": boot}


def run_covariates_bench(out: str | Path = "reports/covariates", spec: ExperimentSpec | None = None,
                         root: str | None = None, only: list[str] | None = None, progress: bool = True,
                         log=print, command: str | None = None) -> dict:
    """Train and evaluate every arm (and seasonal naive) into ``out``; returns results.json's dict
    with a ``covariates`` summary (:func:`covariate_effect`), whose bootstrap also joins the
    ``comparisons`` the README shows."""
    spec = spec or covariates_spec()
    spec.base.train.progress = progress
    out = Path(out)
    results = run_experiment(spec, out, root=root, only=only, log=log, command=command or "tsdb bench covariates")
    effect = covariate_effect(results, spec.bootstrap_resamples)
    if effect is not None:
        results["covariates"] = effect
        results["comparisons"].append({**effect["bootstrap"], "headline": True})
        (out / "results.json").write_text(json.dumps(results, indent=2))
    write_covariates_report(spec, results, out)
    return results


def write_covariates_report(spec: ExperimentSpec, results: dict, out: Path) -> Path:
    arms = results["arms"]
    model, train = spec.base.model, spec.base.train
    lines = [
        "# Covariates: vic_elec with and without temperature", "",
        f"Produced by: `{results.get('command', 'tsdb bench covariates')}` (config `configs/bench/covariates.yaml`).", "",
        f"Task: `{spec.task.protocol}` on `{spec.task.dataset}`, horizon {results['task'].get('horizon')}, "
        f"the last {spec.task.windows} windows with stride {spec.task.stride} ({results['task']['num_windows']} "
        f"windows). Model: `{model.strategy}`, B = {model.n_blocks}, d_model {model.d_model}, {model.n_layers} "
        f"layers, context {model.context_length}, patch {model.patch_length}; {train.steps_per_block} steps per "
        f"block, batch {train.batch_size}; {spec.num_samples} samples, {model.sampler} with "
        f"{model.inference_steps} steps. The two arms share data, budget and seeds ({spec.seeds}; a seed sets "
        f"the initialisation and the training windows and noise); `{WITH}` adds Temperature as a known-future "
        "covariate (context channel + future-token input, normalized per window).", "",
        "**Oracle note.** The temperature over each forecast day is the *observed* temperature, i.e. a perfect "
        "temperature forecast. The gain below is an upper bound on what a real day-ahead weather forecast "
        "would give.", "",
        "Figures of the tsdb arms are mean ± std over seeds.", "",
        "| arm | seeds | CRPS | MASE | MAE | MSE | coverage 80% | train s | params |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v, d=4: "n/a" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))  # noqa: E731
    for name, f in arms.items():
        lines.append(f"| {name} | {len(f.get('seeds') or []) or 1} | {mean_std_text(f, 'crps', 4)} | "
                     f"{mean_std_text(f, 'mase', 3)} | {mean_std_text(f, 'mae', 1)} | {mean_std_text(f, 'mse', 0)} | "
                     f"{fmt(f.get('coverage80'), 3)} | {fmt(f.get('train_seconds'), 1)} | {fmt(f.get('params'))} |")
    cov = results.get("covariates")
    if cov:
        boot = cov["bootstrap"]
        verdict = "a tie" if boot["verdict"] == "tie" else f"{boot[boot['verdict']]} lower"
        lines += ["", "| seed | CRPS without | CRPS with | with / without |", "|---|---|---|---|"]
        lines += [f"| {s} | {r['crps_without']:.4f} | {r['crps_with']:.4f} | {r['ratio']:.3f} |"
                  for s, r in cov["seeds"].items()]
        lines += ["", f"Mean over {len(cov['seeds'])} seed(s): CRPS {cov['mean_crps_without']:.4f} without, "
                      f"{cov['mean_crps_with']:.4f} with temperature, ratio of means "
                      f"**{cov['ratio_of_mean_crps']:.3f}** (per seed {min(cov['ratios']):.3f} to "
                      f"{max(cov['ratios']):.3f}); MASE {cov['mean_mase_without']:.3f} -> {cov['mean_mase_with']:.3f}.",
                  "", f"Paired bootstrap over the {results['task']['num_windows']} test windows ({boot['resamples']} "
                      f"resamples, seed-averaged scores): with / without {boot['ratio']:.3f} "
                      f"[{boot['ratio_ci'][0]:.3f}, {boot['ratio_ci'][1]:.3f}] ({int(100 * boot['level'])}% "
                      f"interval): {verdict}."]
    if (out / "crps.png").exists():
        lines += ["", "![CRPS per arm](crps.png)"]
    lines += ["", "Figures are written by `tsdb.bench.covariates` from `results.json` in this folder."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
