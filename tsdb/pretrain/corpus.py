"""The pretraining corpus: KernelSynth, TSMixup and real series, mixed by weight and streamed
into training as windows.

``Corpus`` draws one series at a time: a source is picked by ``weights`` (``kernel_synth``,
``tsmixup``, ``real``), then a series from it. Synthetic series are generated on demand and
never stored; real series (under a million points in all) are loaded once.

``CorpusWindows`` turns the corpus into the endless window stream of
`tsdb.data.windows.TrainingWindows` (same tuple, same cutting and padding code). The global
stream is a sequence of chunks: chunk ``c`` draws ``series_per_chunk`` fresh series with the
generator seeded by ``(seed, c)`` and cuts ``series_per_chunk * windows_per_series`` windows
from them. A process holds one chunk at a time (bounded memory), and a shard takes whole
chunks (``c = shard, shard + shards, ...``), so ranks and DataLoader workers partition the
stream without generating each other's series, the expensive part.

    python -m tsdb.pretrain --context 512 --horizon 64   # composition and speed, as JSON
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from dataclasses import replace
from functools import cached_property

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tsdb.data.windows import PositionedStream, default_min_context, diffusion_draws, padded_context, window_cut
from tsdb.errors import DataError
from tsdb.pretrain.kernel_synth import KernelSynth
from tsdb.pretrain.mixup import TSMixup
from tsdb.pretrain.sources import CorpusSeries, cards, load_source

SOURCES = ("kernel_synth", "tsmixup", "real")
MIXUP_COMPONENTS = ("kernel_synth", "real")


def _check_weights(weights: dict[str, float], known: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise ValueError(f"{what}: unknown source {unknown[0]!r}; use {', '.join(known)}")
    if any(w < 0 for w in weights.values()) or not sum(weights.values()) > 0:
        raise ValueError(f"{what}: weights must be >= 0 with a positive sum, got {weights}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KernelSynthConfig(_Strict):
    length: int = Field(1024, ge=2)
    max_kernels: int = Field(5, ge=1)


class TSMixupConfig(_Strict):
    max_components: int = Field(3, ge=1)
    alpha: float = Field(1.5, gt=0)
    min_length: int = Field(128, ge=1)
    max_length: int = Field(2048, ge=1)
    components: dict[str, float] = {"real": 1.0}  # where the mixed series come from

    @model_validator(mode="after")
    def _check(self):
        _check_weights(self.components, MIXUP_COMPONENTS, "tsmixup.components")
        if self.min_length > self.max_length:
            raise ValueError(f"tsmixup.min_length {self.min_length} exceeds max_length {self.max_length}")
        return self


class CorpusConfig(_Strict):
    """What the corpus mixes, in what proportion (of series drawn, hence of windows)."""

    weights: dict[str, float] = {"kernel_synth": 0.6, "tsmixup": 0.25, "real": 0.15}
    real: list[str] | None = None    # real sources (card names); None: every card
    kernel_synth: KernelSynthConfig = KernelSynthConfig()
    tsmixup: TSMixupConfig = TSMixupConfig()

    @model_validator(mode="after")
    def _check(self):
        _check_weights(self.weights, SOURCES, "weights")
        return self


class Corpus:
    """Seeded draws of pretraining series from the sources of ``config``."""

    def __init__(self, config: CorpusConfig | None = None):
        self.config = config or CorpusConfig()
        cfg = self.config
        self.weights = {k: w for k, w in cfg.weights.items() if w > 0}
        self.components = {k: w for k, w in cfg.tsmixup.components.items() if w > 0}
        self.real_names = list(cfg.real) if cfg.real is not None else sorted(cards())
        self.synth = KernelSynth(cfg.kernel_synth.length, cfg.kernel_synth.max_kernels)
        self.mixup = TSMixup(cfg.tsmixup.max_components, cfg.tsmixup.alpha, cfg.tsmixup.min_length,
                             cfg.tsmixup.max_length)
        self._pools: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @cached_property
    def real(self) -> list[CorpusSeries]:
        """Every real series (loaded on first use, only if some weight needs them)."""
        return [s for name in self.real_names for s in load_source(name)]

    def uses(self, source: str) -> bool:
        return source in self.weights or ("tsmixup" in self.weights and source in self.components)

    # ------------------------------------------------------------ drawing

    def draw(self, rng: np.random.Generator, min_length: int = 1) -> CorpusSeries:
        """One series of at least ``min_length`` points (call `check` first)."""
        return self._draw(_pick(rng, self.weights), rng, min_length)

    def _draw(self, source: str, rng: np.random.Generator, min_length: int) -> CorpusSeries:
        if source == "kernel_synth":
            s = self.synth.sample(rng)
            return CorpusSeries(s.values, source, source, s.freq, s.season_length,
                                {"kernel": s.expression, "periods": list(s.periods)})
        if source == "real":
            index, p = self._real_pool(min_length)
            return self.real[int(rng.choice(index, p=p))]
        parts: list[CorpusSeries] = []

        def component(r: np.random.Generator) -> np.ndarray:
            parts.append(self._draw(_pick(r, self.components), r, self._mixup_min(min_length)))
            return parts[-1].values

        values = replace(self.mixup, min_length=self._mixup_min(min_length)).sample(rng, component)
        freqs, seasons = {p.freq for p in parts}, {p.season_length for p in parts}
        return CorpusSeries(values, source, source, freqs.pop() if len(freqs) == 1 else None,
                            seasons.pop() if len(seasons) == 1 else 1,
                            {"components": [p.item_id for p in parts]})

    def _mixup_min(self, min_length: int) -> int:
        return max(self.mixup.min_length, min_length)

    def _real_pool(self, min_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Real series of at least ``min_length`` points, drawn in proportion to the windows
        they hold (so every real window end is equally likely)."""
        if min_length not in self._pools:
            lengths = np.array([len(s) for s in self.real])
            index = np.flatnonzero(lengths >= min_length)
            ends = (lengths[index] - min_length + 1).astype(np.float64)
            self._pools[min_length] = (index, ends / ends.sum() if len(index) else ends)
        return self._pools[min_length]

    def check(self, min_length: int) -> None:
        """A `DataError` naming the first weighted source that cannot give ``min_length``
        points."""
        hint = "use a shorter context/horizon or give the source weight 0"
        mixup_min = self._mixup_min(min_length)  # >= min_length: mixup components are the longer need
        mixed = self.components if "tsmixup" in self.weights else {}
        needs = {source: mixup_min if source in mixed else min_length for source in MIXUP_COMPONENTS}
        if self.uses("kernel_synth") and self.synth.length < needs["kernel_synth"]:
            raise DataError(f"pretraining source kernel_synth: series of {self.synth.length} points, "
                            f"{needs['kernel_synth']} needed; raise kernel_synth.length or {hint}")
        if "tsmixup" in self.weights and self.mixup.max_length < mixup_min:
            raise DataError(f"pretraining source tsmixup: max_length {self.mixup.max_length} < {mixup_min} "
                            f"points needed; raise tsmixup.max_length or {hint}")
        if self.uses("real") and not len(self._real_pool(needs["real"])[0]):
            raise DataError(f"pretraining source real ({', '.join(self.real_names)}): no series has the "
                            f"{needs['real']} points needed; {hint}")

    # ------------------------------------------------------------ reporting

    def composition(self, min_length: int = 1) -> dict:
        """Sources, weights and, per real card, series and points (all, and those long
        enough for windows of ``min_length`` points)."""
        real = {}
        if self.uses("real"):
            for name in self.real_names:
                lengths = np.array([len(s) for s in self.real if s.source == name])
                card = cards()[name]
                real[name] = {"series": int(len(lengths)), "points": int(lengths.sum()),
                              f"series_ge_{min_length}": int((lengths >= min_length).sum()),
                              f"points_ge_{min_length}": int(lengths[lengths >= min_length].sum()),
                              "frequency": card.frequency, "season_length": card.season_length,
                              "licence": " ".join(card.licence.split())}
        total = sum(self.weights.values())
        return {"weights": {k: w / total for k, w in self.weights.items()},
                "kernel_synth": self.config.kernel_synth.model_dump() | {"bank_size": len(self.synth.bank)},
                "tsmixup": self.config.tsmixup.model_dump(), "real": real,
                "real_total": {"series": sum(r["series"] for r in real.values()),
                               "points": sum(r["points"] for r in real.values())}}


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    p = np.array([weights[n] for n in names], dtype=np.float64)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


