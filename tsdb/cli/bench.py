"""``tsdb bench NAME``: the benchmark programs, one registry.

Tiered benchmarks (``NAME-quick.yaml``, ``NAME-full.yaml`` in ``tsdb/configs/bench``) run
through :func:`tsdb.bench.experiment.run_experiment`; every other benchmark is a program
registered here with :func:`program`. Each program imports its module only when it runs,
so this module stays light: the preflight checks read :data:`PROGRAMS` before torch is
imported.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

PROGRAMS: dict[str, Callable] = {}


def program(name: str):
    """Register ``fn(args, command)`` as ``tsdb bench NAME``."""
    def register(fn: Callable) -> Callable:
        PROGRAMS[name] = fn
        return fn
    return register


def _out(args, default: str) -> Path:
    return Path(args.out or default)


def _printed(out: Path) -> None:
    print(f"results in {out / 'results.json'}, report in {out / 'report.md'}")


@program("streaming")
def _streaming(args, command: str) -> None:
    from tsdb.bench.streaming import bench_config, run_streaming_bench
    run_streaming_bench(_out(args, f"reports/streaming-{args.strategy}"), model_cfg=bench_config(args.strategy))


@program("sampling")
def _sampling(args, command: str) -> None:
    from tsdb.bench.sampling import run_sampling_bench
    out = _out(args, "reports/sampling")
    r = run_sampling_bench(out, against=args.against)
    print(f"speed-up {r['speedup']:.2f}x against {args.against}; report in {out}")


@program("errors")
def _errors(args, command: str) -> None:
    from tsdb.bench.errors import run_error_bench
    out = _out(args, "reports/errors")
    res = run_error_bench(out)
    print(f"{res['passed']} of {res['cases']} error paths pass; slowest {res['seconds_max']:.2f} s; "
          f"report in {out / 'report.md'}")


@program("soak")
def _soak(args, command: str) -> None:
    from tsdb.bench.soak import run_soak
    out = _out(args, "reports/soak")
    res = run_soak(out, updates=args.updates, progress=not args.no_progress)
    print(f"{res['setup']['updates']:,} updates at {res['updates_per_second']:,.0f}/s; RSS "
          f"{res['rss_mib_at_1e5']:.0f} -> {res['rss_mib_end']:.0f} MiB; report in {out / 'report.md'}")


@program("parallel")
def _parallel(args, command: str) -> None:
    from tsdb.bench.parallel import run_parallel_bench
    run_parallel_bench(_out(args, "reports/parallel"))


@program("covariates")
def _covariates(args, command: str) -> None:
    from tsdb.bench.covariates import covariates_spec, run_covariates_bench
    out = _out(args, "reports/covariates")
    run_covariates_bench(out, covariates_spec(args.config), root=args.data_root, only=args.arms,
                         progress=not args.no_progress, command=command)
    _printed(out)


@program("memory")
def _memory(args, command: str) -> None:
    from tsdb.bench.memory import run_memory_bench
    out = _out(args, "reports/memory")
    run_memory_bench(out, config=args.config, device=args.device, root=args.data_root, arms=args.arms,
                     command=command)
    _printed(out)


@program("gpu")
def _gpu(args, command: str) -> None:
    from tsdb.bench.gpu import run_gpu_bench
    out = _out(args, "reports/gpu")
    run_gpu_bench(out, tiny=args.tiny, config=args.config, device=args.device, root=args.data_root,
                  arms=args.arms, command=command)
    _printed(out)


@program("streamed-accuracy")
def _streamed_accuracy(args, command: str) -> None:
    from tsdb.bench.streamed_accuracy import StreamedAccuracySpec, run_streamed_accuracy
    out = _out(args, "reports/streamed-accuracy")
    spec = StreamedAccuracySpec.from_yaml(args.config) if args.config else None
    res = run_streamed_accuracy(out, spec, root=args.data_root, progress=not args.no_progress, command=command)
    print(f"`{res['command']}`: {res['wall_seconds'] / 60:.1f} min wall, {res['cpu_seconds'] / 60:.1f} CPU min; "
          f"chosen refresh policy {res['choice'].get('policy')}; report in {out / 'report.md'}")


@program("forecast-defaults")
def _forecast_defaults(args, command: str) -> None:
    from tsdb.bench.forecast_defaults import ForecastDefaultsSpec, run_forecast_defaults
    out = _out(args, "reports/forecast-defaults")
    spec = ForecastDefaultsSpec.from_yaml(args.config) if args.config else None
    run_forecast_defaults(out, spec, root=args.data_root, threads=args.threads, command=command)
    _printed(out)


def run_tiered(args, command: str) -> None:
    """A benchmark defined by its YAML (``--config``, or the packaged ``NAME-TIER.yaml``)."""
    from tsdb.bench.experiment import ExperimentSpec, run_experiment
    from tsdb.config import packaged   # (pydantic: not imported before the preflight checks)
    path = args.config or packaged("configs", "bench", f"{args.name}-{args.tier}.yaml")   # checked by preflight
    spec = ExperimentSpec.from_yaml(path)
    spec.base.train.progress = not args.no_progress
    out = _out(args, f"reports/{spec.name}")
    run_experiment(spec, out, root=args.data_root, only=args.arms, command=command)
    _printed(out)


def run_bench(args, command: str) -> None:
    PROGRAMS.get(args.name, run_tiered)(args, command)
