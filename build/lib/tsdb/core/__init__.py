"""Torch-only diffusion math: noise distribution and partitions, sigma schedules,
preconditioning (the one place D is formed), losses and samplers. No Lightning, no IO."""

from tsdb.core.losses import EDMLoss
from tsdb.core.noise import (PARTITIONS, NoiseDistribution, block_bands, edges_at, equiprobable_edges,
                             equiprobable_fractions, uniform_edges, uniform_fractions, widen_band)
from tsdb.core.precond import Preconditioning, RawNetwork
from tsdb.core.samplers import SAMPLERS, sample_euler, sample_heun, to_d
from tsdb.core.schedule import SigmaSchedule, sampling_schedule, sigma_grid

__all__ = ["EDMLoss", "NoiseDistribution", "PARTITIONS", "Preconditioning", "RawNetwork", "SAMPLERS",
           "SigmaSchedule", "block_bands", "edges_at", "equiprobable_edges", "equiprobable_fractions",
           "sample_euler", "sample_heun", "sampling_schedule", "sigma_grid", "to_d", "uniform_edges",
           "uniform_fractions", "widen_band"]
