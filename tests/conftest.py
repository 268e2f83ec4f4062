"""Suite-wide settings: one torch thread per test process (the suite runs as two xdist
workers on two cores; oversubscribed OpenMP threads make CPU tests crawl)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TSDB_NUM_THREADS", "1")  # read by `tsdb` subprocesses

import torch  # noqa: E402

torch.set_num_threads(1)
