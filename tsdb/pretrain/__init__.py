"""Pretraining: a corpus made on the machine (KernelSynth, TSMixup, real series that installed
packages ship) and its window stream (docs/pretraining-corpus.md); ``tsdb pretrain``, zero-shot
evaluation, fine-tuning, conversion of an end-to-end model into blocks, and the pipeline API of
a pretrained checkpoint (docs/pretraining.md).

Names are imported on first use, so that ``tsdb --help`` (which registers the pretraining
subcommands) pulls in neither torch nor scipy."""

from tsdb.lazy import lazy_exports

# a pretrained checkpoint folder's weights, beside its config.yaml (light: read by the CLI checks)
WEIGHTS_FILE = "model.safetensors"

_EXPORTS = {
    "Corpus": "corpus", "CorpusConfig": "corpus", "CorpusWindows": "corpus",
    "KernelSynth": "kernel_synth", "TSMixup": "mixup", "CorpusSeries": "sources", "load_source": "sources",
    "PretrainConfig": "config", "pretrain": "train", "corpus_windows": "train",
    "TsdbPipeline": "pipeline", "save_pretrained": "checkpoint", "load_pretrained": "checkpoint",
    "finetune": "finetuning", "convert_e2e_to_blocks": "convert",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
