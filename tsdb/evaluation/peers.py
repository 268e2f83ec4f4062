"""Peers as arms of ``tsdb bench``: the forecasters a user already runs, on the same windows.

Every peer forecasts exactly the :class:`EvalTask`'s test windows and is scored by
:meth:`EvalTask.evaluate` (gluonts.ev), like tsdb's own arms. Peers:

- statsforecast ``SeasonalNaive``, ``AutoETS``, ``AutoTheta``, ``MSTL``: fitted per window
  on that window's input, quantiles from the models' own intervals (``level=[20, 40, 60, 80]``);
- neuralforecast ``NHITS`` and ``PatchTST``: one global model trained on ``task.train`` with
  ``MQLoss`` over the quantiles 0.1..0.9, ``input_size`` = the protocol's lookback, the
  library's own default ``max_steps`` unless a larger one is given, no early stopping;
- a closed-form ridge regression on instance-normalised windows (NLinear style) with
  residual quantiles from validation windows (:class:`LinearPeer`);
- GluonTS DeepAR at its library-default 100 epochs x 50 batches (:func:`deepar_peer`).

A quantile peer is scored through :func:`quantiles_as_samples`: gluonts takes quantile ``q``
of a ``SampleForecast`` as the sorted sample ``round((S - 1) q)``, so 9 quantiles plus the
point forecast (S = 10) would be read off by one (q0.1 scored with the 0.2 quantile); 11
samples with the 9 quantiles at positions 1..9 are read exactly.

Each arm's result records its budget (steps/epochs, lookback, parameters where meaningful,
options), the fit and predict wall seconds, the process CPU seconds (children included) and
the library version. The heavy libraries are imported inside the functions, so importing
tsdb does not pull them (they live in the ``tsdb[peers]`` extra).
"""

from __future__ import annotations

import inspect
import logging
import os
import resource
import tempfile
import time
from contextlib import contextmanager
from importlib.metadata import version
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from tsdb.errors import DataError
from tsdb.evaluation.baselines import fit_deepar
from tsdb.evaluation.tasks import QUANTILE_LEVELS, EvalTask

# The statsforecast interval levels whose bounds are the quantiles 0.1..0.9.
INTERVAL_LEVELS = (20, 40, 60, 80)
_MEDIAN = QUANTILE_LEVELS.index(0.5)


# -- shared plumbing ---------------------------------------------------------------------

def quantiles_as_samples(quantiles: np.ndarray, point: np.ndarray) -> np.ndarray:
    """``[N, 9, H]`` quantiles 0.1..0.9 and an ``[N, H]`` point forecast -> ``[N, 11, H]``
    samples that gluonts' ``SampleForecast`` reads back exactly.

    The quantiles sit at sorted positions 1..9 (``round(10 q)``); the two outer samples
    are chosen at or beyond q0.1 / q0.9 so that the sample mean equals ``point`` (so
    ``MSE[mean]`` scores the peer's point forecast). Crossing quantiles are sorted first.
    """
    if tuple(QUANTILE_LEVELS) != tuple(k / 10 for k in range(1, 10)):
        raise ValueError(f"quantiles_as_samples expects levels 0.1..0.9, got {QUANTILE_LEVELS}")
    q = np.sort(np.asarray(quantiles, dtype=np.float64), axis=1)
    point = np.asarray(point, dtype=np.float64)
    if q.ndim != 3 or q.shape[1] != 9 or point.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"quantiles must be [N, 9, H] and point [N, H], got {q.shape} and {point.shape}")
    # s_low + s_high = 11 * point - sum(q); push the excess out on the side it points to
    excess = 11 * point - q.sum(axis=1) - q[:, 0] - q[:, -1]
    low = q[:, 0] + np.minimum(excess, 0)
    high = q[:, -1] + np.maximum(excess, 0)
    return np.concatenate([low[:, None], q, high[:, None]], axis=1)


def window_inputs(task: EvalTask) -> list[np.ndarray]:
    """Every test window's observed input (float64), inner gaps forward-filled and the
    leading gap dropped; order as ``task.test_data``."""
    out = []
    for entry in task.test_data.input:
        out.append(_observed(np.asarray(entry["target"], dtype=np.float64), task.name, entry.get("item_id")))
    return out


