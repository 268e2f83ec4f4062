"""Training with Lightning, one unit (block) at a time.

Schedules:
- ``sequential`` (default): one LightningModule and one ``Trainer.fit`` per unit; only that
  unit is on the accelerator, and a finished unit is saved, marked done and moved off it.
- ``interleaved`` (the paper): a random unit per step, one optimizer per unit, manual
  optimization.

Run directory::

    RUN/config.yaml                     the ExperimentConfig
    RUN/identity.json                   hashes of the config and of the training data (a resume
                                        with another config or other data is refused)
    RUN/units/<unit>/last.ckpt          Lightning checkpoint (resume after a kill)
    RUN/units/<unit>/done.json          finished marker with train seconds and memory
    RUN/model.pt                        all units' weights once every unit is done
    RUN/training.json                   per-unit seconds and memory (bytes), peak RSS
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
from torch.utils.data import DataLoader

from tsdb.config import ExperimentConfig, TrainConfig
from tsdb.data.series import SeriesDataset
from tsdb.data.windows import TrainingWindows
from tsdb.errors import TsdbError
from tsdb.provenance import dataset_identity, mismatch, record
from tsdb.training.memory import measure_training_step, peak_rss_bytes
from tsdb.strategies import Strategy, TrainUnit, get_strategy

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


class UnitModule(L.LightningModule):
    """Lightning wrapper that trains one unit's parameters on its own loss."""

    def __init__(self, unit: TrainUnit, train: TrainConfig, windows: TrainingWindows):
        super().__init__()
        self.unit = unit.module
        self._loss = unit.loss
        self.train_cfg = train
        self.windows = windows

    def train_dataloader(self) -> DataLoader:
        # each data-parallel process takes its share of one global window stream, so
        # DDP over W processes sees exactly the batches of a single process
        world, rank = self.trainer.world_size, self.trainer.global_rank
        return _loader(self.windows.shard(rank, world), self.train_cfg, world)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("loss", loss, prog_bar=True, on_step=True)
        return loss

    def configure_optimizers(self):
        opt = make_optimizer(self.unit.parameters(), self.train_cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, warmup_cosine(self.train_cfg.warmup_steps, self.train_cfg.steps_per_block))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class InterleavedModule(L.LightningModule):
    """The paper's schedule: each step trains one unit drawn uniformly at random.

    One optimizer per unit; ``zero_grad(set_to_none=True)`` right after each step so idle
    units hold no gradients.
    """

    def __init__(self, units: list[TrainUnit], train: TrainConfig):
        super().__init__()
        self.automatic_optimization = False
        self.units = nn.ModuleList(u.module for u in units)
        self._losses = [u.loss for u in units]
        self.train_cfg = train
        self._rng = torch.Generator().manual_seed(train.seed)

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
                                 every_n_train_steps=max(1, min(500, max_steps // 4)))]
    if train.progress:
        callbacks.append(_NamedProgressBar(name))
    # the last layer's context-side norm feeds nothing, so DDP must tolerate unused parameters
    ddp = ({"devices": train.ddp_devices, "strategy": "ddp_find_unused_parameters_true"}
           if train.ddp_devices > 1 else {"devices": 1})
    return L.Trainer(max_steps=max_steps, accelerator=train.accelerator, **ddp,
                     precision=resolve_precision(train), gradient_clip_val=None if manual else train.grad_clip,
                     callbacks=callbacks, logger=CSVLogger(unit_dir, name="logs", version=""),
                     enable_progress_bar=train.progress, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, deterministic=False)


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


def _unit_memory(unit: TrainUnit, batch, train: TrainConfig) -> dict:
    """Training-state bytes of one real step of ``unit``; its weights are restored afterwards."""
    state = {k: v.clone() for k, v in unit.module.state_dict().items()}
    stats = measure_training_step(unit.module, lambda: unit.loss(batch), lambda p: make_optimizer(p, train))
    unit.module.load_state_dict(state)
    return stats


def train_model(cfg: ExperimentConfig, dataset: SeriesDataset, run_dir: str | Path,
                strategy: Strategy | None = None, blocks: list[int] | None = None) -> tuple[nn.Module, dict]:
    """Train the units of ``cfg``'s strategy on ``dataset`` into ``run_dir``; resumable.

    ``blocks`` trains only those unit indices (one job of a block-parallel or cluster
    array run); ``model.pt`` is written once every unit is done. Returns the model and a
    summary (per-unit seconds and memory).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_config_matches(cfg, run_dir, dataset)
    strategy = strategy or get_strategy(cfg.model)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    model = strategy.build()
    units = strategy.units(model)
    if blocks is not None:
        _check_blocks(blocks, units)
    windows = TrainingWindows(dataset, cfg.model.context_length, cfg.model.horizon, seed=cfg.train.seed,
                              patch_length=cfg.model.patch_length,
                              partial_patch_prob=cfg.model.partial_patch_prob,
                              covariates=cfg.model.num_covariates, draw_sets=strategy.draw_sets)
    probe = next(iter(_loader(windows, cfg.train)))
    if cfg.train.schedule == "interleaved" and len(units) > 1:
        summary = _train_interleaved(units, windows, probe, cfg.train, run_dir)
    else:
        summary = {u.name: _train_unit(u, windows, probe, cfg.train, run_dir / "units" / u.name)
                   for i, u in enumerate(units) if blocks is None or i in blocks}
    if _is_global_zero() and all(_unit_done(run_dir, u) for u in units) and cfg.train.schedule != "interleaved":
        for u in units:  # units trained by other processes
            u.module.load_state_dict(torch.load(run_dir / "units" / u.name / "weights.pt", weights_only=True))
        summary = {u.name: json.loads((run_dir / "units" / u.name / "done.json").read_text()) for u in units}
    result = _summarize(summary, model)
    if _is_global_zero() and len(summary) == len(units):
        torch.save(model.state_dict(), run_dir / "model.pt")
        # the run's training metrics: seconds and exact training-state bytes per unit, peak RSS
        (run_dir / "training.json").write_text(json.dumps(result, indent=2))
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
        u.module.load_state_dict(torch.load(run_dir / "units" / u.name / "weights.pt", weights_only=True))
    torch.save(model.state_dict(), run_dir / "model.pt")
    return _summarize({u.name: json.loads((run_dir / "units" / u.name / "done.json").read_text())
                       for u in units}, model)


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
        "train_state_bytes": max(m["train_state_bytes"] for m in mems),
        "saved_activation_bytes": max(m["saved_activation_bytes"] for m in mems),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def _train_unit(unit: TrainUnit, windows, probe, train: TrainConfig, unit_dir: Path) -> dict:
    done = unit_dir / "done.json"
    weights = unit_dir / "weights.pt"
    if done.exists() and weights.exists():
        unit.module.load_state_dict(torch.load(weights, weights_only=True))
        return json.loads(done.read_text())
    unit_dir.mkdir(parents=True, exist_ok=True)
    memory = _unit_memory(unit, probe, train)
    module = UnitModule(unit, train, windows)
    trainer = _trainer(train, unit_dir, train.steps_per_block, unit.name)
    ckpt = unit_dir / "last.ckpt"
    start = time.perf_counter()
    trainer.fit(module, ckpt_path=str(ckpt) if ckpt.exists() else None)
    seconds = time.perf_counter() - start
    unit.module.to("cpu")  # the finished block leaves the accelerator
    if not trainer.is_global_zero:
        return {"seconds": seconds, "steps": trainer.global_step, "memory": memory}
    torch.save(unit.module.state_dict(), weights)
    info = {"seconds": seconds, "steps": trainer.global_step, "memory": memory,
            "final_loss": float(trainer.callback_metrics.get("loss", float("nan")))}
    done.write_text(json.dumps(info, indent=2))
    return info


def _train_interleaved(units: list[TrainUnit], windows, probe, train: TrainConfig, run_dir: Path) -> dict:
    unit_dir = run_dir / "units" / "interleaved"
    done = unit_dir / "done.json"
    module = InterleavedModule(units, train)
    if done.exists():
        module.units.load_state_dict(torch.load(unit_dir / "weights.pt", weights_only=True))
        return json.loads(done.read_text())
    unit_dir.mkdir(parents=True, exist_ok=True)
    memory = {u.name: _unit_memory(u, probe, train) for u in units}
    total = train.steps_per_block * len(units)
    trainer = _trainer(train, unit_dir, total, "interleaved", manual=True)
    ckpt = unit_dir / "last.ckpt"
    start = time.perf_counter()
    trainer.fit(module, _loader(windows, train), ckpt_path=str(ckpt) if ckpt.exists() else None)
    seconds = time.perf_counter() - start
    module.to("cpu")
    torch.save(module.units.state_dict(), unit_dir / "weights.pt")
    info = {u.name: {"seconds": seconds / len(units), "steps": total // len(units), "memory": memory[u.name]}
            for u in units}
    done.write_text(json.dumps(info, indent=2))
    return info


def _check_config_matches(cfg: ExperimentConfig, run_dir: Path, dataset: SeriesDataset) -> None:
    """Refuse to resume a run directory written with a different configuration or other
    training data (one line naming the fields that differ); record both for a new run."""
    path, ident = run_dir / "config.yaml", run_dir / "identity.json"
    new = record({"model": cfg.model.model_dump(), "train": cfg.train.model_dump(exclude={"progress"})},
                 dataset_identity(dataset))
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
    """Rebuild a trained model from its run directory."""
    run_dir = Path(run_dir)
    if not (run_dir / "model.pt").exists():
        raise TsdbError(f"{run_dir} has no trained model (model.pt); run `tsdb train` first")
    cfg = ExperimentConfig.from_yaml(run_dir / "config.yaml")
    strategy = get_strategy(cfg.model)
    model = strategy.build()
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    model.eval()
    return cfg, strategy, model
