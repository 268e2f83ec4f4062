"""ONNX export of a trained run for streaming inference without torch.

``export_run(run_dir, out_dir)`` writes::

    OUT/update.onnx         context path of every block: new patches + caches -> caches
    OUT/denoise_<i>.onnx    one preconditioned denoiser call D(z, sigma | state) of block i
    OUT/tsdb_model.json     metadata (strategy, shapes, sigma grids with the block of each step,
                            normalization rule, graph files + sha256, version)

Graphs (``torch.onnx.export(dynamo=True, external_data=False)``, opset 18), state as named
inputs/outputs, dynamic ``batch``, ``new_tokens``, ``cache`` and ``samples`` axes:

``update``
    inputs ``features [batch, new_tokens, P, 2]`` (normalized value, observed mask),
    ``start [batch]`` int64 (absolute position of the first new token) and, for every block
    ``i``, ``cache_k_<i>``/``cache_v_<i>`` ``[layers, batch, heads, cache, head_dim]`` (``layers``:
    a looped block's prelude layers, then its own);
    outputs ``new_cache_k_<i>``/``new_cache_v_<i>``: the last ``min(W, cache + new_tokens)``
    tokens. Initialisation runs it with an empty cache (``cache = 0``); the partial token of
    a forecast is the last entry of its output for the NaN-padded unfinished patch.
``denoise_<i>``
    inputs ``cache_k``/``cache_v`` (block i's cache), ``partial_k``/``partial_v``
    ``[layers, batch, heads, 1, head_dim]``, ``has_partial [batch]`` bool,
    ``tokens [batch]`` int64, ``z [batch, samples, H]``, ``sigma [batch]``;
    output ``denoised [batch, samples, H]`` (normalized scale).

Covariates (``model.num_covariates = n > 0``): ``features`` carries them as channels
``2 .. 2 + n`` (each normalized with its own frozen statistics, NaN -> 0, so the update graph
takes the covariate patches with the values) and every ``denoise_<i>`` graph has one more
input, ``future_covariates [batch, H, n]`` (the normalized known-future covariates). The
metadata then says ``shapes.num_covariates`` and ``normalization.covariates``. A model
without covariates exports exactly the graphs and metadata it did before.

Why one denoiser call per block, looped on the host (rather than one graph with all K
sampler steps): the block a step uses is given by the schedule, so a single graph would
bake one sigma grid (K, sampler) into the file and, after constant folding, duplicate a
block's weights at every step that calls it; with a host loop the file holds each
weight once, K and the sampler stay runtime knobs, the runtime is ~30 lines of numpy
(Euler/Heun), and for the looped strategy ``denoise_0`` is exactly one application of the
weight-tied core, looped K times on the host.
The cost is ~2K small ``session.run`` calls per forecast (tens of microseconds each).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from contextvars import ContextVar
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tsdb.errors import TsdbError
from tsdb.nn.cache import encode_tokens, init_tokens, window_tokens

METADATA_FILE = "tsdb_model.json"
OPSET = 18


class UpdateGraph(nn.Module):
    """All blocks' context path: ``(features, start, *caches) -> *new_caches``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.blocks = model.blocks

    def forward(self, features: Tensor, start: Tensor, *caches: Tensor) -> tuple[Tensor, ...]:
        out = []
        for i, block in enumerate(self.blocks):
            k, v = encode_tokens(block, features, start, caches[2 * i], caches[2 * i + 1])
            out += [k, v]
        return tuple(out)


def tsdb_version() -> str:
    try:
        from importlib.metadata import version
        return version("tsdb")
    except Exception:  # not installed (source checkout)
        return "0+unknown"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_BAR: ContextVar = ContextVar("tsdb_export_bar", default=None)   # the bar of the export in progress


@contextlib.contextmanager
def export_progress(enabled: bool = True):
    """A progress bar ticked by every graph exported inside the block (each takes seconds to
    minutes to trace), whichever strategy writes them."""
    with tqdm(desc="ONNX export", unit="graph", disable=not enabled) as bar:
        token = _BAR.set(bar)
        try:
            yield bar
        finally:
            _BAR.reset(token)


def export_graph(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_shapes) -> None:
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=list(input_names),
                          output_names=list(output_names), dynamo=True, external_data=False,
                          opset_version=OPSET, dynamic_shapes=dynamic_shapes, verbose=False)
    if not path.exists():
        raise TsdbError(f"ONNX export did not write {path}")
    if _BAR.get() is not None:
        _BAR.get().update()


