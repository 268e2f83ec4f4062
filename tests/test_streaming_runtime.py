"""The torch-free runtime's structure (streaming/tsdb_streaming): no import cycle, every module
importable alone without torch, format names only in formats/, the format registry, and the
one numpy sampler (against the library's torch samplers and the exact ODE solution).

Runtime behaviour on real exports is tested in test_export.py (depth / e2e / looped) and
test_streaming_horizon.py (horizon)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tsdb.core.samplers import sample_euler, sample_heun
from tsdb.cli.stream import import_runtime

rt = import_runtime()
PACKAGE = Path(rt.__file__).resolve().parent
STRATEGY_NAMES = ("depth", "e2e", "looped", "looped-bptt", "horizon")


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in its body, lazily or not)."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                edges.add(target)
                edges |= {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods}
        graph[name] = {e for e in edges if e in mods and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph`` (depth-first search; each cycle once per entry point)."""
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_runtime():
    graph = import_graph()
    assert {"tsdb_streaming.core", "tsdb_streaming.formats.depth", "tsdb_streaming.sampler"} <= set(graph)
    assert "tsdb_streaming.core" in graph["tsdb_streaming.formats.depth"]      # the parser sees relative imports
    assert "tsdb_streaming.formats.depth" in graph["tsdb_streaming.formats"]
    assert cycles(graph) == []
    # the layers: core modules never import a format
    for name, edges in graph.items():
        if ".formats" not in name and name != "tsdb_streaming":
            assert not any(".formats" in e for e in edges), (name, edges)


@pytest.mark.parametrize("module", sorted(modules()))
def test_each_module_imports_first_in_a_fresh_interpreter_without_torch(module):
    code = (f"import importlib, sys; importlib.import_module({module!r}); "
            "import tsdb_streaming; assert 'torch' not in sys.modules, 'torch imported'; "
            "print(sorted(tsdb_streaming.registered_formats()))")
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=PACKAGE.parent)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == str([rt.FORMAT, rt.HORIZON_FORMAT])


def _code_strings(path: Path) -> set[str]:
    """String constants of a module, docstrings excluded."""
    tree = ast.parse(path.read_text())
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
    return {n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs}


