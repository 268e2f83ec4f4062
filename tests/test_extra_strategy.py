"""A strategy defined here, outside tsdb, runs through the generic paths: register it, then
train (the CLI), forecast, export and stream without any change to the library.

``ensemble`` keeps depth's model and streaming but trains every block on the whole noise
range (an ensemble of full-range denoisers routed by the sampling schedule): a different
set of units behind the same interface.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tsdb.cli.main import main
from tsdb.config import ExperimentConfig
from tsdb.core import EDMLoss
from tsdb.data.series import Series, SeriesDataset
from tsdb.export.onnx import export_run, load_metadata
from tsdb.strategies import STRATEGIES, TrainUnit, get_strategy, register, streamable
from tsdb.strategies.depth.strategy import DepthStrategy
from tsdb.training.loop import load_model, train_model

from conftest import stream

TSDB = Path(__file__).resolve().parents[1] / "tsdb"


class EnsembleStrategy(DepthStrategy):
    name = "test-ensemble"

    def units(self, model):
        full_range = EDMLoss(self.noise, self.precond)   # no band: every block sees every sigma
        return [TrainUnit(f"block-{i}", block, self._block_loss(model, block, full_range))
                for i, block in enumerate(model.blocks)]

    def arm_name(self) -> str:
        return f"ensemble-b{self.num_blocks}"


@pytest.fixture(scope="module", autouse=True)
def registered():
    register(EnsembleStrategy)
    yield
    STRATEGIES.pop(EnsembleStrategy.name)


def sine_dataset(n_series=3, length=400) -> SeriesDataset:
    import pandas as pd
    t = np.arange(length)
    return SeriesDataset("sines", [Series(f"s{i}", (10 + 3 * np.sin(2 * np.pi * t / 24 + i)).astype(np.float32),
                                          pd.Period("2024-01-01", "h"), "h") for i in range(n_series)], "h")


def config(tmp_path: Path) -> Path:
    cfg = ExperimentConfig().with_overrides(
        model=dict(strategy=EnsembleStrategy.name, context_length=48, horizon=16, patch_length=8, d_model=16,
                   n_heads=2, n_layers=2, n_blocks=2, num_steps=4, partial_patch_prob=0.25),
        train=dict(steps_per_block=5, batch_size=8, progress=False),
        data=dict(dataset="vic_elec", max_series=1))
    path = tmp_path / "ensemble.yaml"
    cfg.to_yaml(path)
    return path


def test_a_registered_strategy_trains_forecasts_exports_and_streams(tmp_path):
    assert EnsembleStrategy.name in STRATEGIES and EnsembleStrategy.name in streamable()
    # train through the CLI (the registry is read by name)
    run = tmp_path / "run"
    assert main(["train", "--config", str(config(tmp_path)), "--out", str(run)]) == 0
    cfg, strategy, model = load_model(run)
    assert isinstance(strategy, EnsembleStrategy) and cfg.model.strategy == EnsembleStrategy.name
    # forecast through the interface
    context = torch.from_numpy(sine_dataset().series[0].target[-48:])[None]
    samples = strategy.forecast(model, context, 5)
    assert samples.shape == (1, 5, 16) and torch.isfinite(samples).all()
    # export through the generic entry point, then stream with the torch-free runtime's CLI
    out = export_run(run)
    meta = load_metadata(out)
    assert meta["strategy"] == EnsembleStrategy.name and meta["arm"] == "ensemble-b2"
    recs = [{"item_id": "a", "timestamp": t, "value": float(10 + 3 * np.sin(2 * np.pi * t / 24))}
            for t in range(60)]
    counts, lines = stream(out, recs)
    assert counts["forecasts"] == 60 and not counts.get("errors")
    assert all(np.isfinite(line["mean"]).all() for line in lines if "mean" in line)


def test_the_units_are_the_strategys_own(tmp_path):
    strategy = get_strategy(ExperimentConfig().model.model_copy(update={"strategy": EnsembleStrategy.name,
                                                                        "n_blocks": 2, "n_layers": 2}))
    model = strategy.build()
    units = strategy.units(model)
    assert [u.name for u in units] == ["block-0", "block-1"]
    ds = sine_dataset()
    trained, summary = train_model(ExperimentConfig().with_overrides(
        model=strategy.cfg.model_dump(), train=dict(steps_per_block=2, batch_size=4, progress=False)), ds,
        tmp_path, strategy=strategy)
    assert set(summary["units"]) == {"block-0", "block-1"}


def test_nothing_outside_strategies_dispatches_on_a_strategy_name():
    """The architecture rule, checked on the source: comparisons of a strategy's name or a
    config's strategy field with a string literal happen only under tsdb/strategies/."""
    offenders = []
    for path in TSDB.rglob("*.py"):
        if "strategies" in path.relative_to(TSDB).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(c, ast.Constant) and isinstance(c.value, str)
                                                     for c in node.comparators):
                left = ast.unparse(node.left)
                if left.endswith(("strategy.name", ".strategy", "strategy")) and "args." not in left:
                    offenders.append(f"{path.relative_to(TSDB)}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, offenders


def test_no_import_cycles():
    """Module-level imports between tsdb modules form no cycle (imports inside functions are
    deferred on purpose and do not count)."""
    graph = {}
    for path in TSDB.rglob("*.py"):
        mod = ".".join(("tsdb", *path.relative_to(TSDB).with_suffix("").parts)).removesuffix(".__init__")
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tsdb"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("tsdb"))
        graph[mod] = deps
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    # a package's __init__ importing its own submodules is not a cycle of the submodules
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in graph[m]:
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                if not all(x == cycle[0] or x.startswith(cycle[0] + ".") or cycle[0].startswith(x + ".")
                           for x in cycle):
                    cycles.append(" -> ".join(cycle))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, cycles


def test_model_code_imports_no_lightning_pydantic_or_io():
    """tsdb/core and tsdb/nn are torch-only math: a fresh interpreter importing them loads
    neither Lightning, pydantic, gluonts, polars nor pandas."""
    code = ("import sys, tsdb.core, tsdb.nn, tsdb.nn.cache; "
            "print(json.dumps(sorted(m for m in ('lightning', 'pydantic', 'gluonts', 'polars', 'pandas') "
            "if m in sys.modules)))")
    import subprocess
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_importing_the_training_loop_pulls_no_gluonts_or_polars():
    import subprocess
    code = ("import sys, json, tsdb.training.loop; "
            "print(json.dumps(sorted(m for m in ('gluonts', 'polars') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
