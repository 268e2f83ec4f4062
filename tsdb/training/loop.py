"""Training with Lightning, one unit (block) at a time.

Schedules:
- ``sequential`` (default): one LightningModule and one ``Trainer.fit`` per unit; only that
  unit is on the accelerator, and a finished unit is saved, marked done and moved off it.
- ``interleaved`` (the paper): a random unit per step, one optimizer per unit, manual
  optimization; on an accelerator the inactive units and their optimizer state wait in
  host memory (``HostOffload``).

Memory is measured on the first real optimizer steps of each unit (``MemoryMeter``).

Run directory::

    RUN/config.yaml                     the ExperimentConfig
    RUN/identity.json                   hashes of the config and of the training data (a resume
                                        with another config or other data is refused)
    RUN/units/<unit>/last.ckpt          Lightning checkpoint (resume after a kill; holds the data
                                        stream's position, so a resumed run equals an uninterrupted one)
    RUN/units/<unit>/done.json          finished marker with train seconds and memory
    RUN/units/<unit>/memory.json        the memory figures, once measured (kept for a resume)
    RUN/model.pt                        all units' weights once every unit is done
    RUN/training.json                   per-unit seconds and memory (bytes), peak RSS

Checkpoints and weights are written atomically with a sha256 sidecar (``*.sha256``) and
verified when read. SIGTERM/SIGINT stop training at the next step boundary, save
``last.ckpt`` there and raise ``tsdb.errors.Interrupted``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from tsdb import checksum
from tsdb.cli.preflight import MODEL_FIX
from tsdb.pretrain import WEIGHTS_FILE
from tsdb.config import ExperimentConfig, TrainConfig
from tsdb.data.series import SeriesDataset
from tsdb.data.windows import TrainingWindows
from tsdb.errors import TsdbError
from tsdb.provenance import dataset_identity, mismatch, record
from tsdb.signals import graceful_signals, stop_if_received
from tsdb.strategies import Strategy, TrainUnit, get_strategy
from tsdb.training.memory import HostOffload, MemoryMeter, checkpoint_layers, peak_rss_bytes, summarize_memory
from tsdb.training.resume import ChecksummedCheckpointIO, ResumableWindows, StopOnSignal

logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
logging.getLogger("lightning.fabric").setLevel(logging.WARNING)


def warmup_cosine(warmup: int, total: int, floor: float = 0.1):
    """LR multiplier: linear warmup, then cosine decay to ``floor``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def make_optimizer(params, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (linear weights, the lead-time table), as in
    nanoGPT: decaying biases and LayerNorm gains toward 0 only fights the normalisation."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=train.lr)


class UnitModule(ResumableWindows, L.LightningModule):
    """Lightning wrapper that trains one unit's parameters on its own loss."""

    def __init__(self, unit: TrainUnit, train: TrainConfig, windows: TrainingWindows):
        super().__init__()
        self.unit = unit.module
        self._loss = unit.loss
        self.train_cfg = train
        self.windows = windows

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("loss", loss, prog_bar=True, on_step=True)
        return loss

    def configure_optimizers(self):
        opt = make_optimizer(self.unit.parameters(), self.train_cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, warmup_cosine(self.train_cfg.warmup_steps, self.train_cfg.steps_per_block))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class InterleavedModule(ResumableWindows, L.LightningModule):
    """The paper's schedule: each step trains one unit drawn uniformly at random.

    One optimizer per unit; ``zero_grad(set_to_none=True)`` right after each step so idle
    units hold no gradients. The unit draw's generator state is checkpointed.
    """

    def __init__(self, units: list[TrainUnit], train: TrainConfig, windows: TrainingWindows | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.units = nn.ModuleList(u.module for u in units)
        self._losses = [u.loss for u in units]
        self.train_cfg = train
        self.windows = windows
        self._rng = torch.Generator().manual_seed(train.seed)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["tsdb_unit_rng"] = self._rng.get_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "tsdb_unit_rng" in checkpoint:
            self._rng.set_state(checkpoint["tsdb_unit_rng"])

    def training_step(self, batch, batch_idx):
        i = int(torch.randint(len(self.units), (1,), generator=self._rng))
        opt = self.optimizers()[i]
        sched = self.lr_schedulers()[i]
        loss = self._losses[i](batch)
        self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=self.train_cfg.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        self.log("loss", loss, prog_bar=True, on_step=True)
        self.log("unit", float(i), prog_bar=True, on_step=True)

    def configure_optimizers(self):
        total = self.train_cfg.steps_per_block
        opts = [make_optimizer(u.parameters(), self.train_cfg) for u in self.units]
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, warmup_cosine(self.train_cfg.warmup_steps, total))
                  for o in opts]
        return opts, scheds