def _compared_strings(path: Path) -> set[str]:
    """String constants a comparison (==, !=, in, match) tests a value against."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        operands = []
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.match_case):
            operands = [node.pattern]
        for op in operands:
            out |= {n.value for n in ast.walk(op) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return out


def test_format_and_strategy_names_live_only_in_formats():
    """Outside formats/, no module names a format, and none compares anything with a
    strategy name ("horizon" is also a shape key, so strategy names count in comparisons)."""
    formats = set(rt.registered_formats())
    for name, path in modules().items():
        if ".formats" in name:
            continue
        assert not (_code_strings(path) & formats), f"{path} names {_code_strings(path) & formats}"
        assert not (_compared_strings(path) & set(STRATEGY_NAMES)), f"{path} branches on a strategy name"
    # the checks see what they look for
    assert rt.FORMAT in _code_strings(PACKAGE / "formats" / "depth.py")
    assert "euler" in _compared_strings(PACKAGE / "sampler.py")


def test_registry_refuses_unknown_and_duplicate_formats(tmp_path):
    # (other test modules in this process may register formats of their own)
    assert {rt.FORMAT, rt.HORIZON_FORMAT} <= set(rt.registered_formats())
    known = rt.registered_formats()
    (tmp_path / "tsdb_model.json").write_text('{"format": "tsdb-something-else", "format_version": 1}')
    with pytest.raises(rt.StreamingError, match="tsdb-something-else.*not served by this runtime"):
        rt.StreamingForecaster(tmp_path)
    with pytest.raises(rt.StreamingError, match="not served"):
        rt.load_metadata(tmp_path)
    (tmp_path / "tsdb_model.json").write_text("[1, 2")
    with pytest.raises(rt.StreamingError, match="not valid JSON"):
        rt.load(tmp_path)
    with pytest.raises(ValueError, match="already served"):
        rt.register_format(rt.FORMAT)(type("Other", (rt.StreamingForecaster,), {}))
    assert rt.registered_formats() == known


# ---------------------------------------------------------------------------------------
# the numpy sampler
# ---------------------------------------------------------------------------------------

SD = 0.8   # data N(0, SD^2): the exact denoiser is D(x, s) = x SD^2 / (s^2 + SD^2)


def gaussian_denoiser(scale: float = 1.0):
    return lambda x, s: x * (scale * SD ** 2 / (s ** 2 + SD ** 2))


def _grid(n):
    return np.concatenate([np.geomspace(80.0, 0.002, n), [0.0]]).astype(np.float32)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_numpy_sampler_matches_the_torch_samplers_with_step_blocks(method):
    """Two blocks with different (exact-form) denoisers, routed by step index; the per-step
    callback sees the same (step, sigma, block) as the torch sampler's."""
    from tsdb_streaming.sampler import sample

    sig = _grid(8)
    blocks = [0, 0, 0, 1, 1, 1, 1, 1]
    x0 = np.random.default_rng(0).standard_normal((3, 5, 16), dtype=np.float32) * sig[0]
    seen_np, seen_torch = [], []
    got = sample(method, [gaussian_denoiser(1.0), gaussian_denoiser(0.9)], x0, sig, blocks,
                 callback=lambda *a: seen_np.append(a))
    torch_sampler = {"euler": sample_euler, "heun": sample_heun}[method]
    tden = [lambda x, s, c=c: x * (c * SD ** 2 / (s[:, None, None] ** 2 + SD ** 2)) for c in (1.0, 0.9)]
    want = torch_sampler(tden, torch.from_numpy(x0), torch.from_numpy(sig), blocks,
                         callback=lambda *a: seen_torch.append(a))
    assert np.abs(got - want.numpy()).max() < 1e-5
    assert [(i, b) for i, _, b in seen_np] == [(i, b) for i, _, b in seen_torch] == list(enumerate(blocks))
    assert np.allclose([s for _, s, _ in seen_np], [s for _, s, _ in seen_torch])


def test_numpy_sampler_on_per_position_rows_matches_torch_with_a_first_order_last_step():
    """A grid of per-position rows (the horizon staircase): Heun on every sub-step but the
    last, which is Euler (as tsdb.nn.horizon's roll: Heun over S - 1 sub-steps, then Euler)."""
    from tsdb_streaming.sampler import sample

    rows = np.stack([np.geomspace(a, a / 40, 16) for a in (60.0, 20.0, 6.0, 2.0)]).astype(np.float32)
    x0 = np.random.default_rng(1).standard_normal((4, 16), dtype=np.float32) * rows[0]
    got = sample("heun", gaussian_denoiser(), x0, rows)
    tden = gaussian_denoiser()
    want = sample_heun(tden, torch.from_numpy(x0), torch.from_numpy(rows[:-1]))
    want = sample_euler(tden, want, torch.from_numpy(rows[-2:]))
    assert np.abs(got - want.numpy()).max() < 1e-5


def test_heun_converges_faster_than_euler_to_the_exact_flow():
    """For Gaussian data the probability-flow ODE has x(s) = x(s0) sqrt(s^2 + SD^2) / sqrt(s0^2 + SD^2)."""
    from tsdb_streaming.sampler import sample

    x0 = np.random.default_rng(2).standard_normal((1000,), dtype=np.float32) * 80
    sig = np.concatenate([np.geomspace(80.0, 0.01, 40), [0.005]]).astype(np.float32)   # ends above 0
    exact = x0 * np.sqrt(sig[-1] ** 2 + SD ** 2) / np.sqrt(sig[0] ** 2 + SD ** 2)
    err = {m: np.abs(sample(m, gaussian_denoiser(), x0, sig) - exact).max() for m in ("euler", "heun")}
    assert err["heun"] < err["euler"] / 5, err
    with pytest.raises(ValueError, match="unknown sampler"):
        sample("rk4", gaussian_denoiser(), x0, sig)
    with pytest.raises(ValueError, match="step blocks"):
        sample("euler", [gaussian_denoiser()], x0, sig, [0])