class CorpusWindows(PositionedStream):
    """An endless, seeded stream of ``(context [C], target [H], draws [1 + H])`` float32
    windows from ``corpus``, in the format of `tsdb.data.windows.TrainingWindows` (NaN-left-
    padded contexts, a partial last patch with probability ``partial_patch_prob``, draws =
    u ~ U[0,1) then eps ~ N(0,1) per lead time).

    Chunk ``c`` holds ``series_per_chunk`` series drawn with the generator seeded by
    ``(seed, c)``; each of its ``series_per_chunk * windows_per_series`` windows picks one of
    them uniformly, so the sources' share of windows is their weight. With probability
    ``short_context_prob`` a window's context keeps only a random number of its last slots,
    between ``min_context`` and ``context_length`` (the others NaN): histories of every length
    through one context shape. A shard (``rank`` of
    ``world_size``, times the DataLoader workers) takes every ``shards``-th chunk: the
    shards partition one global stream, whatever their number.
    """

    def __init__(self, corpus: Corpus, context_length: int, horizon: int, seed: int = 0,
                 min_context: int | None = None, patch_length: int = 1,
                 partial_patch_prob: float = 0.0, rank: int = 0, world_size: int = 1,
                 series_per_chunk: int = 64, windows_per_series: int = 32, short_context_prob: float = 0.0):
        if series_per_chunk < 1 or windows_per_series < 1:
            raise DataError(f"series_per_chunk ({series_per_chunk}) and windows_per_series "
                            f"({windows_per_series}) must be at least 1")
        self.corpus = corpus
        self.context_length, self.horizon, self.seed = context_length, horizon, seed
        self.min_context = min_context if min_context is not None else default_min_context(context_length, horizon)
        self.patch_length = patch_length
        self.partial_patch_prob = partial_patch_prob if patch_length > 1 else 0.0
        self.rank, self.world_size = rank, world_size
        self.series_per_chunk, self.windows_per_series = series_per_chunk, windows_per_series
        self.short_context_prob = short_context_prob
        self.min_length = self.min_context + horizon
        corpus.check(self.min_length)

    def _skip(self, workers: int, worker: int) -> int:
        """Windows this shard's DataLoader ``worker`` has already yielded at ``position``
        (the loader takes whole batches from its workers in turn)."""
        own = self.position // self.world_size
        if workers == 1:
            return own
        batches = own // self.worker_batch
        return (batches // workers + (worker < batches % workers)) * self.worker_batch

    def identity(self) -> dict:
        """What a run directory records of its training data (a resume on another corpus is refused)."""
        return {"stream": "corpus", "seed": self.seed, "corpus": self.corpus.config.model_dump(mode="json"),
                "series_per_chunk": self.series_per_chunk, "windows_per_series": self.windows_per_series,
                "short_context_prob": self.short_context_prob}

    @property
    def windows_per_chunk(self) -> int:
        return self.series_per_chunk * self.windows_per_series

    def chunk_series(self, rng: np.random.Generator) -> list[np.ndarray]:
        """The series one chunk cuts its windows from (the only series a shard holds)."""
        return [self.corpus.draw(rng, self.min_length).values for _ in range(self.series_per_chunk)]

    def chunk(self, index: int):
        """The windows of chunk ``index`` of the global stream."""
        rng = np.random.default_rng([self.seed, index])
        series = self.chunk_series(rng)
        for _ in range(self.windows_per_chunk):
            t = series[int(rng.integers(len(series)))]
            split, pad = window_cut(len(t), rng, self.horizon, self.min_context, self.patch_length,
                                    self.partial_patch_prob)
            context = padded_context(t[:split], self.context_length, pad)
            if self.short_context_prob and rng.random() < self.short_context_prob:
                # a shorter history: keep the last `keep` slots (>= min_context observed)
                keep = int(rng.integers(min(self.min_context + pad, self.context_length), self.context_length + 1))
                context[:self.context_length - keep] = np.nan
            yield context, t[split:split + self.horizon], diffusion_draws(rng, self.horizon)

    def chunk_indices(self, workers: int = 1, worker: int = 0):
        """The chunks this shard (and DataLoader ``worker`` of ``workers``) takes, in order."""
        shards = self.world_size * workers
        return itertools.count(self.rank + self.world_size * worker, shards)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        skip = self._skip(workers, worker)
        chunks = self.chunk_indices(workers, worker)
        # chunks are seeded apart: whole skipped chunks are never generated
        chunks = itertools.islice(chunks, skip // self.windows_per_chunk, None)
        first = True
        for index in chunks:
            windows = self.chunk(index)
            if first:
                windows, first = itertools.islice(windows, skip % self.windows_per_chunk, None), False
            yield from windows


# ---------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Composition and generation speed of the pretraining corpus")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--horizon", type=int, default=64)
    parser.add_argument("--synth-series", type=int, default=200, help="KernelSynth draws to time")
    parser.add_argument("--windows", type=int, default=4096, help="stream windows to time")
    parser.add_argument("--series-per-chunk", type=int, default=64)
    parser.add_argument("--windows-per-series", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    corpus = Corpus()
    stream = CorpusWindows(corpus, args.context, args.horizon, seed=args.seed,
                           series_per_chunk=args.series_per_chunk, windows_per_series=args.windows_per_series)
    report = {"composition": corpus.composition(stream.min_length)}
    rng = np.random.default_rng(args.seed)
    # wall and CPU time: on a shared machine the CPU seconds of this (one-thread) process are
    # the steadier measure of the work
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.synth_series):
        corpus.synth.sample(rng)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    report["kernel_synth"] = {"series": args.synth_series, "length": corpus.synth.length,
                              "wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
                              "series_per_cpu_second": round(args.synth_series / cpu, 1),
                              "redraws": corpus.synth.redraws}
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in itertools.islice(stream, args.windows):
        pass
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    report["stream"] = {"windows": args.windows, "context": args.context, "horizon": args.horizon,
                        "series_per_chunk": stream.series_per_chunk,
                        "windows_per_series": stream.windows_per_series,
                        "wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
                        "windows_per_cpu_second": round(args.windows / cpu, 1)}
    report["load_average"] = os.getloadavg()[0]
    print(json.dumps(report, indent=2))
