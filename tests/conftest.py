"""Suite-wide settings: one torch thread per test process (the suite runs as two xdist
workers on two cores; oversubscribed OpenMP threads make CPU tests crawl)."""

import io
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TSDB_NUM_THREADS", "1")  # read by `tsdb` subprocesses
os.environ.setdefault("TSDB_OFFLINE", "1")      # tests never download data; they read ../shared/datasets

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# the shared benchmark files next to the checkout, or $TSDB_DATA_DIR (a worktree elsewhere)
SHARED_DATA = Path(os.environ.get("TSDB_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "datasets")


def require_benchmark_data(*files: str) -> None:
    """Skip the calling test (or fixture) when the benchmark files it reads are not in
    ../shared/datasets (a clone outside the project folder); the suite never downloads."""
    missing = [f for f in files if not (SHARED_DATA / f).exists()]
    if missing:
        pytest.skip(f"{SHARED_DATA} lacks {missing}")


def random_chunks(rng, total: int, unit: int) -> list[int]:
    """Update sizes summing to ``total``, each 1 .. 2 * unit + 1 (crossing patch/chunk
    boundaries in every way)."""
    out = []
    while total:
        n = int(min(rng.integers(1, 2 * unit + 2), total))
        out.append(n)
        total -= n
    return out


def randomized_model(strategy: str = "depth", seed: int = 0, **cfg):
    """A small model whose zero-initialised (adaLN-Zero) weights are randomized, so the
    network is not F = 0 and parity tests compare something."""
    from tsdb.config import ModelConfig
    from tsdb.strategies import get_strategy

    torch.manual_seed(seed)
    shape = dict(d_model=32, n_heads=4, n_layers=4, n_blocks=2, num_steps=4)
    shape.update(cfg)
    strategy_ = get_strategy(ModelConfig(strategy=strategy, **shape))
    model = strategy_.build().eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.1)
    return strategy_, model


def block_calls(model) -> list[int]:
    """Record, by forward hooks on each block's future embedding (run once per denoiser call),
    which block every denoiser evaluation used."""
    calls = []
    for i, block in enumerate(model.blocks):
        block.future_embed.register_forward_hook(lambda mod, args, out, i=i: calls.append(i))
    return calls


def expected_calls(num_blocks: int, num_steps: int, sampler: str) -> list[int]:
    """Each block takes K/B consecutive steps; Heun evaluates twice per step but once on the last."""
    steps = [k * num_blocks // num_steps for k in range(num_steps)]
    if sampler == "euler":
        return steps
    return [b for b in steps[:-1] for _ in range(2)] + steps[-1:]


# ---------------------------------------------------------------------------------------
# `tsdb stream` helpers (tests/test_export.py, tests/test_streaming_horizon.py)
# ---------------------------------------------------------------------------------------

def records(n=30, items=("a", "b")):
    rng = np.random.default_rng(0)
    out = []
    for t in range(n):
        for item in items:
            ts = f"2021-03-01 {t // 4:02d}:{(t % 4) * 15:02d}:00" if item == "a" else t
            out.append({"item_id": item, "timestamp": ts, "value": round(float(rng.normal() + t), 4)})
    return out


def ndjson(recs):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs)


def stream(out_dir, recs, **kw):
    buf = io.StringIO()
    from tsdb.cli.stream import run_stream

    counts = run_stream(out_dir, io.StringIO(ndjson(recs)), buf, num_samples=16, **kw)
    return counts, [json.loads(line) for line in buf.getvalue().splitlines()]


# ---------------------------------------------------------------------------------------
# A tiny run and its ONNX export, built once per test session and shared by xdist workers
# (tests/test_export.py, test_properties.py, test_faults.py); ONNX export takes tens of seconds.
# ---------------------------------------------------------------------------------------

TINY_MODEL = dict(context_length=32, horizon=16, patch_length=4)   # + randomized_model's shape


def forecasts_after_different_pasts(model_dir, refresh: str, recent: int, num_samples: int = 8) -> np.ndarray:
    """The runtime's forecasts ``[2, S, H]`` for one series id streamed by two forecasters
    whose histories differ only before the last ``recent`` values (which they then receive
    one at a time, off the patch grid); the same count, seed and forecast noise."""
    import tsdb_streaming as rt

    rng = np.random.default_rng(7)
    tail = (10 + np.sin(np.arange(recent) / 3) + rng.normal(0, 0.3, recent)).astype(np.float32)
    pasts = [rng.normal(40, 5, 200).astype(np.float32), rng.normal(-3, 1, 200).astype(np.float32)]
    out = []
    for past in pasts:
        f = rt.StreamingForecaster(model_dir, refresh=refresh, num_samples=num_samples, seed=0)
        f.update(["a"], [past])
        for x in tail:
            f.update(["a"], [x])
        out.append(f.forecast(["a"], seed=[3]).samples[0])
    return np.stack(out)


def _session_root(tmp_path_factory, worker_id: str) -> Path:
    """A folder shared by every xdist worker of this session (the session's basetemp without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, worker_id) -> Path:
    """A run directory (config.yaml + model.pt, random weights) of the tiny depth model, exported to run/onnx."""
    from filelock import FileLock

    from tsdb.config import ExperimentConfig
    from tsdb.export.onnx import export_run

    root = _session_root(tmp_path_factory, worker_id)
    run = root / "tiny-run"
    with FileLock(str(root / "tiny-run.lock")):
        if not (run / "onnx" / "tsdb_model.json").exists():
            strategy, model = randomized_model("depth", 0, **TINY_MODEL)
            run.mkdir(exist_ok=True)
            ExperimentConfig(model=strategy.cfg).to_yaml(run / "config.yaml")
            torch.save(model.state_dict(), run / "model.pt")
            export_run(run, run / "onnx")
    return run
