"""``tsdb evaluate RUN``: score a run on the data it was trained for, into ``RUN/evaluation.json``.

The data comes from ``RUN/data.json`` (written by ``tsdb train`` and ``tsdb forecast``): a
user's table is scored on its own last windows, a registry dataset on its protocol (M4 Hourly:
the test part; ETTh1: the test border; others: the last rolling windows). Training metrics
(``metrics.json``, ``training.json``) are never touched. When the run trained on the windows
being scored (a ``tsdb forecast`` run trains on all of its table; ``--windows`` reaching back
into the training part), ``evaluation.json`` says ``"in_sample": true`` and why.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tsdb import checksum
from tsdb.errors import TsdbError
from tsdb.cli.preflight import DATA_FILE

PROTOCOLS = {"m4_hourly": "m4-hourly", "etth1": "etth1"}   # other datasets: rolling windows
RESULT_FILE = "evaluation.json"


def _user_task(record: dict, horizon: int, windows: int, stride: int):
    from tsdb.data.readers import read_long
    from tsdb.evaluation.tasks import rolling_task
    path = Path(record["input"])
    if not path.is_file():
        raise TsdbError(f"the run was trained on {path}, which no longer exists; put it back to evaluate the run")
    with open(path, "rb") as f:
        if hashlib.file_digest(f, "sha256").hexdigest() != record["sha256"]:
            raise TsdbError(f"{path} changed since the run was trained on it; evaluate with the original file")
    covariates = record.get("covariates")
    data = read_long(path, item_id=record["item_id"], timestamp=record["timestamp"], target=record["target"],
                     covariates=[c for c in (covariates or "").split(",") if c], freq=record["freq"])
    if covariates:   # rows after the last observed target hold the known future, not test labels
        import numpy as np
        ends = [int(np.flatnonzero(~np.isnan(s.target))[-1]) + 1 for s in data]
        data.series = [s.slice(0, end) for s, end in zip(data, ends)]
    span = horizon + (windows - 1) * stride
    short = [s.item_id for s in data if len(s) <= span]
    if short:
        raise TsdbError(f"series {short[0]!r} has too few points for {windows} window(s) of {horizon} "
                        f"(stride {stride}); lower --windows")
    return rolling_task(data.name, data, horizon, data.season_length, offset=-span, windows=windows, stride=stride,
                        info={"protocol": "rolling", "windows": windows})


def evaluate_run(run_dir: str | Path, num_samples: int = 100, num_steps: int | None = None, windows: int = 1,
                 stride: int | None = None, progress: bool = False) -> tuple[Path, dict]:
    """Score ``run_dir``; returns the path of ``evaluation.json`` and its content."""
    from tsdb.evaluation.tasks import evaluate_predictor
    from tsdb.bench.experiment import TaskSpec, build_task, torch_predictor
    from tsdb.training.loop import load_model

    run_dir = Path(run_dir)
    cfg, strategy, model = load_model(run_dir)
    horizon = cfg.model.horizon
    stride = stride or horizon
    span = horizon + (windows - 1) * stride
    recorded = run_dir / DATA_FILE
    record = checksum.read_json(recorded, f"delete {recorded} (evaluation then uses config.yaml's dataset)") \
        if recorded.exists() else None
    if record is not None and record.get("source") == "input":
        task = _user_task(record, horizon, windows, stride)
        protocol, held_out = "rolling", record.get("held_out", 0)
    else:
        name = record["dataset"] if record else cfg.data.dataset
        protocol = PROTOCOLS.get(name, "rolling")
        task = build_task(TaskSpec(protocol=protocol, dataset=name, horizon=horizon, lookback=cfg.model.context_length,
                                   windows=windows, stride=stride))
        held_out = record.get("held_out") if record else None
        if protocol == "m4-hourly":
            span = task.horizon
    if protocol == "etth1":
        in_sample, why = False, ""       # trains on rows before the validation border, tests after it
    elif held_out is None:
        in_sample, why = True, f"{run_dir} has no {DATA_FILE}, so its training data is unknown and may include " \
                               "these windows"
    elif held_out < span:
        in_sample = True
        why = (f"the run trained on all but the last {held_out} point(s) of each series and these windows cover "
               f"the last {span}: an in-sample score" if held_out else
               "the run trained on every point of its data (tsdb forecast does): an in-sample score")
    else:
        in_sample, why = False, ""
    metrics = evaluate_predictor(task, torch_predictor(strategy, model, num_steps=num_steps, seed=cfg.train.seed),
                                 cfg.model.context_length, num_samples, num_covariates=cfg.model.num_covariates,
                                 progress=progress)
    metrics = {"task": task.name, "protocol": protocol, **metrics, "in_sample": in_sample,
               "in_sample_reason": why, "num_steps": num_steps or cfg.model.inference_steps}
    path = run_dir / RESULT_FILE
    checksum.write_text(path, json.dumps(metrics, indent=2))
    return path, metrics
