"""The pretraining configuration: a model and training budget as in ``tsdb train``, the corpus,
how windows are cut from it, which arms to train and how to evaluate them zero-shot.

Configs ship in ``tsdb/configs/pretrain/`` (``quick``: this 2-core CPU within an hour; ``gpu``:
one H200 within 8 minutes; ``full``: longer GPU runs).
"""

from __future__ import annotations

from pydantic import Field, model_validator

from tsdb.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig, _Strict
from tsdb.pretrain.corpus import CorpusConfig

CORPUS_DATASET = "pretrain-corpus"  # the data section of a pretraining run's config.yaml


class StreamConfig(_Strict):
    """How `tsdb.pretrain.CorpusWindows` cuts training windows from the corpus."""

    series_per_chunk: int = Field(64, ge=1)
    windows_per_series: int = Field(32, ge=1)
    # observed context points a window needs (None: min(context, 2 * horizon))
    min_context: int | None = Field(None, ge=1)
    # share of windows whose observed context is cut to a random length in [min_context,
    # context_length] (the rest NaN, masked): the model has one context shape, and this is how
    # it learns to forecast from short histories too
    short_context_prob: float = Field(0.3, ge=0.0, le=1.0)


class ZeroShotConfig(_Strict):
    """Which protocols ``tsdb pretrain-eval`` runs and at what cost."""

    protocols: list[str] = ["m4_hourly", "etth1_48", "etth1_96", "exchange_rate", "vic_elec"]
    # the GIFT-Eval-style summary: geometric mean of CRPS ratios to seasonal naive over these
    summary: list[str] = ["m4_hourly", "etth1_96", "exchange_rate"]
    etth1_stride: int = Field(25, ge=1)   # 1 is the published protocol; keep it coprime to 24
    num_samples: int = Field(100, ge=1)
    num_steps: int | None = None          # inference steps K (None: the model's)


class PretrainConfig(_Strict):
    """A pretraining run: ``model``/``train`` as `tsdb.config.ExperimentConfig`, plus the corpus."""

    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    corpus: CorpusConfig = CorpusConfig()
    stream: StreamConfig = StreamConfig()
    # strategies trained on the same stream, each into RUN/<arm>/: the block-wise model and
    # its end-to-end twin (same layers; for the memory comparison and the conversion)
    arms: list[str] = ["depth", "e2e"]
    # per-arm changes of `train` that leave the optimisation the same, e.g. {e2e: {ddp_devices: 4}}:
    # the e2e model is one long job: data-parallel processes split its batches (same batch size,
    # same stream distribution; each process takes its own chunks of the corpus)
    arm_train: dict[str, dict] = {}
    zero_shot: ZeroShotConfig = ZeroShotConfig()

    @model_validator(mode="after")
    def _check(self):
        if not self.arms or len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms must name distinct strategies, got {self.arms}")
        allowed = {"ddp_devices", "num_workers", "progress", "accelerator", "precision"}
        for arm, changes in self.arm_train.items():
            if arm not in self.arms or set(changes) - allowed:
                raise ValueError(f"arm_train.{arm}: only arms of `arms` and the fields {sorted(allowed)} "
                                 f"(which leave the optimisation unchanged), got {sorted(changes)}")
        if self.stream.min_context and self.stream.min_context > self.model.context_length:
            raise ValueError(f"stream.min_context {self.stream.min_context} exceeds model.context_length "
                             f"{self.model.context_length}")
        return self

    def arm_config(self, arm: str) -> ExperimentConfig:
        """The `tsdb train`-style config of one arm (its run directory's ``config.yaml``)."""
        train = TrainConfig.model_validate(self.train.model_dump() | self.arm_train.get(arm, {}))
        return ExperimentConfig(model=self.model.model_copy(update={"strategy": arm}), train=train,
                                data=DataConfig(dataset=CORPUS_DATASET))