def _observed(values: np.ndarray, task_name: str, item_id) -> np.ndarray:
    finite = np.isfinite(values)
    if not finite.any():
        raise DataError(f"{task_name}: series {item_id!r} has no observed value in its input; "
                        "drop it or give it history")
    values = values[np.argmax(finite):]
    return pd.Series(values).ffill().to_numpy()


def _long_frame(arrays: list[np.ndarray]) -> pd.DataFrame:
    """Nixtla's long format: ``unique_id`` = position in ``arrays``, integer ``ds``."""
    ids = np.repeat(np.arange(len(arrays)), [len(a) for a in arrays])
    ds = np.concatenate([np.arange(len(a)) for a in arrays])
    return pd.DataFrame({"unique_id": ids, "ds": ds, "y": np.concatenate(arrays).astype(np.float64)})


def _by_window(frame: pd.DataFrame, columns: list[str], num_windows: int, horizon: int) -> np.ndarray:
    """Forecast columns of a Nixtla output frame -> ``[N, len(columns), H]`` in window order."""
    frame = frame.sort_values(["unique_id", "ds"])
    values = frame[columns].to_numpy(dtype=np.float64)
    if len(values) != num_windows * horizon:
        raise RuntimeError(f"expected {num_windows} x {horizon} forecast rows, got {len(values)}")
    return values.reshape(num_windows, horizon, len(columns)).transpose(0, 2, 1)


@contextmanager
def clock(record: dict, key: str):
    """Add the block's wall seconds to ``record[key + '_seconds']`` and its CPU seconds (this
    process and reaped children, e.g. statsforecast's workers) to ``record[key + '_cpu_seconds']``
    and ``record['cpu_seconds']`` (CPU seconds say more than wall time on a shared machine)."""
    def cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    wall, used = time.perf_counter(), cpu()
    try:
        yield
    finally:
        record[f"{key}_seconds"] = record.get(f"{key}_seconds", 0.0) + time.perf_counter() - wall
        spent = cpu() - used
        for name in (f"{key}_cpu_seconds", "cpu_seconds"):
            record[name] = record.get(name, 0.0) + spent


def _result(task: EvalTask, samples: np.ndarray, timing: dict, library: str, budget: dict) -> dict:
    """Metrics plus the arm's budget record. ``train_seconds`` is the fit time (the bench
    report's column); ``fit_predict_seconds`` the whole arm."""
    metrics = task.evaluate(samples)
    train, predict = timing.get("fit_seconds", 0.0), timing.get("predict_seconds", 0.0)
    return {**metrics, "train_seconds": train, "predict_seconds": predict,
            "fit_predict_seconds": train + predict, "cpu_seconds": timing.get("cpu_seconds", 0.0),
            "fit_cpu_seconds": timing.get("fit_cpu_seconds", 0.0),
            "torch_threads": torch.get_num_threads(), "library": library, "budget": budget,
            "num_samples": int(samples.shape[1])}


# -- statsforecast -----------------------------------------------------------------------

STATS_KINDS = ("seasonal-naive", "auto-ets", "auto-theta", "mstl")


