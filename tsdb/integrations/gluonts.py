"""GluonTS integration: :class:`TsdbEstimator` and the predictor it returns.

``TsdbEstimator(prediction_length=48, ...).train(dataset)`` trains a tsdb model block by
block with :func:`tsdb.training.loop.train_model` (one Lightning ``Trainer.fit`` per block, each
block checkpointed and resumable in ``run_dir``) and returns a standard
``PyTorchPredictor`` whose network draws sample paths: ``predictor.predict(dataset)``
yields ``SampleForecast`` objects of shape ``(num_samples, prediction_length)``, so the
predictor works with ``gluonts.dataset.split``, ``gluonts.model.evaluation.evaluate_model``
and ``predictor.serialize`` / ``Predictor.deserialize``.

Why ``train_model`` is overridden: GluonTS's own loop builds one ``Trainer`` for one
``LightningModule`` and always adds a weights-only checkpoint, which cannot express
"train block 1 to completion, save it, free it, then block 2" or resume a block with its
optimizer state. The training therefore goes through tsdb's trainer; everything
downstream of training (transformation, predictor, forecasts) is plain GluonTS.

Sampling uses torch's global random generator, as GluonTS's torch models do: call
``torch.manual_seed(s)`` before ``predict`` for reproducible forecasts.

Covariates: a model configured with ``model.num_covariates = n`` reads GluonTS's
``feat_dynamic_real`` (``[n, T]``, known-future dynamic real features): in training over
the target's span, at prediction time also over the ``prediction_length`` steps after it
(as GluonTS test entries carry them).
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import nullcontext
from typing import Any, Dict, Optional

import numpy as np
import torch
from gluonts.core.component import validated
from gluonts.dataset.common import Dataset
from gluonts.dataset.field_names import FieldName
from gluonts.torch.model.estimator import PyTorchLightningEstimator, TrainOutput
from gluonts.torch.model.predictor import PyTorchPredictor
from gluonts.transform import (
    AddObservedValuesIndicator,
    AsNumpyArray,
    Chain,
    InstanceSplitter,
    TestSplitSampler,
    Transformation,
)
from torch import Tensor, nn

from tsdb.config import ExperimentConfig, ModelConfig
from tsdb.data.readers import from_gluonts
from tsdb.data.validate import MAX_ABS_VALUE
from tsdb.errors import DataError
from tsdb.integrations import model_horizon
from tsdb.strategies import get_strategy
from tsdb.training.loop import train_model

logger = logging.getLogger(__name__)

INPUT_NAMES = ["past_target", "past_observed_values"]
COVARIATE_INPUT_NAMES = ["past_is_pad", "past_feat_dynamic_real", "future_feat_dynamic_real"]

# trainer_kwargs GluonTS users commonly pass, and the TrainConfig field each one sets
TRAINER_KWARGS = {"accelerator": "accelerator", "precision": "precision",
                  "enable_progress_bar": "progress"}


class TsdbPredictionNetwork(nn.Module):
    """A trained tsdb model as a GluonTS prediction network.

    ``forward(past_target, past_observed_values)`` (both ``[batch, context_length]``;
    unobserved or padded positions have observed value 0) returns ``config["num_samples"]``
    sample paths ``[batch, num_samples, prediction_length]`` in the target's scale.

    The constructor takes only plain values (the ``ModelConfig`` as a dict), so
    ``PyTorchPredictor.serialize`` can write it as JSON; weights travel in the state dict.
    """

    @validated()
    def __init__(self, config: Dict[str, Any], prediction_length: int) -> None:
        super().__init__()
        self.model_config = ModelConfig.model_validate(config)
        if not 0 < prediction_length <= self.model_config.horizon:
            raise ValueError(f"prediction_length {prediction_length} must be in "
                             f"[1, model horizon {self.model_config.horizon}]")
        self.prediction_length = prediction_length
        self.strategy = get_strategy(self.model_config)
        self.model = self.strategy.build()

    def forward(self, past_target: Tensor, past_observed_values: Tensor, past_is_pad: Tensor | None = None,
                past_feat_dynamic_real: Tensor | None = None,
                future_feat_dynamic_real: Tensor | None = None) -> Tensor:
        context = torch.where(past_observed_values > 0, past_target, torch.nan)
        bad = ~torch.isnan(context) & ~(context.abs() <= MAX_ABS_VALUE)
        if bad.any():
            row, pos = (int(i) for i in bad.nonzero()[0])
            raise DataError(f"series {row} of this batch: value {float(context[row, pos]):.3g} at context position "
                            f"{pos} is infinite or beyond +-{MAX_ABS_VALUE:.0e}; replace it with NaN (= missing) "
                            "or rescale the series")
        covariates = None
        if self.model_config.num_covariates:
            covariates = self._covariates(past_is_pad, past_feat_dynamic_real, future_feat_dynamic_real)
        samples = self.strategy.forecast(self.model, context.float(), self.model_config.num_samples,
                                         covariates=covariates)
        return samples[..., : self.prediction_length]

    def _covariates(self, past_is_pad: Tensor, past: Tensor, future: Tensor) -> Tensor:
        """``[b, n, C + H]`` from GluonTS's time-major ``past [b, C, n]`` / ``future [b, P, n]``:
        padding becomes NaN (as tsdb pads), and the future beyond ``prediction_length`` up to
        the model horizon (whole patches) repeats the last given step."""
        n, horizon = self.model_config.num_covariates, self.model_config.horizon
        if past is None or past.shape[-1] != n:
            raise ValueError(f"the model takes {n} covariate(s): entries need feat_dynamic_real with {n} rows, got "
                             f"{None if past is None else past.shape[-1]}")
        if future.shape[1] < self.prediction_length:
            raise ValueError(f"feat_dynamic_real must extend prediction_length={self.prediction_length} steps past "
                             f"the target (known-future covariates); it extends {future.shape[1]}")
        past = torch.where(past_is_pad[..., None] > 0, torch.nan, past.float())
        future = future[:, : self.prediction_length].float()
        tail = future[:, -1:].expand(-1, horizon - self.prediction_length, -1)
        return torch.cat([past, future, tail], dim=1).transpose(1, 2)


class TsdbEstimator(PyTorchLightningEstimator):
    """A GluonTS estimator that trains a tsdb DiffusionBlocks forecaster block by block.

    Parameters
    ----------
    prediction_length
        Forecast length. The model's horizon is this, rounded up to whole patches (to
        whole chunks for the ``horizon`` strategy); forecasts are cut to ``prediction_length``.
    context_length
        Context the model reads; ``None`` keeps the config's ``model.context_length``.
    config
        ``ExperimentConfig`` sections as a dict, e.g. ``{"model": {"n_blocks": 2},
        "train": {"steps_per_block": 500}}`` or ``ExperimentConfig.from_yaml(p).model_dump()``;
        unset fields keep tsdb's defaults. ``model.horizon`` is set from ``prediction_length``.
    num_samples
        Sample paths per forecast; ``None`` keeps the config's ``model.num_samples``.
    batch_size
        Series per forward pass at prediction time.
    run_dir
        Where training keeps its per-block checkpoints (``tsdb train`` layout). Training
        into an existing run directory resumes it; ``None`` uses a temporary directory.
    trainer_kwargs
        Accepted for GluonTS compatibility; only ``accelerator``, ``precision`` and
        ``enable_progress_bar`` are used (they set ``train.*``); other keys raise.
    """

    @validated()
    def __init__(
        self,
        prediction_length: int,
        context_length: Optional[int] = None,
        config: Optional[Dict[str, Any]] = None,
        num_samples: Optional[int] = None,
        batch_size: int = 256,
        run_dir: Optional[str] = None,
        trainer_kwargs: Optional[Dict[str, Any]] = None,
    ) -> None:
        trainer_kwargs = dict(trainer_kwargs or {})
        unknown = sorted(set(trainer_kwargs) - set(TRAINER_KWARGS))
        if unknown:
            raise ValueError(f"TsdbEstimator trains through tsdb.training.loop, which does not take "
                             f"trainer_kwargs {unknown}; set them in config['train'] instead")
        super().__init__(trainer_kwargs=trainer_kwargs)
        self.prediction_length = prediction_length
        self.batch_size = batch_size
        self.run_dir = run_dir
        self.experiment_config = _resolve_config(config, prediction_length, context_length, num_samples,
                                                 trainer_kwargs)

    # ----------------------------------------------------------- GluonTS hooks

    def create_transformation(self) -> Transformation:
        """Entry-wise preparation: float32 target plus an observed-values mask."""
        steps = [
            AsNumpyArray(field=FieldName.TARGET, expected_ndim=1, dtype=np.float32),
            AddObservedValuesIndicator(target_field=FieldName.TARGET,
                                       output_field=FieldName.OBSERVED_VALUES),
        ]
        if self.experiment_config.model.num_covariates:
            steps.append(AsNumpyArray(field=FieldName.FEAT_DYNAMIC_REAL, expected_ndim=2, dtype=np.float32))
        return Chain(steps)

    def create_instance_splitter(self) -> Transformation:
        """The last ``context_length`` points of every entry (zero-padded, unobserved)."""
        return InstanceSplitter(
            target_field=FieldName.TARGET,
            is_pad_field=FieldName.IS_PAD,
            start_field=FieldName.START,
            forecast_start_field=FieldName.FORECAST_START,
            instance_sampler=TestSplitSampler(),
            past_length=self.experiment_config.model.context_length,
            future_length=self.prediction_length,
            time_series_fields=[FieldName.OBSERVED_VALUES]
            + ([FieldName.FEAT_DYNAMIC_REAL] if self.experiment_config.model.num_covariates else []),
        )

    def create_lightning_module(self):
        raise NotImplementedError("TsdbEstimator trains one Lightning module per block inside "
                                  "tsdb.training.loop.train_model; there is no single training module")

    def create_predictor(self, transformation: Transformation, module: nn.Module) -> PyTorchPredictor:
        """A ``PyTorchPredictor`` around a trained :class:`TsdbPredictionNetwork`."""
        return PyTorchPredictor(
            input_names=INPUT_NAMES + (COVARIATE_INPUT_NAMES if self.experiment_config.model.num_covariates else []),
            prediction_net=module,
            batch_size=self.batch_size,
            prediction_length=self.prediction_length,
            input_transform=transformation + self.create_instance_splitter(),
        )

    def create_network(self) -> TsdbPredictionNetwork:
        """An untrained prediction network for this estimator's configuration."""
        return TsdbPredictionNetwork(self.experiment_config.model.model_dump(), self.prediction_length)

    # ----------------------------------------------------------- training

    def train_model(
        self,
        training_data: Dataset,
        validation_data: Optional[Dataset] = None,
        from_predictor: Optional[PyTorchPredictor] = None,
        shuffle_buffer_length: Optional[int] = None,
        cache_data: bool = False,
        ckpt_path: Optional[str] = None,
        **kwargs,
    ) -> TrainOutput:
        """Train every block with :func:`tsdb.training.loop.train_model`; ``trainer`` in the output is None.

        tsdb trains without a validation loop (``validation_data`` is ignored, with a
        warning); resuming goes through ``run_dir``, not ``ckpt_path``; warm starts
        (``train_from``) are not supported.
        """
        if from_predictor is not None or ckpt_path is not None:
            raise NotImplementedError("TsdbEstimator resumes from its run_dir (per-block checkpoints); "
                                      "train_from / ckpt_path are not supported")
        if validation_data is not None:
            logger.warning("TsdbEstimator: validation_data is not used by tsdb training")
        dataset = from_gluonts(training_data, name="gluonts-train")
        network = self.create_network()
        with _run_directory(self.run_dir) as run_dir:
            trained, _ = train_model(self.experiment_config, dataset, run_dir, strategy=network.strategy)
        network.model.load_state_dict(trained.state_dict())
        network.eval()
        transformation = self.create_transformation()
        return TrainOutput(transformation=transformation, trained_net=network, trainer=None,
                           predictor=self.create_predictor(transformation, network))


def _resolve_config(config: Optional[dict], prediction_length: int, context_length: Optional[int],
                    num_samples: Optional[int], trainer_kwargs: dict) -> ExperimentConfig:
    """The ``ExperimentConfig`` an estimator trains: ``config`` plus the estimator's arguments."""
    cfg = ExperimentConfig.model_validate(config or {})
    model = {"horizon": model_horizon(cfg.model, prediction_length)}
    if context_length is not None:
        model["context_length"] = context_length
    if num_samples is not None:
        model["num_samples"] = num_samples
    train = {TRAINER_KWARGS[k]: v for k, v in trainer_kwargs.items()}
    return cfg.with_overrides(model=model, train=train)


def _run_directory(run_dir: Optional[str]):
    """``run_dir`` as a context manager, or a temporary directory removed afterwards."""
    if run_dir is None:
        return tempfile.TemporaryDirectory(prefix="tsdb-gluonts-")
    return nullcontext(run_dir)


__all__ = ["TsdbEstimator", "TsdbPredictionNetwork"]
