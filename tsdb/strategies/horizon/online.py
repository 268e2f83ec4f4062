"""Online inference of ``horizon`` models: the ONNX export and the streaming benchmark's
measurement (the torch state machine is :mod:`tsdb.strategies.horizon.streaming`)."""

from __future__ import annotations

import numpy as np
import torch

import tsdb.strategies.horizon.streaming as sh
from tsdb.bench.timing import TIMED, record, timed
from tsdb.data.windows import last_context
from tsdb.strategies.base import StreamingSupport
from tsdb.strategies.horizon.export import export_horizon_model


class HorizonStreaming(StreamingSupport):
    # the horizon-b4 arm of configs/ablation/m4-hourly-quick.yaml (chunks of c = 12 = one patch)
    bench_model = dict(context_length=336, horizon=48, patch_length=12, d_model=32, n_heads=4, n_layers=12,
                       n_blocks=4, sampler="heun", num_steps=8)
    sweeps_samples = False  # the number of samples is fixed per stream (one noisy window each)
    same_forecast_noise = False  # a forecast's noise is the free rolls' chunks, not strategy.forecast's layout

    def export(self, model, out_dir, num_steps=None) -> dict:
        return export_horizon_model(model, self.strategy, out_dir, num_steps=num_steps)

    def calls_per_forecast(self) -> int:
        """B rolls x per-roll sub-step evaluations x B blocks (every block reads the whole window)."""
        cfg = self.strategy.cfg
        sub = self.strategy.substeps(None)
        evals = 2 * sub - 1 if cfg.sampler == "heun" else sub   # the last sub-step is Euler
        return cfg.n_blocks * evals * cfg.n_blocks

    def explain(self, res: dict) -> list[str]:
        s, c = res["setup"], res["model"]["config"]
        chunk = c["horizon"] // c["n_blocks"]
        return [
            f"Where the time goes (horizon): a forecast runs {c['n_blocks']} free rolls "
            f"({c['n_blocks'] + 1} with values pending inside a chunk) of "
            f"{s['denoiser_calls_per_forecast'] // c['n_blocks']} block calls each over {s['num_samples']} windows, every emitted chunk entering a per-trajectory "
            f"cache; an update buffers values and runs one observed roll every {chunk} values, so update times "
            "are spiky (the `_mean_ms` fields of results.json include the rolls; the table shows medians). "
            "The recompute is the replay from initialisation over the full history "
            "(`streaming_horizon.recompute_forecast`, the same numbers as streaming): every roll re-encodes the "
            "whole history, per trajectory for the free rolls, so it grows with the history; it was timed on "
            f"{res['rows'][0]['recompute_timed']} updates per length. The last-context column is the cold start "
            "`strategy.forecast` on the last context_length values: what one would run without a state; its "
            "numbers differ from streaming with deeper blocks (see `tsdb.strategies.horizon.streaming`).",
        ]

    def runtime_options(self, num_samples: int) -> dict:
        return {"num_samples": num_samples}

    def measure(self, model, f, history, t, warmup, n_upd, num_samples, rng, recompute_every: int = 8):
        """Per update, the ORT and PyTorch streaming update (an observed roll every
        c values, buffering otherwise) + forecast (B or B + 1 free rolls), the replay from init
        over the full history (``streaming_horizon.recompute_forecast``: the same numbers,
        timed every ``recompute_every``-th update since it re-encodes the history per
        trajectory) and the cold start ``strategy.forecast`` on the last context."""
        strategy, cfg = self.strategy, self.strategy.cfg
        kw = sh.sampler_kwargs(strategy)
        hz, c, s = cfg.horizon, model.chunk_length, num_samples
        h = torch.from_numpy(history)[None]
        init_noise = torch.from_numpy(rng.normal(size=(1, s, 2 * hz)).astype(np.float32))
        state = sh.init_state(model, h[:, :t], s, init_noise, **kw)
        f.update(["s"], [history[:t]], init_noise=init_noise.numpy())
        times = {k: [] for k in TIMED}
        parity_ort, parity_rec = 0.0, 0.0
        rolls = []
        for i in range(warmup + n_upd):
            x = h[:, t + i:t + i + 1]
            fresh = torch.from_numpy(rng.normal(size=(1, s, int(sh.rolls_due(model, state, 1)[0]) * c))
                                     .astype(np.float32))
            rolls.append(fresh)
            noise = torch.from_numpy(rng.normal(size=(1, s, hz + c)).astype(np.float32))
            scale = float(state.scale)
            step: dict = {}
            state = timed(step, "torch_update", sh.update, model, state, x, fresh, **kw)
            y_torch = timed(step, "torch_forecast", sh.forecast, model, state, noise, **kw)
            timed(step, "ort_update", f.update, ["s"], [history[t + i]], noise=[fresh[0].numpy()])
            y_ort = timed(step, "ort_forecast", f.forecast, ["s"], noise=noise.numpy()).samples
            ctx = torch.from_numpy(last_context(history[:t + i + 1], cfg.context_length))[None]
            cold = torch.cat([init_noise, noise[..., :hz]], -1)     # [1, S, 3H] for the cold start
            timed(step, "torch_last_context", strategy.forecast, model, ctx, s, noise=cold)
            if i >= warmup and (i - warmup) % recompute_every == 0 or i == warmup + n_upd - 1:
                y_rec = timed(step, "torch_recompute", sh.recompute_forecast, model, h[:, :t + i + 1], t, init_noise,
                               torch.cat(rolls, -1), noise, **kw)
                parity_rec = max(parity_rec, float((y_torch - y_rec).abs().max()) / scale)
            if i >= warmup:
                record(times, step)
            parity_ort = max(parity_ort, float(np.abs(y_ort - y_torch.numpy()).max()) / scale)
        return times, parity_ort, parity_rec, int(state.k[0].shape[3])
