"""The ``tsdb`` command line.

Subcommands: demo, train, evaluate, forecast, bench, ablate, tune, datasets, export, stream.
User errors print one line (``tsdb: error: ...``) and exit 2; no tracebacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from tsdb.config import packaged
from tsdb.errors import TsdbError

BENCH_CONFIGS = packaged("configs", "bench")


def _quiet() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*json-handling.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*non-tuple sequence for multidimensional indexing.*")  # gluonts
    warnings.filterwarnings("ignore", message=".*validation_step.*val_dataloader.*")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notices
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "gluonts"):
        logging.getLogger(name).setLevel(logging.WARNING)


# -- subcommands --------------------------------------------------------------------------

def cmd_datasets(args) -> None:
    from tsdb.data.registry import describe, list_datasets
    if args.name:
        print(json.dumps(describe(args.name), indent=2, default=str))
        return
    for d in list_datasets():
        print(f"{d['name']:<15} {d.get('frequency', ''):<6} {d.get('description', '')}")


def _load_user_data(args):
    """Dataset from --dataset NAME or --input CSV/Parquet with column flags."""
    from tsdb.data.readers import read_long
    from tsdb.data.registry import load_dataset
    if getattr(args, "input", None):
        return read_long(args.input, item_id=args.item_id, timestamp=args.timestamp, target=args.target,
                         freq=args.freq)
    return load_dataset(args.dataset, getattr(args, "data_root", None))


def cmd_train(args) -> None:
    from tsdb.config import ExperimentConfig
    cfg = ExperimentConfig.from_yaml(args.config) if args.config else ExperimentConfig()
    if args.dataset:
        cfg = cfg.with_overrides(data={"dataset": args.dataset})
    if args.steps:
        cfg = cfg.with_overrides(train={"steps_per_block": args.steps})
    if args.strategy:
        cfg = cfg.with_overrides(model={"strategy": args.strategy})
    if args.ddp:
        cfg = cfg.with_overrides(train={"ddp_devices": args.ddp})
    cfg.train.progress = not args.no_progress
    if args.devices > 1:
        from tsdb.training.parallel import train_parallel
        summary = train_parallel(cfg, args.out, args.devices, _data_argv(args))
        print(f"trained {len(summary['units'])} unit(s) on {args.devices} workers in "
              f"{summary['wall_seconds']:.0f}s wall; model in {args.out}")
        return
    from tsdb.training.loop import train_model
    args.dataset = cfg.data.dataset
    model, summary = train_model(cfg, _load_user_data(args), args.out, blocks=args.block)
    print(f"trained {len(summary['units'])} unit(s) in {summary['train_seconds']:.0f}s; "
          f"largest unit training state {summary['train_state_bytes'] / 2**20:.2f} MiB; run in {args.out}")


def _data_argv(args) -> list[str]:
    """The data flags of ``args`` as command-line words, for worker processes."""
    out = ["--no-progress"]
    for flag in ("dataset", "input", "item_id", "timestamp", "target", "freq", "data_root"):
        value = getattr(args, flag, None)
        if value is not None:
            out += [f"--{flag.replace('_', '-')}", str(value)]
    return out


def cmd_assemble(args) -> None:
    from tsdb.training.loop import assemble_run
    summary = assemble_run(args.run)
    print(f"assembled {len(summary['units'])} unit(s) into {Path(args.run) / 'model.pt'}")


def cmd_evaluate(args) -> None:
    from tsdb.bench.experiment import TaskSpec, build_task, torch_predictor
    from tsdb.evaluation.tasks import evaluate_predictor
    from tsdb.training.loop import load_model
    cfg, strategy, model = load_model(args.run)
    protocol = {"m4_hourly": "m4-hourly", "etth1": "etth1"}.get(cfg.data.dataset, "rolling")
    task = build_task(TaskSpec(protocol=protocol, dataset=cfg.data.dataset, horizon=cfg.model.horizon,
                               lookback=cfg.model.context_length, windows=args.windows, stride=args.stride or
                               cfg.model.horizon))
    metrics = evaluate_predictor(task, torch_predictor(strategy, model, num_steps=args.steps),
                                 cfg.model.context_length, args.num_samples,
                                 num_covariates=cfg.model.num_covariates)
    path = Path(args.run) / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2))
    print(f"{task.name}: CRPS {metrics['crps']:.4f}  MASE {metrics['mase']:.3f}  MSE {metrics['mse']:.4f}  "
          f"MAE {metrics['mae']:.4f} over {metrics['num_windows']} windows -> {path}")


def cmd_forecast(args) -> None:
    from tsdb.cli.forecast import forecast_csv
    out = forecast_csv(args)
    print(f"wrote {out['csv']} and {out['png']}")


def cmd_bench(args) -> None:
    from tsdb.bench.experiment import ExperimentSpec, run_experiment
    if args.name == "streaming":
        from tsdb.bench.streaming import bench_config, run_streaming_bench
        default = f"reports/streaming-{args.strategy}"
        run_streaming_bench(args.out or default, model_cfg=bench_config(args.strategy))
        return
    if args.name == "sampling":
        from tsdb.bench.sampling import run_sampling_bench
        r = run_sampling_bench(args.out or "reports/sampling", against=args.against)
        print(f"speed-up {r['speedup']:.2f}x against {args.against}; report in {args.out or 'reports/sampling'}")
        return
    if args.name == "parallel":
        from tsdb.bench.parallel import run_parallel_bench
        run_parallel_bench(args.out or "reports/parallel")
        return
    if args.name == "covariates":
        from tsdb.bench.covariates import covariates_spec, run_covariates_bench
        out = Path(args.out or "reports/covariates")
        run_covariates_bench(out, covariates_spec(args.config), root=args.data_root, only=args.arms,
                             progress=not args.no_progress)
        print(f"results in {out / 'results.json'}, report in {out / 'report.md'}")
        return
    path = args.config or BENCH_CONFIGS / f"{args.name}-{args.tier}.yaml"
    if not args.config and not path.is_file():
        known = sorted({p.name.removesuffix(".yaml").rsplit("-", 1)[0] for p in BENCH_CONFIGS.iterdir()})
        raise TsdbError(f"no benchmark {args.name!r} at tier {args.tier!r}; known: {known + ['streaming']}")
    spec = ExperimentSpec.from_yaml(path)
    spec.base.train.progress = not args.no_progress
    out = Path(args.out or f"reports/{spec.name}")
    run_experiment(spec, out, root=args.data_root, only=args.arms, command=_command_line())
    print(f"results in {out / 'results.json'}, report in {out / 'report.md'}")


def _command_line() -> str:
    return " ".join(["tsdb", *sys.argv[1:]])


def cmd_ablate(args) -> None:
    from tsdb.bench.experiment import ExperimentSpec, run_experiment
    spec = ExperimentSpec.from_yaml(args.config)
    spec.base.train.progress = not args.no_progress
    out = Path(args.out or f"reports/{spec.name}")
    run_experiment(spec, out, root=args.data_root, only=args.arms, command=_command_line())
    print(f"results in {out / 'results.json'}, report in {out / 'report.md'}")


def cmd_tune(args) -> None:
    from tsdb.bench.tune import load_tune_spec, run_tune
    spec = load_tune_spec(args.config)
    out = Path(args.out or f"reports/tune-{spec.name}")
    run_tune(spec, out, args.runs or f"runs/tune-{spec.name}", root=args.data_root, only=args.trials,
             command=_command_line())
    print(f"results in {out / 'results.json'}, chosen settings in {out / 'chosen.yaml'}")


def cmd_report(args) -> None:
    from tsdb.bench.experiment import ExperimentSpec, write_report
    out = Path(args.dir)
    if not (out / "results.json").exists() or not (out / "spec.yaml").exists():
        raise TsdbError(f"{out} has no results.json and spec.yaml; run `tsdb bench` or `tsdb ablate` first")
    results = json.loads((out / "results.json").read_text())
    write = write_report
    if "covariates" in results:   # the covariates benchmark has its own pairwise report
        from tsdb.bench.covariates import write_covariates_report as write
    path = write(ExperimentSpec.from_yaml(out / "spec.yaml"), results, out)
    print(f"wrote {path}")


def cmd_demo(args) -> None:
    from tsdb.cli.demo import run_demo
    run_demo(args.out, steps=args.steps)


def cmd_export(args) -> None:
    from tsdb.export.onnx import export_run
    out = export_run(args.run, args.out or Path(args.run) / "onnx")
    print(f"exported to {out}")


def cmd_stream(args) -> None:
    from tsdb.cli.stream import run_stream
    src = open(args.input) if args.input else sys.stdin
    quantiles = tuple(float(q) for q in args.quantiles.split(","))
    run_stream(args.model_dir, src, sys.stdout, state_path=args.state, quantiles=quantiles,
               num_samples=args.num_samples, seed=args.seed, freq=args.freq,
               checkpoint_every=args.checkpoint_every, batch_size=args.batch_size)


# -- parser -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tsdb", description="Probabilistic forecasting with DiffusionBlocks.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("demo", help="train a small depth-split model on vic_elec and evaluate it")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--steps", type=int, default=None, help="training steps per block")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("datasets", help="list the dataset registry or describe one dataset")
    s.add_argument("name", nargs="?")
    s.set_defaults(func=cmd_datasets)

    def data_flags(s):
        s.add_argument("--dataset", help="registry name (see `tsdb datasets`)")
        s.add_argument("--input", help="a long-format CSV or Parquet file instead of --dataset")
        s.add_argument("--item-id", default=None, help="item id column (omit for a single series)")
        s.add_argument("--timestamp", default="timestamp", help="timestamp column")
        s.add_argument("--target", default="target", help="target column")
        s.add_argument("--freq", default=None, help="pandas frequency alias, e.g. h, 30min, D")
        s.add_argument("--data-root", default=None, help="folder holding dataset files")

    s = sub.add_parser("train", help="train a model block by block into a run directory")
    s.add_argument("--config", help="YAML ExperimentConfig")
    s.add_argument("--out", required=True, help="run directory (resumable)")
    s.add_argument("--steps", type=int, help="override train.steps_per_block")
    s.add_argument("--strategy", help="override model.strategy")
    s.add_argument("--block", type=int, nargs="+", help="train only these block indices (cluster array jobs)")
    s.add_argument("--devices", type=int, default=1, help="train this many blocks at once in parallel workers")
    s.add_argument("--ddp", type=int, default=None, help="data-parallel processes within each block (Lightning DDP)")
    s.add_argument("--no-progress", action="store_true")
    data_flags(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("assemble", help="check that every block of a run finished and join them")
    s.add_argument("run")
    s.set_defaults(func=cmd_assemble)

    s = sub.add_parser("evaluate", help="evaluate a trained run on its dataset's protocol")
    s.add_argument("run")
    s.add_argument("--num-samples", type=int, default=100)
    s.add_argument("--steps", type=int, default=None, help="inference steps K")
    s.add_argument("--windows", type=int, default=1, help="rolling windows (non-benchmark datasets)")
    s.add_argument("--stride", type=int, default=None)
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("forecast", help="forecast a CSV: quantiles CSV + PNG fan chart")
    s.add_argument("--run", help="trained run directory; omit to train a quick model on the input")
    s.add_argument("--horizon", type=int, required=True)
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--num-samples", type=int, default=100)
    s.add_argument("--steps", type=int, default=None,
                   help="training steps per block when no --run (default: chosen from the data)")
    s.add_argument("--covariates", default=None,
                   help="comma-separated known-future covariate columns; after each series' last observed "
                        "target the table holds >= --horizon rows with them given and the target empty")
    data_flags(s)
    s.set_defaults(func=cmd_forecast)

    for name, func, helptext in (("bench", cmd_bench, "run a named benchmark (every arm side by side)"),
                                 ("ablate", cmd_ablate, "train and evaluate a grid of split strategies")):
        s = sub.add_parser(name, help=helptext)
        if name == "bench":
            s.add_argument("name", help="m4-hourly, etth1, parallel, streaming, covariates or sampling")
            s.add_argument("--tier", default="quick", choices=["quick", "full"])
            s.add_argument("--config", help="override the benchmark's YAML")
            s.add_argument("--strategy", default="depth",
                           help="streaming benchmark only: the strategy to stream (any that streams)")
            s.add_argument("--against", default="8ad1f17",
                           help="sampling benchmark only: the git revision to time against")
        else:
            s.add_argument("--config", required=True)
        s.add_argument("--out", default=None)
        s.add_argument("--arms", nargs="*", help="run only these arms")
        s.add_argument("--data-root", default=None)
        s.add_argument("--no-progress", action="store_true")
        s.set_defaults(func=func)

    s = sub.add_parser("tune", help="choose an arm's settings on the validation windows (never the test windows)")
    s.add_argument("--config", required=True, help="a tuning spec, e.g. configs/tune/m4-hourly.yaml")
    s.add_argument("--out", default=None, help="report folder (default reports/tune-NAME)")
    s.add_argument("--runs", default=None, help="trained models (default runs/tune-NAME; resumable)")
    s.add_argument("--trials", nargs="*", help="run only these variants (no search)")
    s.add_argument("--data-root", default=None)
    s.set_defaults(func=cmd_tune)

    s = sub.add_parser("report", help="re-render report.md and plots from a results.json")
    s.add_argument("dir")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("export", help="export a trained run to ONNX with explicit streaming state")
    s.add_argument("run")
    s.add_argument("--out", default=None)
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("stream", help="online forecasting: NDJSON observations in, NDJSON forecasts out")
    s.add_argument("model_dir")
    s.add_argument("--input", help="NDJSON file (default: stdin)")
    s.add_argument("--state", help="state checkpoint file (resumed if it exists)")
    s.add_argument("--quantiles", default="0.1,0.5,0.9", help="comma-separated quantile levels")
    s.add_argument("--num-samples", type=int, default=100)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--freq", default=None, help="expected step between timestamps (default: from the data)")
    s.add_argument("--checkpoint-every", type=int, default=100, help="records between state checkpoints")
    s.add_argument("--batch-size", type=int, default=1, help="records grouped into one update")
    s.set_defaults(func=cmd_stream)
    return p


def main(argv: list[str] | None = None) -> int:
    _quiet()
    if os.environ.get("TSDB_NUM_THREADS"):  # set by block-parallel workers
        import torch
        torch.set_num_threads(int(os.environ["TSDB_NUM_THREADS"]))
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except TsdbError as e:
        print(f"tsdb: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"tsdb: error: {e.strerror}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tsdb: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
