"""Online inference of ``depth``/``e2e`` (and, through its subclass, ``looped``) models: the
ONNX export and the streaming benchmark's measurement (the torch state machine is
:mod:`tsdb.strategies.depth.streaming`)."""

from __future__ import annotations

import numpy as np
import torch

import tsdb.strategies.depth.streaming as st
from tsdb.bench.timing import TIMED, record, timed
from tsdb.data.windows import last_context
from tsdb.strategies.base import StreamingSupport
from tsdb.strategies.depth.export import export_model


class DepthStreaming(StreamingSupport):
    # depth-b4 at the width, patching and sampler of configs/bench/m4-hourly-quick.yaml, one layer per block
    bench_model = dict(context_length=336, horizon=48, patch_length=16, d_model=64, n_heads=4, n_layers=4,
                       n_blocks=4, sampler="heun", num_steps=8)

    def export(self, model, out_dir, num_steps=None) -> dict:
        return export_model(model, self.strategy, out_dir, num_steps=num_steps or self.strategy.cfg.inference_steps)

    def calls_per_forecast(self) -> int:
        k = self.strategy.cfg.inference_steps
        return 2 * k - 1 if self.strategy.sampler == "heun" else k

    def measure(self, model, f, history, t, warmup, n_upd, num_samples, rng):
        """Per update, the ORT and PyTorch streaming update + forecast, the
        recompute from the full history and the plain library call on the last context."""
        strategy, cfg = self.strategy, self.strategy.cfg
        hz, sampler = cfg.horizon, strategy.sampler
        schedule = strategy.schedule(cfg.inference_steps)
        h = torch.from_numpy(history)[None]
        state = st.init_state(model, h[:, :t])
        f.update(["s"], [history[:t]])
        times = {k: [] for k in TIMED}
        parity_ort, parity_rec = 0.0, 0.0
        for i in range(warmup + n_upd):
            x = h[:, t + i:t + i + 1]
            noise = torch.from_numpy(rng.normal(size=(1, num_samples, hz)).astype(np.float32))
            scale = float(state.scale)
            step: dict = {}
            state = timed(step, "torch_update", st.update, model, state, x)
            y_torch = timed(step, "torch_forecast", st.forecast, model, state, noise, schedule, sampler=sampler)
            timed(step, "ort_update", f.update, ["s"], [history[t + i]])
            y_ort = timed(step, "ort_forecast", f.forecast, ["s"], noise=noise.numpy()).samples
            y_rec = timed(step, "torch_recompute", st.recompute_forecast, model, h[:, :t + i + 1], noise, schedule,
                           sampler=sampler, pending=int(state.pending_count[0]), loc=state.loc, scale=state.scale,
                           next_token=int(state.tokens[0]), init_length=t)
            ctx = torch.from_numpy(last_context(history[:t + i + 1], cfg.context_length))[None]
            timed(step, "torch_last_context", strategy.forecast, model, ctx, num_samples, noise=noise)
            if i >= warmup:
                record(times, step)
            parity_ort = max(parity_ort, float(np.abs(y_ort - y_torch.numpy()).max()) / scale)
            parity_rec = max(parity_rec, float((y_torch - y_rec).abs().max()) / scale)
        return times, parity_ort, parity_rec, int(state.k[0].shape[3])
