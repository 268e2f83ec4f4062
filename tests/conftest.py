"""Suite-wide settings: one torch thread per test process (the suite runs as two xdist
workers on two cores; oversubscribed OpenMP threads make CPU tests crawl)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TSDB_NUM_THREADS", "1")  # read by `tsdb` subprocesses

import torch  # noqa: E402

torch.set_num_threads(1)


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
