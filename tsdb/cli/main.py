"""The ``tsdb`` command line.

Subcommands: demo, train, evaluate, forecast, bench, ablate, tune, datasets, export, stream,
pretrain, pretrain-eval, finetune, finetune-bench.
User errors print one line (``tsdb: error: ...``) and exit 2; no tracebacks. Flags and files
are checked (``tsdb.cli.preflight``) before torch, lightning or gluonts are imported, so an
error answers in well under a second. SIGTERM/SIGINT stop long work after saving what can be
resumed and exit 143/130 with the command that resumes it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from tsdb import signals
from tsdb.cli import preflight
from tsdb.cli.preflight import OneLineParser, nonnegative_int, positive_int
from tsdb.errors import Interrupted, TsdbError


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


def _training_data(args, cfg):
    """The data ``tsdb train`` fits: the user's table, or a dataset's protocol training split
    (a benchmark's test part is never trained on), and the record of it for ``RUN/data.json``."""
    from tsdb.data.readers import read_long
    if getattr(args, "input", None):
        record = preflight.input_fingerprint(args) | {"held_out": 0}
        return read_long(args.input, item_id=args.item_id, timestamp=args.timestamp, target=args.target,
                         freq=args.freq), record
    from tsdb.bench.experiment import TaskSpec, build_task
    from tsdb.evaluation.run import PROTOCOLS
    name = cfg.data.dataset
    protocol = PROTOCOLS.get(name, "rolling")
    task = build_task(TaskSpec(protocol=protocol, dataset=name, horizon=cfg.model.horizon,
                               lookback=cfg.model.context_length, stride=cfg.model.horizon),
                      getattr(args, "data_root", None))
    held_out = {"m4-hourly": task.horizon, "rolling": cfg.model.horizon}.get(protocol)
    return task.train, {"source": "dataset", "dataset": name, "protocol": protocol, "held_out": held_out}


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
    data, record = _training_data(args, cfg)   # checked here; workers of a parallel run load it again
    preflight.record_training_data(Path(args.out), record)
    if args.devices > 1:
        from tsdb.training.parallel import train_parallel
        summary = train_parallel(cfg, args.out, args.devices, _data_argv(args))
        print(f"trained {len(summary['units'])} unit(s) on {args.devices} workers in "
              f"{summary['wall_seconds']:.0f}s wall; model in {args.out}")
        return
    from tsdb.training.loop import train_model
    model, summary = train_model(cfg, data, args.out, blocks=args.block)
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
    from tsdb.evaluation.run import evaluate_run
    path, metrics = evaluate_run(args.run, num_samples=args.num_samples, num_steps=args.steps,
                                 windows=args.windows, stride=args.stride, progress=not args.no_progress)
    print(f"{metrics['task']}: CRPS {metrics['crps']:.4f}  MASE {metrics['mase']:.3f}  MSE {metrics['mse']:.4f}  "
          f"MAE {metrics['mae']:.4f} over {metrics['num_windows']} windows -> {path}")
    if metrics["in_sample"]:
        print(f"note: {metrics['in_sample_reason']}", file=sys.stderr)


def cmd_forecast(args) -> None:
    from tsdb.cli.forecast import forecast_csv
    out = forecast_csv(args)
    print(f"wrote {out['csv']} and {out['png']}")


def cmd_bench(args) -> None:
    from tsdb.cli.bench import run_bench
    run_bench(args, _command_line())


_ARGV: list[str] | None = None    # the words of this invocation (main's argv)


def _command_line() -> str:
    import shlex
    return " ".join(["tsdb", *(shlex.quote(w) for w in (sys.argv[1:] if _ARGV is None else _ARGV))])


def cmd_ablate(args) -> None:
    from tsdb.bench.experiment import ExperimentSpec, run_experiment
    spec = ExperimentSpec.from_yaml(args.config)
    spec.base.train.progress = not args.no_progress
    out = Path(args.out or f"reports/{spec.name}")
    run_experiment(spec, out, root=args.data_root, only=args.arms, command=_command_line())
    print(f"results in {out / 'results.json'}, report in {out / 'report.md'}")


def cmd_tune(args) -> None:
    from tsdb.bench.tune import run_tune
    from tsdb.bench.tune_spec import load_tune_spec
    spec = load_tune_spec(args.config)     # (checked by preflight)
    out = Path(args.out or f"reports/tune-{spec.name}")
    run_tune(spec, out, args.runs or f"runs/tune-{spec.name}", root=args.data_root, only=args.trials,
             command=_command_line())
    print(f"results in {out / 'results.json'}, chosen settings in {out / 'chosen.yaml'}")


def cmd_report(args) -> None:
    from tsdb.bench.experiment import ExperimentSpec, write_report
    out = Path(args.dir)
    if (out / "results.json").exists():
        results = json.loads((out / "results.json").read_text())
        if results.get("benchmark") == "streamed-accuracy":   # its own report, no spec.yaml
            from tsdb.bench.streamed_accuracy import write_report as write_streamed
            print(f"wrote {write_streamed(results, out)}")
            return
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
    out = export_run(args.run, args.out or Path(args.run) / "onnx", progress=not args.no_progress)
    print(f"exported to {out}")


def cmd_stream(args) -> None:
    from tsdb.cli.stream import run_stream
    src = open(args.input, encoding="utf-8", errors="replace") if args.input else sys.stdin
    run_stream(args.model_dir, src, sys.stdout, state_path=args.state, quantiles=args.quantiles,
               num_samples=args.num_samples, seed=args.seed, freq=args.freq,
               checkpoint_every=args.checkpoint_every, batch_size=args.batch_size, refresh=args.refresh,
               intra_op_num_threads=args.threads or 1)


# -- parser -------------------------------------------------------------------------------

THREADS_HELP = ("CPU threads for torch / onnxruntime (env TSDB_NUM_THREADS); default: the cores not already "
                "busy (cores minus the 1-minute load average, at least 1), so a loaded machine is not oversubscribed")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="tsdb", description="Probabilistic forecasting with DiffusionBlocks.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("demo", help="train a small depth-split model on vic_elec and evaluate it")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--steps", type=positive_int, default=None, help="training steps per block")
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
    s.add_argument("--steps", type=positive_int, help="override train.steps_per_block")
    s.add_argument("--strategy", help="override model.strategy")
    s.add_argument("--block", type=nonnegative_int, nargs="+",
                   help="train only these block indices (cluster array jobs)")
    s.add_argument("--devices", type=positive_int, default=1,
                   help="train this many blocks at once in parallel workers")
    s.add_argument("--ddp", type=positive_int, default=None,
                   help="data-parallel processes within each block (Lightning DDP)")
    s.add_argument("--no-progress", action="store_true")
    data_flags(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("assemble", help="check that every block of a run finished and join them")
    s.add_argument("run")
    s.set_defaults(func=cmd_assemble)

    s = sub.add_parser("evaluate", help="score a trained run on the data it was trained for -> RUN/evaluation.json")
    s.add_argument("run")
    s.add_argument("--num-samples", type=positive_int, default=100)
    s.add_argument("--steps", type=positive_int, default=None, help="inference steps K")
    s.add_argument("--windows", type=positive_int, default=1, help="rolling windows (non-benchmark datasets)")
    s.add_argument("--stride", type=positive_int, default=None)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("forecast", help="forecast a CSV: quantiles CSV + PNG fan chart")
    s.add_argument("--run", help="trained run directory; omit to train a quick model on the input")
    s.add_argument("--horizon", type=positive_int, required=True)
    s.add_argument("--out", required=True, help="output folder (its run/ must hold a model of this input or none)")
    s.add_argument("--num-samples", type=positive_int, default=100)
    s.add_argument("--steps", type=positive_int, default=None,
                   help="training steps per block when no --run (default: chosen from the data)")
    s.add_argument("--pretrained", default=None,
                   help="start from a pretrained model (checkpoint folder or run directory) instead of training")
    s.add_argument("--finetune-steps", type=nonnegative_int, default=0,
                   help="with --pretrained: fine-tune each block this many steps on the input first (0: zero-shot)")
    s.add_argument("--finetune-lr", type=float, default=3e-4)
    s.add_argument("--seed", type=preflight.seed, default=0,
                   help="seed of the quick model's training and of the forecast's samples (no --run)")
    s.add_argument("--covariates", default=None,
                   help="comma-separated known-future covariate columns; after each series' last observed "
                        "target the table holds >= --horizon rows with them given and the target empty")
    s.add_argument("--no-progress", action="store_true", help="no training progress bars (logs, CI)")
    data_flags(s)
    s.set_defaults(func=cmd_forecast)

    for name, func, helptext in (("bench", cmd_bench, "run a named benchmark (every arm side by side)"),
                                 ("ablate", cmd_ablate, "train and evaluate a grid of split strategies")):
        s = sub.add_parser(name, help=helptext)
        if name == "bench":
            from tsdb.cli.bench import PROGRAMS
            s.add_argument("name", help="a tiered benchmark (m4-hourly, etth1: configs/bench/NAME-TIER.yaml) "
                                        f"or a program ({', '.join(PROGRAMS)})")
            s.add_argument("--tier", default="quick", choices=["quick", "full"])
            s.add_argument("--config", help="override the benchmark's YAML")
            s.add_argument("--strategy", default="depth",
                           help="streaming benchmark only: the strategy to stream (any that streams)")
            s.add_argument("--against", default="8ad1f17",
                           help="sampling benchmark only: the git revision to time against")
            s.add_argument("--updates", type=positive_int, default=1_000_000,
                           help="soak only: streamed updates")
            s.add_argument("--device", choices=["cpu", "cuda"],
                           help="memory and gpu benchmarks: where to train (gpu default: cuda; cpu with --tiny)")
            s.add_argument("--tiny", action="store_true", help="gpu benchmark only: a tiny config (seconds on CPU)")
        else:
            s.add_argument("--config", required=True)
        s.add_argument("--out", default=None)
        s.add_argument("--arms", nargs="*", help="run only these arms")
        s.add_argument("--data-root", default=None)
        s.add_argument("--no-progress", action="store_true")
        s.set_defaults(func=func)

    s = sub.add_parser("tune", help="choose an arm's settings on the validation windows (never the test windows)")
    s.add_argument("--config", required=True, help="a tuning spec, e.g. configs/tune/m4-hourly-proxy.yaml")
    s.add_argument("--out", default=None, help="report folder (default reports/tune-NAME)")
    s.add_argument("--runs", default=None, help="trained models (default runs/tune-NAME; resumable)")
    s.add_argument("--trials", nargs="*", help="run only these variants (no search)")
    s.add_argument("--data-root", default=None)
    s.set_defaults(func=cmd_tune)

    s = sub.add_parser("report", help="re-render report.md and plots from a results.json")
    s.add_argument("dir")
    s.set_defaults(func=cmd_report)

    from tsdb.pretrain.cli import add_subcommands as add_pretrain_subcommands
    add_pretrain_subcommands(sub, data_flags)   # pretrain, pretrain-eval, finetune, finetune-bench

    s = sub.add_parser("export", help="export a trained run to ONNX with explicit streaming state")
    s.add_argument("run")
    s.add_argument("--out", default=None)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("stream", help="online forecasting: NDJSON observations in, NDJSON forecasts out")
    s.add_argument("model_dir")
    s.add_argument("--input", help="NDJSON file (default: stdin)")
    s.add_argument("--state", help="state checkpoint file (resumed if it exists)")
    s.add_argument("--quantiles", type=preflight.quantiles, default=(0.1, 0.5, 0.9),
                   help="comma-separated quantile levels in (0, 1)")
    s.add_argument("--num-samples", type=positive_int, default=100)
    s.add_argument("--seed", type=preflight.seed, default=0)
    s.add_argument("--freq", default=None, help="expected step between timestamps (default: from the data)")
    s.add_argument("--checkpoint-every", type=positive_int, default=100, help="records between state checkpoints")
    s.add_argument("--batch-size", type=positive_int, default=1, help="records grouped into one update")
    s.add_argument("--refresh", choices=("context", "warmup", "none"), default="context",
                   help="context (default): each forecast is rebuilt from the series' last context_length values, "
                        "the forecast the model was evaluated with (one context pass per forecast); warmup / none: "
                        "forecasts from the sliding state, O(1) but less accurate (reports/streamed-accuracy)")
    s.set_defaults(func=cmd_stream)
    for s in sub.choices.values():
        s.add_argument("--threads", type=positive_int, default=None, help=THREADS_HELP)
    return p


def resolve_threads(flag: int | None) -> int:
    """``--threads``, else ``$TSDB_NUM_THREADS``, else the cores not already busy (at least 1)."""
    if flag:
        return flag
    env = os.environ.get("TSDB_NUM_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise TsdbError(f"TSDB_NUM_THREADS={env!r} is not a positive integer; unset it or use --threads N")
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, int(cores - os.getloadavg()[0])))


def _set_threads(n: int) -> None:
    """Every library that sizes a thread pool reads these at import; torch is set again if loaded."""
    os.environ["TSDB_NUM_THREADS"] = str(n)   # block-parallel workers inherit it
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "POLARS_MAX_THREADS"):
        os.environ[var] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    global _ARGV
    _ARGV = argv
    args = build_parser().parse_args(argv)
    try:
        preflight.check(args)                   # before any heavy import
        if args.command not in ("datasets", "report"):
            _set_threads(resolve_threads(args.threads))
            signals.install_sigterm()
        _quiet()
        args.func(args)
    except TsdbError as e:
        print(f"tsdb: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"tsdb: error: {e.strerror}: {e.filename}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"tsdb: stopped by {_one_line(e)}; resume with: {_command_line()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"tsdb: interrupted (SIGINT); resume with: {_command_line()}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
