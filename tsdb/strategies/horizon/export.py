"""ONNX export of the ``horizon`` strategy's streaming graphs (see :mod:`tsdb.strategies.horizon.streaming`).

``export_horizon_model(model, strategy, out_dir)`` writes::

    OUT/update.onnx             context path of every block (the graph of tsdb.export.onnx, unchanged)
    OUT/denoise_<j>.onnx        one preconditioned call of block j with per-token sigma
    OUT/tsdb_model.json         metadata (format ``tsdb-streaming-onnx-horizon``)

Built with ``tsdb.export.onnx``'s pattern (``torch.onnx.export(dynamo=True, external_data=False)``,
opset 18, state as named inputs/outputs, dynamic axes, noise never inside a graph).

``update``
    exactly ``tsdb.export.onnx``'s: ``features [batch, new_tokens, P, 2]``, ``start [batch]`` and per
    block ``cache_k_<j>``/``cache_v_<j>`` -> ``new_cache_k_<j>``/``new_cache_v_<j>``. It ingests an
    observed chunk (``c / P`` tokens) after an observed roll, and an emitted chunk into the
    per-trajectory caches during a forecast.
``denoise_<j>``
    inputs ``cache_k``/``cache_v`` ``[layers, batch, heads, cache, head_dim]`` (block j's
    cache), ``tokens [batch]`` int64 (position of the window's first token),
    ``z [batch, samples, H]`` (the noisy windows; samples share their series' cache),
    ``sigma [batch, H]`` (one noise level per position: the staircase);
    output ``denoised [batch, samples, H]``, of which the host keeps chunk j.

A roll on the host: for the sub-step grid ``roll_sigmas`` (``[S + 1, H]`` rows of the
metadata, staircase phase 0 -> 1), Heun (or Euler) steps in which every block's call
provides its own chunk of ``D``, the last sub-step always Euler (as
``HorizonForecaster.roll``); then chunk 0 is emitted and ``sigma_max * fresh`` appended.
The torch-free runtime serves it with ``tsdb_streaming.HorizonStreamingForecaster``
(``StreamingForecaster(model_dir)`` dispatches on ``format``), which runs exactly this loop.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from tsdb.errors import TsdbError
from tsdb.export.onnx import TraceExamples, base_metadata, export_graph, export_update_graph, write_metadata
from tsdb.strategies.horizon.model import HorizonForecaster
from tsdb.strategies.horizon.streaming import NORMALIZATION_RULE, denoise_tokens

FORMAT = "tsdb-streaming-onnx-horizon"
FORMAT_VERSION = 1
DENOISE_INPUTS = ("cache_k", "cache_v", "tokens", "z", "sigma")


class HorizonDenoiseGraph(nn.Module):
    """One preconditioned call of one block with per-token sigma (:func:`denoise_tokens`)."""

    def __init__(self, model: HorizonForecaster, index: int):
        super().__init__()
        self.block = model.blocks[index]
        self.precond = model.precond

    def forward(self, cache_k: Tensor, cache_v: Tensor, tokens: Tensor, z: Tensor, sigma: Tensor) -> Tensor:
        return denoise_tokens(self.block, self.precond, cache_k, cache_v, tokens, z, sigma)


def export_horizon_model(model: HorizonForecaster, strategy, out_dir: str | Path, num_steps: int | None = None,
                         arm: str | None = None) -> dict:
    """Export a horizon ``model`` to ``out_dir``; returns the metadata."""
    if not isinstance(model, HorizonForecaster):
        raise TsdbError(f"horizon export needs a HorizonForecaster; got {type(model).__name__}")
    if getattr(model, "num_covariates", 0):
        raise TsdbError("horizon export does not support covariates yet")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval().float()
    shape = model.blocks[0].shape
    ex = TraceExamples(model)
    h, heads, hd, layers = shape.horizon, ex.heads, ex.hd, ex.layers
    substeps = strategy.substeps(num_steps)
    update_in, update_out = export_update_graph(model, out, ex)

    # -- per-token-sigma denoise graphs ------------------------------------------------------
    sigma_ex = model.window_sigma(torch.tensor([0.25, 0.75]))
    denoise_files = []
    for i, nl in enumerate(layers):
        args = (ex.rand(nl, ex.b, heads, ex.c, hd), ex.rand(nl, ex.b, heads, ex.c, hd),
                torch.tensor([7, 3], dtype=torch.long), ex.rand(ex.b, ex.s, h), sigma_ex)
        dyn = ({1: ex.batch, 3: ex.cache}, {1: ex.batch, 3: ex.cache}, {0: ex.batch},
               {0: ex.batch, 1: ex.samples}, {0: ex.batch})
        name = f"denoise_{i}.onnx"
        with torch.no_grad():
            export_graph(HorizonDenoiseGraph(model, i), args, out / name, DENOISE_INPUTS, ["denoised"], dyn)
        denoise_files.append(name)

    phases = torch.linspace(0.0, 1.0, substeps + 1, dtype=torch.float64)
    graphs = {"update": {"file": "update.onnx", "inputs": update_in, "outputs": update_out},
              "denoise": [{"file": f, "inputs": list(DENOISE_INPUTS), "outputs": ["denoised"]} for f in denoise_files]}
    meta = base_metadata(model, strategy, FORMAT, FORMAT_VERSION, ex, arm, graphs)
    meta["shapes"]["chunk_length"] = model.chunk_length
    meta.update({
        "sampler": strategy.cfg.sampler,
        "substeps": substeps,
        "last_substep": "euler",
        "roll_sigmas": model.window_sigma(phases).tolist(),   # [S + 1, H], staircase phase 0 -> 1
        "sigma_max": float(model.noise.sigma_max),
        "noise": {"init": "[batch, S, 2H]", "update": "[batch, S, c] per observed roll",
                  "forecast": "[batch, S, H + c]"},
        "normalization": {"rule": NORMALIZATION_RULE, "stats_window": shape.context_length, "scale_floor": 1e-6},
    })
    return write_metadata(meta, out)


__all__ = ["FORMAT", "FORMAT_VERSION", "HorizonDenoiseGraph", "export_horizon_model"]