def statsforecast_peer(task: EvalTask, kind: str, season_lengths: list[int] | None = None,
                       n_jobs: int = 1, mstl_trend: str = "ZZN") -> dict:
    """Fit one statsforecast model per test window on the window's input and score its
    ``level=[20, 40, 60, 80]`` intervals as the quantiles 0.1..0.9.

    ``season_lengths`` defaults to the task's season; ``MSTL`` takes them all (e.g.
    ``[24, 168]``) with ``AutoETS(model=mstl_trend)`` on the trend, the others the first.
    """
    from statsforecast import StatsForecast
    from statsforecast.models import MSTL, AutoETS, AutoTheta, SeasonalNaive

    seasons = list(season_lengths or [task.season_length])
    models = {
        "seasonal-naive": lambda: SeasonalNaive(season_length=seasons[0]),
        "auto-ets": lambda: AutoETS(season_length=seasons[0]),
        "auto-theta": lambda: AutoTheta(season_length=seasons[0]),
        "mstl": lambda: MSTL(season_length=seasons, trend_forecaster=AutoETS(model=mstl_trend)),
    }
    if kind not in models:
        raise ValueError(f"unknown statsforecast peer {kind!r}; known: {list(models)}")
    model = models[kind]()
    timing: dict = {}
    with clock(timing, "fit"):  # statsforecast's forecast() fits and predicts in one pass
        inputs = window_inputs(task)
        frame = _long_frame(inputs)
        out = StatsForecast(models=[model], freq=1, n_jobs=n_jobs).forecast(
            df=frame, h=task.horizon, level=list(INTERVAL_LEVELS))
        name = model.alias
        columns = ([f"{name}-lo-{lv}" for lv in reversed(INTERVAL_LEVELS)] + [name]
                   + [f"{name}-hi-{lv}" for lv in INTERVAL_LEVELS])
        values = _by_window(out, columns, task.num_windows, task.horizon)
    samples = quantiles_as_samples(values, values[:, _MEDIAN])
    lengths = [len(x) for x in inputs]
    budget = {"model": repr(model), "season_lengths": seasons, "fitted_on": "each window's input",
              "input_points": [min(lengths), max(lengths)],
              "interval_levels": list(INTERVAL_LEVELS), "n_jobs": n_jobs}
    if kind == "mstl":
        budget["trend_forecaster"] = f"AutoETS(model={mstl_trend!r})"
    return _result(task, samples, timing, f"statsforecast {version('statsforecast')}", budget)


# -- neuralforecast ----------------------------------------------------------------------

NEURAL_KINDS = ("nhits", "patchtst")
# A per-window scaler for NHITS, whose library default ("identity") trains on raw levels
# (M4 Hourly spans 10 .. 10^5); PatchTST normalises itself (RevIN on by default).
NEURAL_DEFAULT_OPTIONS = {"nhits": {"scaler_type": "robust"}, "patchtst": {}}


def neural_model_class(kind: str):
    from neuralforecast.models import NHITS, PatchTST
    classes = {"nhits": NHITS, "patchtst": PatchTST}
    if kind not in classes:
        raise ValueError(f"unknown neuralforecast peer {kind!r}; known: {list(classes)}")
    return classes[kind]


def library_default_steps(kind: str) -> int:
    """The installed neuralforecast's default ``max_steps`` of the model (NHITS 1000,
    PatchTST 5000 in 3.3)."""
    return int(inspect.signature(neural_model_class(kind).__init__).parameters["max_steps"].default)


def neuralforecast_peer(task: EvalTask, kind: str, input_size: int, max_steps: int | None = None,
                        seed: int = 0, **options: Any) -> dict:
    """Train one global NHITS / PatchTST on ``task.train`` (channel-independent univariate
    series) with ``MQLoss`` over 0.1..0.9 on CPU, then forecast every test window from its
    last ``input_size`` points.

    ``max_steps=None`` takes the library's default; ``options`` go to the model (they
    override :data:`NEURAL_DEFAULT_OPTIONS`). Early stopping is off (no validation set).
    """
    from neuralforecast import NeuralForecast
    from neuralforecast.losses.pytorch import MQLoss

    cls = neural_model_class(kind)
    default_steps = library_default_steps(kind)
    steps = default_steps if max_steps is None else int(max_steps)
    opts = {**NEURAL_DEFAULT_OPTIONS[kind], **options}
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    timing: dict = {}
    with tempfile.TemporaryDirectory(prefix="tsdb-neuralforecast-") as root:
        loss = MQLoss(quantiles=list(QUANTILE_LEVELS))
        model = cls(h=task.horizon, input_size=input_size, loss=loss, max_steps=steps, random_seed=seed,
                    early_stop_patience_steps=-1, accelerator="cpu", devices=1, logger=False,
                    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                    default_root_dir=root, **opts)
        nf = NeuralForecast(models=[model], freq=1)
        train = [_observed(np.asarray(s.target, np.float64), task.name, s.item_id) for s in task.train]
        with clock(timing, "fit"):
            nf.fit(df=_long_frame(train), val_size=0)
        with clock(timing, "predict"):
            out = nf.predict(df=_long_frame(window_inputs(task)))
    columns = [f"{model.alias or type(model).__name__}{n}" for n in loss.output_names]
    values = _by_window(out, columns, task.num_windows, task.horizon)
    samples = quantiles_as_samples(values, values[:, _MEDIAN])
    trained = nf.models[0]
    budget = {"model": type(trained).__name__, "max_steps": steps, "library_default_max_steps": default_steps,
              "cut_below_library_default": steps < default_steps,
              "steps_done": len(trained.train_trajectories),  # one entry per optimizer step
              "input_size": input_size, "loss": "MQLoss(0.1..0.9)", "early_stopping": False, "seed": seed,
              "batch_size": trained.batch_size, "windows_batch_size": trained.windows_batch_size,
              "params": int(sum(p.numel() for p in trained.parameters())), "options": opts}
    result = _result(task, samples, timing, f"neuralforecast {version('neuralforecast')}", budget)
    result["params"] = budget["params"]
    return result


