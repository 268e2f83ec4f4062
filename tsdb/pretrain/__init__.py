"""Pretraining: a corpus made on the machine (KernelSynth, TSMixup, real series that installed
packages ship) and its window stream. See docs/pretraining-corpus.md."""

from tsdb.pretrain.corpus import Corpus, CorpusConfig, CorpusWindows
from tsdb.pretrain.kernel_synth import KernelSynth
from tsdb.pretrain.mixup import TSMixup
from tsdb.pretrain.sources import CorpusSeries, load_source

__all__ = ["Corpus", "CorpusConfig", "CorpusSeries", "CorpusWindows", "KernelSynth", "TSMixup", "load_source"]
