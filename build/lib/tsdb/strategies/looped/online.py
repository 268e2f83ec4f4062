"""Online inference of ``looped`` models: the depth machinery with one block (the core's
graph is looped on the host, K Euler steps)."""

from __future__ import annotations

from tsdb.strategies.depth.online import DepthStreaming


class LoopedStreaming(DepthStreaming):
    # the looped arm of configs/ablation/m4-hourly-quick.yaml (its core is one graph looped on the host)
    bench_model = dict(context_length=336, horizon=48, patch_length=12, d_model=32, n_heads=4, n_layers=12,
                       core_layers=8, loop_iters=8, sampler="heun", num_steps=8)