# -- linear (NLinear-style closed-form ridge) -------------------------------------------

class LinearPeer:
    """Ridge regression from an instance-normalised context to the normalised horizon.

    A window's context ``x`` (length L) and target ``y`` (length H) are normalised by the
    context's last value and standard deviation, ``z = (x - x_L) / s``, ``t = (y - x_L) / s``,
    and ``t = W z + b`` is fitted in closed form (the intercept unpenalised). Ridge ``alpha``
    (per window, so it does not grow with the data) is chosen on validation windows: the
    windows whose target lies in the last ``max(H, val_fraction * T)`` points of each
    training series, fitted on the windows before them. The forecast quantiles are the
    point forecast plus the empirical quantiles of those validation residuals per lead
    time (in normalised space); the final ``W, b`` are refitted on every window.
    """

    def __init__(self, lookback: int, horizon: int, alphas: list[float] | None = None,
                 val_fraction: float = 0.2):
        self.lookback, self.horizon = lookback, horizon
        self.alphas = [float(a) for a in (alphas if alphas else np.logspace(-4, 2, 13))]
        self.val_fraction = val_fraction
        self.weights = self.bias = self.alpha = self.residual_quantiles = None
        self.val_mse: dict[float, float] = {}
        self.num_windows = {"fit": 0, "val": 0, "all": 0}

    @staticmethod
    def normalise(contexts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``[N, L]`` contexts -> (z, last ``[N, 1]``, scale ``[N, 1]``)."""
        last = contexts[:, -1:]
        std = contexts.std(axis=1, keepdims=True)
        scale = np.where(std > 1e-8 * np.maximum(np.abs(last), 1.0), std, 1.0)
        return (contexts - last) / scale, last, scale

    def _windows(self, series: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All (z, t) windows of one series, stride 1."""
        span = self.lookback + self.horizon
        if len(series) < span:
            return np.zeros((0, self.lookback)), np.zeros((0, self.horizon))
        view = np.lib.stride_tricks.sliding_window_view(series, span)
        z, last, scale = self.normalise(view[:, :self.lookback])
        return z, (view[:, self.lookback:] - last) / scale

    def _gram(self, z: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a = np.hstack([z, np.ones((len(z), 1))])
        return a.T @ a, a.T @ t

    def _solve(self, gram: np.ndarray, cross: np.ndarray, n: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        penalty = np.full(len(gram), alpha * n)
        penalty[-1] = 0.0  # the intercept is not shrunk
        coef = np.linalg.solve(gram + np.diag(penalty), cross)
        return coef[:-1], coef[-1]

    def fit(self, series: list[np.ndarray]) -> "LinearPeer":
        size = self.lookback + 1
        fit_g, fit_c = np.zeros((size, size)), np.zeros((size, self.horizon))
        all_g, all_c = np.zeros((size, size)), np.zeros((size, self.horizon))
        val_z, val_t = [], []
        for values in series:
            z, t = self._windows(values)
            if not len(z):
                continue
            g, c = self._gram(z, t)
            all_g += g
            all_c += c
            self.num_windows["all"] += len(z)
            # window k's target covers [k + L, k + L + H); validation targets lie in the last v points
            v = max(self.horizon, int(round(self.val_fraction * len(values))))
            first_val = len(values) - v - self.lookback
            last_fit = first_val - self.horizon + 1  # fit targets end before the validation points
            if last_fit >= 1 and first_val < len(z):
                g, c = self._gram(z[:last_fit], t[:last_fit])
                fit_g += g
                fit_c += c
                self.num_windows["fit"] += last_fit
                val_z.append(z[max(first_val, 0):])
                val_t.append(t[max(first_val, 0):])
        if not self.num_windows["all"]:
            raise DataError(f"linear peer: no training series has lookback + horizon = "
                            f"{self.lookback + self.horizon} points")
        if val_z and self.num_windows["fit"]:
            val_z, val_t = np.concatenate(val_z), np.concatenate(val_t)
            self.num_windows["val"] = len(val_z)
            residuals = {}
            for alpha in self.alphas:
                w, b = self._solve(fit_g, fit_c, self.num_windows["fit"], alpha)
                residuals[alpha] = val_t - (val_z @ w + b)
                self.val_mse[alpha] = float(np.mean(residuals[alpha] ** 2))
            self.alpha = float(min(self.val_mse, key=self.val_mse.get))
            self.residual_quantiles = np.quantile(residuals[self.alpha], QUANTILE_LEVELS, axis=0)
        else:
            raise DataError(f"linear peer: the training series are too short for validation windows "
                            f"(need more than lookback + 2 x horizon = {self.lookback + 2 * self.horizon} "
                            "points); shorten the lookback")
        self.weights, self.bias = self._solve(all_g, all_c, self.num_windows["all"], self.alpha)
        return self

    def predict(self, contexts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[N, L]`` contexts (NaN-left-padded allowed) -> (quantiles ``[N, 9, H]``, point ``[N, H]``)."""
        filled = pd.DataFrame(np.asarray(contexts, np.float64).T).ffill().bfill().to_numpy().T
        z, last, scale = self.normalise(filled)
        point = z @ self.weights + self.bias
        quantiles = point[:, None, :] + self.residual_quantiles[None]
        return last[:, None] + scale[:, None] * quantiles, last + scale * point


def linear_peer(task: EvalTask, lookback: int, alphas: list[float] | None = None,
                val_fraction: float = 0.2) -> dict:
    """Fit :class:`LinearPeer` on ``task.train`` and score it on the test windows."""
    timing: dict = {}
    peer = LinearPeer(lookback, task.horizon, alphas, val_fraction)
    with clock(timing, "fit"):
        peer.fit([_observed(np.asarray(s.target, np.float64), task.name, s.item_id) for s in task.train])
    with clock(timing, "predict"):
        quantiles, point = peer.predict(task.contexts(lookback))
    budget = {"model": "ridge on instance-normalised windows (NLinear style)", "lookback": lookback,
              "alpha": peer.alpha, "alphas_tried": peer.alphas, "val_fraction": val_fraction,
              "val_mse_by_alpha": {f"{a:g}": v for a, v in peer.val_mse.items()},
              "windows": dict(peer.num_windows), "params": int(peer.weights.size + peer.bias.size),
              "quantiles": "point + validation residual quantiles per lead time"}
    result = _result(task, quantiles_as_samples(quantiles, point), timing, f"numpy {np.__version__}", budget)
    result["params"] = budget["params"]
    return result


# -- GluonTS DeepAR ----------------------------------------------------------------------

DEEPAR_DEFAULT_WINDOWS = 100 * 50 * 32  # GluonTS 0.17: max_epochs 100 x 50 batches of 32 windows

def deepar_peer(task: EvalTask, context_length: int, epochs: int = 100, num_batches_per_epoch: int = 50,
                batch_size: int = 32, max_lag: int = 169, seed: int = 0, num_samples: int = 100,
                **estimator_kwargs: Any) -> dict:
    """GluonTS DeepAR (library defaults: 100 epochs x 50 batches of 32) with lags <= ``max_lag``.

    When the task's windows carry only a fixed lookback (ETTh1: ``info['lookback']``
    points), the context is cut to ``lookback - max_lag`` so that no lag reads padding:
    DeepAR then reads exactly the protocol's lookback.
    """
    lookback = task.info.get("lookback")
    context = min(context_length, lookback - max_lag) if lookback else context_length
    if context < 1:
        raise ValueError(f"deepar peer: lookback {lookback} leaves no context after lags <= {max_lag}")
    timing: dict = {}
    with clock(timing, "fit"):
        arm = fit_deepar(task, context, epochs=epochs, num_batches_per_epoch=num_batches_per_epoch, seed=seed,
                         batch_size=batch_size, max_lag=max_lag, **estimator_kwargs)
    with clock(timing, "predict"):
        metrics = arm.evaluate(task, num_samples)
    net = arm.predictor.prediction_net
    params = int(sum(p.numel() for p in net.parameters()))
    budget = {"model": "DeepAR", "epochs": epochs, "num_batches_per_epoch": num_batches_per_epoch,
              "batch_size": batch_size, "steps": epochs * num_batches_per_epoch,
              "cut_below_library_default": epochs * num_batches_per_epoch * batch_size < DEEPAR_DEFAULT_WINDOWS,
              "context_length": context,
              "max_lag": int(max(net.model.lags_seq)) + 1, "seed": seed, "params": params,
              "options": estimator_kwargs}
    # train_seconds / predict_seconds: GluonTSArm's (training, sampling); the clock adds scoring
    return {**metrics, "fit_predict_seconds": timing["fit_seconds"] + timing["predict_seconds"],
            "cpu_seconds": timing["cpu_seconds"], "fit_cpu_seconds": timing["fit_cpu_seconds"], "torch_threads": torch.get_num_threads(),
            "library": f"gluonts {version('gluonts')}", "budget": budget, "params": params}


# -- bench specs -------------------------------------------------------------------------

class _Peer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stochastic: ClassVar[bool] = False        # its result depends on a random seed

    @property
    def seeded(self) -> bool:
        """Runs once per bench seed (stochastic, and no seed of its own fixed in the spec)."""
        return self.stochastic and getattr(self, "seed", None) is None


class StatsPeer(_Peer):
    kind: Literal["seasonal-naive", "auto-ets", "auto-theta", "mstl"]
    season_lengths: list[int] | None = None   # default: the task's season
    n_jobs: int = 1                           # worker processes (1 on a shared 2-core machine)
    mstl_trend: str = "ZZN"

    def run(self, task: EvalTask, lookback: int, seed: int, num_samples: int) -> dict:
        return statsforecast_peer(task, self.kind, self.season_lengths, self.n_jobs, self.mstl_trend)


class NeuralPeer(_Peer):
    stochastic: ClassVar[bool] = True
    kind: Literal["nhits", "patchtst"]
    max_steps: int | None = None              # None: the library's default (never fewer unless stated)
    input_size: int | None = None             # None: the protocol's lookback
    seed: int | None = None                   # None: the bench's seed
    options: dict[str, Any] = Field(default_factory=dict)

    def run(self, task: EvalTask, lookback: int, seed: int, num_samples: int) -> dict:
        return neuralforecast_peer(task, self.kind, self.input_size or lookback, self.max_steps,
                                   seed if self.seed is None else self.seed, **self.options)


class LinearPeerSpec(_Peer):
    kind: Literal["linear"]
    lookback: int | None = None
    alphas: list[float] | None = None
    val_fraction: float = 0.2

    def run(self, task: EvalTask, lookback: int, seed: int, num_samples: int) -> dict:
        return linear_peer(task, self.lookback or lookback, self.alphas, self.val_fraction)


class DeepARPeer(_Peer):
    stochastic: ClassVar[bool] = True
    kind: Literal["deepar"]
    epochs: int = 100                         # GluonTS defaults
    num_batches_per_epoch: int = 50
    batch_size: int = 32
    context_length: int | None = None         # None: the protocol's lookback
    max_lag: int = 169
    seed: int | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    def run(self, task: EvalTask, lookback: int, seed: int, num_samples: int) -> dict:
        return deepar_peer(task, self.context_length or lookback, self.epochs, self.num_batches_per_epoch,
                           self.batch_size, self.max_lag, seed if self.seed is None else self.seed,
                           num_samples, **self.options)


PeerSpec = Annotated[StatsPeer | NeuralPeer | LinearPeerSpec | DeepARPeer, Field(discriminator="kind")]


def run_peer(peer: PeerSpec, task: EvalTask, lookback: int, seed: int = 0, num_samples: int = 100) -> dict:
    """One bench arm: the peer's metrics and budget record on ``task``. ``lookback`` is the
    protocol's (tsdb's context length), used unless the peer sets its own."""
    result = peer.run(task, lookback, seed, num_samples)
    result["arm"] = f"peer:{peer.kind}"
    result["budget"]["cpu_count"] = os.cpu_count()
    return result