class TraceExamples:
    """Example inputs and dynamic dimensions for tracing a model's graphs (size >= 2 on every
    dynamic axis, since export specializes sizes 0 and 1)."""

    def __init__(self, model):
        from torch.export import Dim

        shape = model.blocks[0].shape
        self.p, self.w = shape.patch_length, window_tokens(model)
        self.heads, self.hd = shape.n_heads, shape.d_model // shape.n_heads
        self.layers = [len(b.context_layers) for b in model.blocks]
        self.b, self.m, self.c, self.s = 2, 3, max(2, self.w - 1), 3
        self.batch, self.new = Dim("batch", min=1), Dim("new_tokens", min=1)
        self.cache, self.samples = Dim("cache", min=0), Dim("samples", min=1)
        self._generator = torch.Generator().manual_seed(0)

    def rand(self, *size) -> Tensor:
        return torch.randn(*size, generator=self._generator)


def export_update_graph(model, out: Path, ex: TraceExamples, n_cov: int = 0) -> tuple[list[str], list[str]]:
    """Write ``update.onnx`` (new context patches + caches in, updated caches out); returns
    its input and output names."""
    feats = torch.stack([ex.rand(ex.b, ex.m, ex.p), (ex.rand(ex.b, ex.m, ex.p) > 0).float()], dim=-1)
    if n_cov:
        feats = torch.cat([feats, ex.rand(ex.b, ex.m, ex.p, n_cov)], dim=-1)
    start = torch.tensor([5, 9], dtype=torch.long)
    caches = []
    for nl in ex.layers:
        caches += [ex.rand(nl, ex.b, ex.heads, ex.c, ex.hd), ex.rand(nl, ex.b, ex.heads, ex.c, ex.hd)]
    cache_names = [f"cache_{kv}_{i}" for i in range(len(ex.layers)) for kv in "kv"]
    update_in = ["features", "start", *cache_names]
    update_out = [f"new_{n}" for n in cache_names]
    dyn = ({0: ex.batch, 1: ex.new}, {0: ex.batch}, tuple({1: ex.batch, 3: ex.cache} for _ in cache_names))
    with torch.no_grad():
        export_graph(UpdateGraph(model), (feats, start, *caches), out / "update.onnx", update_in, update_out, dyn)
    return update_in, update_out


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, progress: bool = False) -> Path:
    """Export a trained run directory (``tsdb train``) for streaming; returns ``out_dir``.

    ``out_dir`` defaults to ``RUN_DIR/onnx``. The graphs and metadata are the strategy's
    (``strategy.streaming().export``). They are written to a hidden sibling folder that
    replaces ``out_dir`` once complete, so a failed or interrupted export leaves no half model
    (an earlier export stays usable until then). ``progress``: a bar over the graphs.
    """
    from tsdb.training.loop import load_model

    cfg, strategy, model = load_model(run_dir)
    streaming = strategy.streaming()
    if streaming is None:
        raise TsdbError(f"strategy {strategy.name!r} does not stream, so it has no ONNX export")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "onnx"
    partial, old = out.with_name(f".{out.name}.partial"), out.with_name(f".{out.name}.old")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with export_progress(progress):
            streaming.export(model, partial, num_steps=cfg.model.inference_steps)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(partial, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def base_metadata(model: nn.Module, strategy, fmt: str, version: int, ex: "TraceExamples", arm: str | None,
                  graphs: dict) -> dict:
    """The metadata every format shares: identity, the shapes of the context cache, sizes,
    and the graphs (``{"update": ..., "denoise": [...]}``)."""
    shape = model.blocks[0].shape
    return {
        "format": fmt,
        "format_version": version,
        "tsdb_version": tsdb_version(),
        "strategy": strategy.name,
        "arm": arm or strategy.arm_name(),
        "opset": OPSET,
        "shapes": {
            "context_length": shape.context_length, "horizon": shape.horizon, "patch_length": ex.p,
            "context_channels": shape.context_channels, "d_model": shape.d_model, "n_heads": ex.heads,
            "head_dim": ex.hd, "n_blocks": len(model.blocks), "layers_per_block": ex.layers,
            "window_tokens": ex.w, "init_tokens": init_tokens(model), "future_tokens": shape.future_tokens,
        },
        "params": sum(q.numel() for q in model.parameters()),
        "sigma_data": model.precond.sigma_data,
        "graphs": graphs,
    }


def write_metadata(meta: dict, out: Path) -> dict:
    """Add the graphs' checksums and the model id, and write ``tsdb_model.json``."""
    for entry in [meta["graphs"]["update"], *meta["graphs"]["denoise"]]:
        entry["sha256"] = _sha256(out / entry["file"])
    meta["model_id"] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def load_metadata(model_dir: str | Path) -> dict:
    """Read and validate ``tsdb_model.json`` with the runtime's own checks (``tsdb_streaming``)."""
    from tsdb.cli.stream import import_runtime

    rt = import_runtime()
    try:
        return rt.load_metadata(model_dir)
    except rt.StreamingError as e:
        raise TsdbError(str(e)) from None
