"""sktime integration: :class:`TsdbForecaster`, a global probabilistic forecaster.

One model is trained on every series it is given: a ``pd.Series``, every column of a
``pd.DataFrame``, and every instance (and column) of a panel or hierarchical frame are
all series of one global tsdb model, trained block by block with
:func:`tsdb.training.loop.train_model`. Point forecasts are the sample median; quantiles and
intervals come from the same sample paths (same seed, same paths).

State after ``fit``: the trained model, the history (``_cur_y``) and, for the strategies
that stream through the depth family's state (``depth``, ``e2e``, ``looped``), a streaming state built from the last
``context_length`` values of each series, so that a forecast right after ``fit`` equals
tsdb's own forecast of that context. ``update(y, update_params=False)`` feeds only the
new values through ``tsdb.strategies.depth.streaming.update`` (cost independent of the history length;
normalization statistics stay frozen at ``fit``, the streaming rule); the other
strategies forecast from the last ``context_length`` values of the extended history.
``update_params=True`` retrains on all data seen so far, as sktime's default does.

Exogenous data: the columns of ``X`` are known-future covariates of every series of the
same instance (``model.num_covariates`` is set to their number). ``fit``/``update`` take
``X`` over ``y``'s time points, ``predict`` over the steps to forecast; steps of the model
horizon that ``X`` leaves out are filled with the nearest given step. ``X`` must be
complete (no missing values) where given.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sktime.forecasting.base import BaseForecaster, ForecastingHorizon

import tsdb.strategies.depth.streaming as streaming
from tsdb.nn.cache import by_group
from tsdb.strategies.depth.online import DepthStreaming
from tsdb.config import ExperimentConfig
from tsdb.data.series import Series, SeriesDataset
from tsdb.data.validate import check_values, validate_dataset
from tsdb.data.windows import last_context
from tsdb.integrations import model_horizon
from tsdb.strategies import get_strategy
from tsdb.training.loop import train_model

# sktime indexes may be plain integers; tsdb models read values only, so the series get a
# mock start (as M4 does) that nothing downstream reads
_MOCK_START = pd.Period("2000-01-01", "D")


class TsdbForecaster(BaseForecaster):
    """DiffusionBlocks probabilistic forecaster: one global model for all series given.

    Parameters
    ----------
    config : dict, str, ExperimentConfig or None, default=None
        tsdb ``ExperimentConfig``: a dict of its sections (e.g.
        ``{"model": {"n_blocks": 2}, "train": {"lr": 3e-4}}``), a YAML path, or the object;
        None uses tsdb's defaults. The parameters below override it.
    context_length : int or None, default=None
        Values the model reads before the forecast; None keeps the config's.
    horizon : int or None, default=None
        Model horizon, rounded up to whole patches (whole chunks for the ``horizon``
        strategy). None: the largest step of the ``fh`` passed to ``fit`` (the config's
        horizon when ``fit`` gets no ``fh``). Forecasts reach at most this many steps
        past the cutoff.
    steps_per_block : int or None, default=None
        Training steps per block; None keeps the config's.
    num_samples : int or None, default=None
        Sample paths behind every forecast; None keeps the config's.
    random_state : int or None, default=None
        Seed of training and sampling; None keeps the config's ``train.seed``. Results
        are deterministic for a given seed.
    verbose : bool, default=False
        Show training progress bars.

    Examples
    --------
    >>> from sktime.datasets import load_airline
    >>> from tsdb.integrations.sktime import TsdbForecaster
    >>> y = load_airline()
    >>> forecaster = TsdbForecaster(
    ...     config={"model": {"patch_length": 4, "d_model": 16, "n_heads": 2, "n_layers": 2,
    ...                       "n_blocks": 2}},
    ...     context_length=24, steps_per_block=5, num_samples=20)
    >>> forecaster.fit(y, fh=[1, 2, 3])
    TsdbForecaster(...)
    >>> y_pred = forecaster.predict()
    >>> y_quantiles = forecaster.predict_quantiles(alpha=[0.1, 0.9])
    """

    _tags = {
        "authors": ["tsdb developers"],
        "maintainers": ["tsdb developers"],
        "y_inner_mtype": ["pd.DataFrame", "pd-multiindex", "pd_multiindex_hier"],
        "X_inner_mtype": ["pd.DataFrame", "pd-multiindex", "pd_multiindex_hier"],
        "capability:exogenous": True,  # X columns: known-future covariates of every series
        "capability:multivariate": True,  # each column is one more series of the global model
        "capability:missing_values": True,  # NaN is masked in the model, never fed as a value
        "capability:insample": False,
        "capability:pred_int": True,
        "capability:pred_int:insample": False,
        "capability:update": True,
        "capability:unequal_length": True,
        "capability:random_state": True,
        "property:randomness": "derandomized",
        "requires-fh-in-fit": False,
    }

    def __init__(self, config=None, context_length=None, horizon=None, steps_per_block=None,
                 num_samples=None, random_state=None, verbose=False):
        self.config = config
        self.context_length = context_length
        self.horizon = horizon
        self.steps_per_block = steps_per_block
        self.num_samples = num_samples
        self.random_state = random_state
        self.verbose = verbose
        super().__init__()

    # ------------------------------------------------------------------ sktime API

    def _fit(self, y, X=None, fh=None):
        """Train one global model on every series of ``y`` (with ``X``'s columns as covariates)."""
        self.config_ = self._experiment_config(fh, X)
        self.strategy_ = get_strategy(self.config_.model)
        self._cur_y, self._cur_X = y, X
        series = _series(y)
        self._keys = list(series)  # the model's batch order
        frames = _frames(X)
        covariates = {key: _covariates_at(frames, key[:-1], index) for key, (_, index) in series.items()}
        dataset = validate_dataset(SeriesDataset("sktime", [
            Series(str(key), values, _MOCK_START, _MOCK_START.freqstr, covariates[key])
            for key, (values, _) in series.items()], _MOCK_START.freqstr))
        with tempfile.TemporaryDirectory(prefix="tsdb-sktime-") as run_dir:
            self.model_, _ = train_model(self.config_, dataset, run_dir, strategy=self.strategy_)
        self.model_.eval()
        self._stream_state = None
        if isinstance(self.strategy_.streaming(), DepthStreaming):  # this wrapper streams the depth family's state
            contexts, covs = self._contexts()
            self._stream_state = streaming.init_state(self.model_, torch.from_numpy(contexts),
                                                      covariates=_tensor(covs))
        return self

    def _update(self, y, X=None, update_params=True):
        """Extend the history by ``y``; retrain on all of it if ``update_params``, else stream
        the values past each series' last seen time point into the state."""
        new = _series(y)
        for key, (values, _) in new.items():    # inf or extreme values never reach the state
            check_values(f"series {str(key)!r}", values)
        unknown = [key for key in new if key not in self._keys]
        if unknown:
            raise ValueError(f"update got series {unknown[0]} that fit did not see; fit again to "
                             "add series to the model")
        if self.config_.model.num_covariates and X is None:
            raise ValueError("the model was fit with X: pass X for the new time points to update")
        last = {(*instance, column): frame.index[-1]
                for instance, frame in _instances(self._cur_y) for column in frame.columns}
        self._cur_y = _append(self._cur_y, y)
        if self.config_.model.num_covariates:
            self._cur_X = _append(self._cur_X, X)
        new_values, new_covs = [], []
        frames = _frames(self._cur_X)
        for key in self._keys:
            values, index = new.get(key, (np.empty(0, np.float32), pd.Index([])))
            new_values.append(values[index > last[key]])
            new_covs.append(_covariates_at(frames, key[:-1], index[index > last[key]]))
        if update_params:
            return self._fit(self._cur_y, X=self._cur_X, fh=self._fh)
        if self._stream_state is not None:
            self._stream_state = self._stream(new_values, new_covs)
        return self

    def _predict(self, fh, X=None):
        """Sample median per step."""
        point = np.median(self._sample_paths(fh, X), axis=1)[:, :, None]  # [series, H, 1]
        return self._frame(fh, point, self._get_columns("predict"))

    def _predict_quantiles(self, fh, X, alpha):
        """Empirical quantiles of the sample paths."""
        q = np.quantile(self._sample_paths(fh, X), alpha, axis=1)  # [alpha, series, H]
        return self._frame(fh, q.transpose(1, 2, 0), self._get_columns("predict_quantiles", alpha=alpha))

    @classmethod
    def get_test_params(cls, parameter_set="default"):
        """Two tiny configurations: a ``depth`` model and a ``looped`` one."""
        # horizon from fh (the config's 6 when fit gets none): fits sktime's 10-point panels
        tiny = {"patch_length": 2, "horizon": 6, "d_model": 8, "n_heads": 2, "n_layers": 2, "num_steps": 2}
        train = {"batch_size": 8, "warmup_steps": 0, "accelerator": "cpu"}
        common = {"context_length": 4, "steps_per_block": 2, "num_samples": 8}
        return [
            {"config": {"model": {**tiny, "n_blocks": 2}, "train": train}, **common},
            {"config": {"model": {**tiny, "strategy": "looped", "loop_iters": 2}, "train": train},
             **common, "random_state": 1},
        ]

    # ------------------------------------------------------------------ helpers

    def _experiment_config(self, fh, X=None) -> ExperimentConfig:
        """``config`` with this forecaster's parameters applied."""
        cfg = self.config
        if cfg is None:
            cfg = ExperimentConfig()
        elif isinstance(cfg, (str, Path)):
            cfg = ExperimentConfig.from_yaml(cfg)
        elif isinstance(cfg, dict):
            cfg = ExperimentConfig.model_validate(cfg)
        horizon = self.horizon
        if horizon is None:
            horizon = int(max(fh.to_relative(self.cutoff))) if fh is not None else cfg.model.horizon
        model = {"horizon": model_horizon(cfg.model, horizon), "context_length": self.context_length,
                 "num_samples": self.num_samples, "num_covariates": 0 if X is None else X.shape[1]}
        train = {"progress": bool(self.verbose), "steps_per_block": self.steps_per_block,
                 "seed": self.random_state}
        return cfg.with_overrides(model=_given(model), train=_given(train))

    def _contexts(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The last ``context_length`` values of every series, NaN-left-padded, ``[series, C]``,
        and their covariates ``[series, n, C]`` (None without X)."""
        c = self.config_.model.context_length
        series = _series(self._cur_y)
        contexts = np.stack([last_context(series[key][0], c) for key in self._keys])
        if not self.config_.model.num_covariates:
            return contexts, None
        covs, frames = [], _frames(self._cur_X)
        for key in self._keys:
            cov = _covariates_at(frames, key[:-1], series[key][1][-c:])
            covs.append(np.concatenate([np.full((cov.shape[0], c - cov.shape[1]), np.nan, np.float32), cov], 1))
        return contexts, np.stack(covs)

    def _future_covariates(self, fh, X) -> np.ndarray:
        """``[series, n, H]``: the X columns over the H steps after each instance's cutoff."""
        horizon, n = self.config_.model.horizon, self.config_.model.num_covariates
        if X is None or X.shape[1] != n:
            raise ValueError(f"the model was fit with {n} X column(s): pass X over the steps to forecast to "
                             f"predict (got {None if X is None else X.shape[1]} columns)")
        steps = ForecastingHorizon(np.arange(1, horizon + 1), is_relative=True)
        given = _frames(X)
        out = {}
        for instance, history in _instances(self._cur_y):
            frame = given.get(instance)
            if frame is None or not len(frame):
                raise ValueError(f"X has no rows for {_name(instance)}; pass X over the steps to forecast")
            future = _with_freq(steps, history.index, instance).to_absolute_index(history.index[-1])
            # nearest given step for the steps X leaves out (fh may skip some)
            rows = frame.reindex(frame.index.union(future)).sort_index().ffill().bfill().reindex(future)
            out[instance] = rows.to_numpy(dtype=np.float32).T
        return np.stack([out[key[:-1]] for key in self._keys])

    def _stream(self, new_values: list[np.ndarray], new_covs: list) -> streaming.StreamingState:
        """The state after ``tsdb.strategies.depth.streaming.update`` with each series' new values (and covariates)."""
        def run(idx: list[int]) -> streaming.StreamingState:
            values = torch.from_numpy(np.stack([new_values[i] for i in idx]).reshape(len(idx), len(new_values[idx[0]])))
            covs = None if new_covs[idx[0]] is None else torch.from_numpy(np.stack([new_covs[i] for i in idx]))
            return streaming.update(self.model_, self._stream_state.select(idx), values, covariates=covs)

        return by_group([len(v) for v in new_values], run)

    def _sample_paths(self, fh=None, X=None) -> np.ndarray:
        """Raw-scale sample paths ``[series, S, H]``; the same for the same seed, state and X."""
        cfg = self.config_.model
        future = self._future_covariates(fh, X) if cfg.num_covariates else None
        generator = torch.Generator().manual_seed(self.config_.train.seed)
        with torch.inference_mode():
            if self._stream_state is None:
                contexts, past = self._contexts()
                covariates = None if future is None else _tensor(np.concatenate([past, future], axis=2))
                return self.strategy_.forecast(self.model_, torch.from_numpy(contexts), cfg.num_samples,
                                               generator=generator, covariates=covariates).numpy()
            noise = torch.randn(self._stream_state.batch_size, cfg.num_samples, cfg.horizon, generator=generator)
            return streaming.forecast(self.model_, self._stream_state, noise, self.strategy_.schedule(),
                                      self.strategy_.sampler,
                                      covariates=_tensor(future)).numpy()

    def _frame(self, fh, values: np.ndarray, columns: pd.Index) -> pd.DataFrame:
        """Forecast table from per-series, per-step values ``[series, H, k]``.

        Columns are ``columns`` (variables, then the ``k`` entries of each); rows are the
        steps of ``fh`` counted from each instance's own last time point.
        """
        horizon = values.shape[1]
        row = {key: i for i, key in enumerate(self._keys)}
        frames, keys = [], []
        for instance, history in _instances(self._cur_y):
            last, fh_i = history.index[-1], _with_freq(fh, history.index, instance)
            steps = fh_i.to_relative(last).to_numpy()
            if steps.max() > horizon:
                raise ValueError(f"fh reaches {steps.max()} steps past the cutoff, the model's horizon is "
                                 f"{horizon}; refit with horizon >= {steps.max()} (or pass fh to fit)")
            block = values[[row[(*instance, column)] for column in history.columns]][:, steps - 1]
            frames.append(pd.DataFrame(block.transpose(1, 0, 2).reshape(len(steps), -1), columns=columns,
                                       index=fh_i.to_absolute_index(last)))
            keys.append(instance)
        if keys == [()]:
            return frames[0]
        out = pd.concat(frames, keys=keys)
        out.index.names = self._cur_y.index.names
        return out


def _instances(y: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    """``(instance key, frame indexed by time)`` per instance; ``((), y)`` for one series."""
    if not isinstance(y.index, pd.MultiIndex):
        return [((), y)]
    levels = list(range(y.index.nlevels - 1))
    groups = y.groupby(level=levels if len(levels) > 1 else 0, sort=False)
    return [(key if isinstance(key, tuple) else (key,), frame.droplevel(levels)) for key, frame in groups]


def _series(y: pd.DataFrame) -> dict[tuple, tuple[np.ndarray, pd.Index]]:
    """``{instance key + (column,): (float32 values, time index)}`` for every series of ``y``."""
    return {(*instance, column): (frame[column].to_numpy(dtype=np.float32), frame.index)
            for instance, frame in _instances(y) for column in frame.columns}


def _with_freq(fh: ForecastingHorizon, index: pd.Index, instance: tuple) -> ForecastingHorizon:
    """``fh`` with the frequency of a datetime ``index`` (sktime leaves it unset for panels)."""
    if fh.freq is not None or not isinstance(index, pd.DatetimeIndex):
        return fh
    freq = index.freq or (pd.infer_freq(index) if len(index) >= 3 else None)
    if freq is None:
        raise ValueError(f"cannot tell the frequency of the time index of {instance or 'y'}; give it a "
                         "regular DatetimeIndex (or a PeriodIndex)")
    return ForecastingHorizon(fh.to_pandas(), is_relative=fh.is_relative, freq=freq)


def _frames(X: pd.DataFrame | None) -> dict | None:
    """``{instance key: frame indexed by time}`` of ``X`` (None without X)."""
    return None if X is None else dict(_instances(X))


def _covariates_at(frames: dict | None, instance: tuple, index: pd.Index) -> np.ndarray | None:
    """The X columns of ``instance`` at the time points ``index``, ``[n, len(index)]``."""
    if frames is None:
        return None
    frame = frames.get(instance)
    rows = None if frame is None else frame.reindex(index)
    if rows is None or rows.isna().to_numpy().any():
        missing = index if rows is None else index[rows.isna().to_numpy().any(axis=1)]
        raise ValueError(f"X has no complete row for {_name(instance)} at {missing[0]}; covariates must be "
                         "given (and finite) at every time point of y")
    return rows.to_numpy(dtype=np.float32).T


def _tensor(a: np.ndarray | None) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _name(instance: tuple) -> str:
    return f"instance {instance if len(instance) > 1 else instance[0]!r}" if instance else "y"


def _given(values: dict) -> dict:
    """The entries that are not None."""
    return {k: v for k, v in values.items() if v is not None}


def _append(history: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """``history`` extended by ``new``; rows of ``new`` replace rows with the same index."""
    both = pd.concat([history, new])
    return both[~both.index.duplicated(keep="last")].sort_index()


__all__ = ["TsdbForecaster"]