def resolve_precision(train: TrainConfig) -> str:
    if train.precision != "auto":
        return train.precision
    return "bf16-mixed" if torch.cuda.is_available() else "32"


def _trainer(train: TrainConfig, unit_dir: Path, max_steps: int, name: str, manual: bool = False) -> L.Trainer:
    """A Trainer for one unit; ``manual`` optimization clips gradients itself."""
    callbacks = [ModelCheckpoint(dirpath=unit_dir, save_last=True, save_top_k=0,
                                 every_n_train_steps=max(1, min(500, max_steps // 4))),
                 StopOnSignal(unit_dir / "last.ckpt", name)]
    if train.progress:
        callbacks.append(_NamedProgressBar(name))
    # the last layer's context-side norm feeds nothing, so DDP must tolerate unused parameters
    ddp = ({"devices": train.ddp_devices, "strategy": "ddp_find_unused_parameters_true"}
           if train.ddp_devices > 1 else {"devices": 1})
    return L.Trainer(max_steps=max_steps, accelerator=train.accelerator, **ddp,
                     precision=resolve_precision(train), gradient_clip_val=None if manual else train.grad_clip,
                     callbacks=callbacks, logger=CSVLogger(unit_dir, name="logs", version=""),
                     enable_progress_bar=train.progress, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, deterministic=False,
                     plugins=[ChecksummedCheckpointIO()])


class _NamedProgressBar(TQDMProgressBar):
    """A progress bar per unit, labelled with the unit's name."""

    def __init__(self, name: str):
        super().__init__(refresh_rate=20)
        self._name = name

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        bar.set_description(self._name)
        return bar

    def on_train_epoch_start(self, trainer, pl_module):
        super().on_train_epoch_start(trainer, pl_module)
        self.train_progress_bar.set_description(self._name)


def _loader(windows: TrainingWindows, train: TrainConfig, world_size: int = 1) -> DataLoader:
    if train.batch_size % world_size:
        raise TsdbError(f"batch_size {train.batch_size} must be divisible by ddp_devices {world_size}")
    return DataLoader(windows, batch_size=train.batch_size // world_size, num_workers=train.num_workers)


def _done_info(unit_dir: Path) -> dict:
    return checksum.read_json(unit_dir / "done.json", f"delete {unit_dir} to retrain that unit")


def _load_weights(path: Path) -> dict:
    return checksum.load_state_dict(path, f"delete {path.parent} to retrain that unit")


def train_model(cfg: ExperimentConfig, dataset: SeriesDataset | None, run_dir: str | Path,
                strategy: Strategy | None = None, blocks: list[int] | None = None,
                windows: IterableDataset | None = None) -> tuple[nn.Module, dict]:
    """Train the units of ``cfg``'s strategy on ``dataset`` into ``run_dir``; resumable.

    ``blocks`` trains only those unit indices (one job of a block-parallel or cluster
    array run); ``model.pt`` is written once every unit is done. ``windows`` replaces the
    windows cut from ``dataset`` by another stream of the same tuples with a ``shard(rank,
    world_size)`` method (e.g. the pretraining corpus, ``tsdb.pretrain.CorpusWindows``).
    Returns the model and a summary (per-unit seconds and memory).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_config_matches(cfg, run_dir, dataset_identity(dataset) if windows is None else windows.identity())
    strategy = strategy or get_strategy(cfg.model)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    model = strategy.build()
    if cfg.train.activation_checkpointing:
        checkpoint_layers(model)
    units = strategy.units(model)
    if blocks is not None:
        _check_blocks(blocks, units)
    if windows is None:
        windows = TrainingWindows(dataset, cfg.model.context_length, cfg.model.horizon, seed=cfg.train.seed,
                                  patch_length=cfg.model.patch_length,
                                  partial_patch_prob=cfg.model.partial_patch_prob,
                                  covariates=cfg.model.num_covariates, draw_sets=strategy.draw_sets,
                                  scale_weighting=cfg.train.scale_weighting)
    with graceful_signals():     # SIGTERM/SIGINT: stop at a step boundary with a checkpoint
        if cfg.train.schedule == "interleaved" and len(units) > 1:
            summary = _train_interleaved(units, windows, cfg.train, run_dir)
        else:
            summary = {}
            for i, u in enumerate(units):
                if blocks is None or i in blocks:
                    stop_if_received(f"before {u.name} started (earlier units are saved)")
                    summary[u.name] = _train_unit(u, windows, cfg.train, run_dir / "units" / u.name)
    if _is_global_zero() and all(_unit_done(run_dir, u) for u in units) and cfg.train.schedule != "interleaved":
        for u in units:  # units trained by other processes
            u.module.load_state_dict(_load_weights(run_dir / "units" / u.name / "weights.pt"))
        summary = {u.name: _done_info(run_dir / "units" / u.name) for u in units}
    result = _summarize(summary, model)
    if _is_global_zero() and len(summary) == len(units):
        checksum.save_state_dict(model.state_dict(), run_dir / "model.pt")
        # the run's training metrics: seconds and exact training-state bytes per unit, peak RSS
        checksum.write_text(run_dir / "training.json", json.dumps(result, indent=2))
    return model, result


def assemble_run(run_dir: str | Path) -> dict:
    """Check that every unit of a run finished and join them into ``model.pt``."""
    run_dir = Path(run_dir)
    cfg = ExperimentConfig.from_yaml(run_dir / "config.yaml")
    strategy = get_strategy(cfg.model)
    model = strategy.build()
    units = strategy.units(model)
    missing = [u.name for u in units if not _unit_done(run_dir, u)]
    if missing:
        raise TsdbError(f"{run_dir}: units {missing} are not finished; run `tsdb train --block K` for each")
    for u in units:
        u.module.load_state_dict(_load_weights(run_dir / "units" / u.name / "weights.pt"))
    checksum.save_state_dict(model.state_dict(), run_dir / "model.pt")
    return _summarize({u.name: _done_info(run_dir / "units" / u.name) for u in units}, model)


def _unit_done(run_dir: Path, unit: TrainUnit) -> bool:
    d = run_dir / "units" / unit.name
    return (d / "done.json").exists() and (d / "weights.pt").exists()


def _check_blocks(blocks: list[int], units: list[TrainUnit]) -> None:
    bad = [b for b in blocks if not 0 <= b < len(units)]
    if bad:
        raise TsdbError(f"--block {bad} out of range: this model has units 0..{len(units) - 1}")


def _is_global_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0


def _summarize(per_unit: dict, model: nn.Module) -> dict:
    mems = [u["memory"] for u in per_unit.values()]
    return {
        "units": per_unit,
        "train_seconds": sum(u["seconds"] for u in per_unit.values()),
        "params": sum(p.numel() for p in model.parameters()),
        **summarize_memory(mems),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def _train_unit(unit: TrainUnit, windows, train: TrainConfig, unit_dir: Path) -> dict:
    done = unit_dir / "done.json"
    weights = unit_dir / "weights.pt"
    if done.exists() and weights.exists():
        unit.module.load_state_dict(_load_weights(weights))
        return checksum.read_json(done, f"delete {unit_dir} to retrain that unit")
    unit_dir.mkdir(parents=True, exist_ok=True)
    module = UnitModule(unit, train, windows)
    trainer = _trainer(train, unit_dir, train.steps_per_block, unit.name)
    meter = MemoryMeter([unit.name], train.measure_steps, unit_dir / "memory.json")  # the first real steps
    trainer.callbacks.append(meter)
    ckpt = unit_dir / "last.ckpt"
    start = time.perf_counter()
    trainer.fit(module, ckpt_path=str(ckpt) if ckpt.exists() else None)
    seconds = time.perf_counter() - start
    memory = meter.unit_figures(unit.name)
    unit.module.to("cpu")  # the finished block leaves the accelerator
    if not trainer.is_global_zero:
        return {"seconds": seconds, "steps": trainer.global_step, "memory": memory}
    checksum.save_state_dict(unit.module.state_dict(), weights)
    info = {"seconds": seconds, "steps": trainer.global_step, "memory": memory,
            "final_loss": float(trainer.callback_metrics.get("loss", float("nan")))}
    checksum.write_text(done, json.dumps(info, indent=2))
    return info


def _train_interleaved(units: list[TrainUnit], windows, train: TrainConfig, run_dir: Path) -> dict:
    unit_dir = run_dir / "units" / "interleaved"
    done = unit_dir / "done.json"
    offload = HostOffload()  # inactive units and their optimizer state wait in host memory
    module = InterleavedModule(offload.wrap(units), train, windows)
    if done.exists():
        module.units.load_state_dict(_load_weights(unit_dir / "weights.pt"))
        return checksum.read_json(done, f"delete {unit_dir} to retrain that unit")
    unit_dir.mkdir(parents=True, exist_ok=True)
    total = train.steps_per_block * len(units)
    trainer = _trainer(train, unit_dir, total, "interleaved", manual=True)
    meter = MemoryMeter([u.name for u in units], train.measure_steps, unit_dir / "memory.json")
    trainer.callbacks += [offload, meter]
    ckpt = unit_dir / "last.ckpt"
    start = time.perf_counter()
    trainer.fit(module, ckpt_path=str(ckpt) if ckpt.exists() else None)
    seconds = time.perf_counter() - start
    module.to("cpu")
    checksum.save_state_dict(module.units.state_dict(), unit_dir / "weights.pt")
    resident = "host" if offload.enabled else "resident"
    info = {u.name: {"seconds": seconds / len(units), "steps": total // len(units),
                     "memory": {**meter.unit_figures(u.name), "inactive_units": resident}} for u in units}
    checksum.write_text(done, json.dumps(info, indent=2))
    return info


def _check_config_matches(cfg: ExperimentConfig, run_dir: Path, data: dict) -> None:
    """Refuse to resume a run directory written with a different configuration or other
    training data (one line naming the fields that differ); record both for a new run."""
    path, ident = run_dir / "config.yaml", run_dir / "identity.json"
    new = record({"model": cfg.model.model_dump(), "train": cfg.train.model_dump(exclude={"progress"})}, data)
    if path.exists():
        old = ExperimentConfig.from_yaml(path)
        stored = json.loads(ident.read_text()) if ident.exists() else \
            record({"model": old.model.model_dump(), "train": old.train.model_dump(exclude={"progress"})}, new["data"])
        diff = mismatch(stored, new)
        if diff:
            what = (f"a different config ({diff['config']})" if "config" in diff else
                    f"other training data ({diff.get('data') or diff.get('record')})")
            raise TsdbError(f"{run_dir} holds a run with {what}; pick a new --out directory or delete {run_dir}")
    else:
        cfg.to_yaml(path)
    if not ident.exists():  # (a run from before identity records: its config was checked above)
        tmp = ident.with_name(f".{ident.name}.{os.getpid()}")  # block-parallel workers may race here
        tmp.write_text(json.dumps(new, indent=2))
        tmp.replace(ident)


def load_model(run_dir: str | Path) -> tuple[ExperimentConfig, Strategy, nn.Module]:
    """Rebuild a trained model from its run directory (``model.pt``), or from a checkpoint
    folder with ``model.safetensors`` beside ``config.yaml`` (a shipped pretrained model)."""
    run_dir = Path(run_dir)
    weights = run_dir / "model.pt"
    if not weights.exists():
        weights = run_dir / WEIGHTS_FILE      # a shipped checkpoint folder
    if not weights.exists():
        raise TsdbError(f"{run_dir} has no trained model (model.pt); run `tsdb train` first")
    cfg = ExperimentConfig.from_yaml(run_dir / "config.yaml")
    strategy = get_strategy(cfg.model)
    model = strategy.build()
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file   # (no code runs on load)
        try:
            state = load_file(weights)
        except Exception as e:  # noqa: BLE001  (truncated or foreign file)
            raise TsdbError(f"{weights} is not a readable safetensors file ({str(e)[:120]}); "
                            "copy the checkpoint folder again") from None
    else:
        state = checksum.load_state_dict(weights, MODEL_FIX)
    bad = [k for k, v in state.items()
           if not isinstance(v, torch.Tensor) or v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TsdbError(f"{weights}: weight {bad[0]!r} is not a finite tensor (a corrupt file "
                        "or a diverged run); retrain the run")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as e:
        raise TsdbError(f"{weights} does not fit the model of {run_dir / 'config.yaml'} "
                        f"({str(e).splitlines()[0][:120]}); retrain the run") from None
    model.eval()
    return cfg, strategy, model
