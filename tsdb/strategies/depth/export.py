"""ONNX export of ``depth``/``e2e``/``looped`` models: the generic ``update`` graph (context
path of every block) and one ``denoise_<i>`` graph per block, a preconditioned denoiser call
``D(z, sigma | state)`` whose samples share the state's cache; the host runs the sampler over
the exported schedules (the sigma grid and the block of each step). See ``tsdb.export.onnx``
for the graph conventions and the runtime format "tsdb-streaming-onnx" in ``tsdb_streaming``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tsdb.errors import TsdbError
from tsdb.export.onnx import TraceExamples, base_metadata, export_graph, export_update_graph, write_metadata
from tsdb.nn.forecaster import DiffusionForecaster
from tsdb.strategies.depth.streaming import NORMALIZATION_RULE, RECENT_LOCATION_RULE, denoise_step

FORMAT = "tsdb-streaming-onnx"
FORMAT_VERSION = 2  # 2: the block of each step comes with the grid (schedules)


class DenoiseGraph(nn.Module):
    """One preconditioned denoiser call of one block."""

    def __init__(self, model: DiffusionForecaster, index: int):
        super().__init__()
        self.block = model.blocks[index]
        self.precond = model.precond

    def forward(self, cache_k, cache_v, partial_k, partial_v, has_partial, tokens, z, sigma, future_covariates=None):
        return denoise_step(self.block, self.precond, cache_k, cache_v, partial_k, partial_v, has_partial,
                            tokens, z, sigma, future_covariates)




def export_model(model: DiffusionForecaster, strategy, out_dir: str | Path, sampler: str | None = None,
                 num_steps: int | None = None, arm: str | None = None) -> dict:
    """Export ``model`` (a depth/e2e/looped ``DiffusionForecaster``) to ``out_dir``; returns the metadata.

    ``sampler`` defaults to the strategy's (Euler for looped, ``cfg.sampler`` otherwise).
    """
    if not isinstance(model, DiffusionForecaster):
        raise TsdbError(f"this export needs a DiffusionForecaster; got {type(model).__name__}")
    if model.seasonal_prior:
        raise TsdbError(f"a model with model.seasonal_prior = {model.seasonal_prior} cannot be exported yet "
                        "(the streaming runtime keeps no seasonal-naive anchor); forecast it with torch")
    sampler = sampler or strategy.sampler
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval().float()
    shape = model.blocks[0].shape
    ex = TraceExamples(model)
    heads, hd, layers = ex.heads, ex.hd, ex.layers
    nb = len(model.blocks)
    n_cov = shape.covariates
    batch, cache, samples = ex.batch, ex.cache, ex.samples
    b_ex, c_ex, s_ex = ex.b, ex.c, ex.s
    rand = ex.rand
    update_in, update_out = export_update_graph(model, out, ex, n_cov)

    # -- denoise graphs ----------------------------------------------------------------
    denoise_in = ["cache_k", "cache_v", "partial_k", "partial_v", "has_partial", "tokens", "z", "sigma"]
    if n_cov:
        denoise_in.append("future_covariates")
    denoise_files = []
    for i, nl in enumerate(layers):
        args = (rand(nl, b_ex, heads, c_ex, hd), rand(nl, b_ex, heads, c_ex, hd),
                rand(nl, b_ex, heads, 1, hd), rand(nl, b_ex, heads, 1, hd),
                torch.tensor([True, False]), torch.tensor([7, 3], dtype=torch.long),
                rand(b_ex, s_ex, shape.horizon), rand(b_ex).abs() + 0.1)
        dyn = ({1: batch, 3: cache}, {1: batch, 3: cache}, {1: batch}, {1: batch}, {0: batch}, {0: batch},
               {0: batch, 1: samples}, {0: batch})
        if n_cov:
            args += (rand(b_ex, shape.horizon, n_cov),)
            dyn += ({0: batch},)
        name = f"denoise_{i}.onnx"
        with torch.no_grad():
            export_graph(DenoiseGraph(model, i), args, out / name, denoise_in, ["denoised"], dyn)
        denoise_files.append(name)

    k = num_steps or strategy.cfg.inference_steps
    schedules = {}
    for n in sorted({k, nb, 2 * nb, 4 * nb, 8, 16}):
        sched = strategy.schedule(n)
        schedules[str(n)] = {"sigmas": sched.sigmas.tolist(), "blocks": list(sched.blocks)}
    graphs = {"update": {"file": "update.onnx", "inputs": update_in, "outputs": update_out},
              "denoise": [{"file": f, "inputs": denoise_in, "outputs": ["denoised"]} for f in denoise_files]}
    meta = base_metadata(model, strategy, FORMAT, FORMAT_VERSION, ex, arm, graphs)
    meta["shapes"]["core_layers"] = [len(b.layers) for b in model.blocks]
    meta.update({
        "sampler": sampler,
        "num_steps": k,
        "sigmas": schedules[str(k)]["sigmas"],
        "step_blocks": schedules[str(k)]["blocks"],
        "schedules": schedules,
        "band_edges": [float(e) for e in model.edges.tolist()],
        "normalization": {
            "rule": RECENT_LOCATION_RULE if model.location_window else NORMALIZATION_RULE,
            "stats_window": shape.context_length,
            "scale_floor": 1e-6,
            "description": ("loc/scale = NaN-aware mean/std (population, summed in float64) of the last "
                            "context_length values at initialisation; where std <= max(1e-6 * |loc|, 1e-30) "
                            "the context counts as constant and scale = min(|loc|, 1), or 1 where "
                            "|loc| <= 1e-30 (tsdb.nn.forecaster.instance_stats). Frozen while the "
                            "cache is valid; a refresh recomputes them and re-encodes the cache from the "
                            "last init_tokens * patch_length raw values."),
        },
    })
    if model.location_window:
        meta["normalization"]["location_window"] = model.location_window
        meta["normalization"]["description"] += (" loc is instead the NaN-aware mean of the last location_window "
                                                  "of those values (the context's mean where all are missing).")
    if n_cov:
        meta["shapes"]["num_covariates"] = n_cov
        meta["normalization"]["covariates"] = (
            "each covariate: NaN-aware mean/std of its own last context_length values at initialisation, with "
            "the target's scale floor and freezing; update features channels 2.. hold the normalized covariates "
            "of the same steps (NaN -> 0, as the unfinished patch's empty slots); future_covariates "
            "[batch, horizon, num_covariates] are the normalized covariates of the horizon")
    return write_metadata(meta, out)
