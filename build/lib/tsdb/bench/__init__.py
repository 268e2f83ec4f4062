"""Benchmarks: every arm side by side (``tsdb bench``, ``tsdb ablate``), streaming, parallel, covariates."""
