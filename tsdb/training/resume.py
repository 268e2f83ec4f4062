"""What makes ``tsdb train`` resume exactly and stop cleanly.

- :class:`ChecksummedCheckpointIO`: Lightning's checkpoint IO plugin, writing ``last.ckpt``
  atomically with a sha256 sidecar and verifying it before a resume (:mod:`tsdb.checksum`).
- :class:`ResumableWindows`: a LightningModule mixin that puts the data stream's position
  (windows consumed) into the checkpoint and restarts the window stream there, so a killed
  and resumed run sees exactly the batches of an uninterrupted one.
- :class:`StopOnSignal` (inside :func:`tsdb.signals.graceful_signals`): SIGTERM (Lightning's
  own handler and ``trainer.received_sigterm``) or SIGINT stop training at the next step
  boundary, save ``last.ckpt`` there and raise :class:`tsdb.errors.Interrupted`.
"""

from __future__ import annotations

import io
import signal
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from tsdb import checksum
from tsdb.errors import Interrupted
from tsdb.signals import received

CORRUPT_CKPT_FIX = "delete it (and its .sha256) to restart this block from scratch"


class ChecksummedCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to bytes, written atomically with a sidecar; verified on load."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        checksum.write_bytes(path, buf.getvalue())

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        checksum.verify(path, CORRUPT_CKPT_FIX)
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except Exception as e:  # noqa: BLE001  (a truncated file without sidecar, a foreign file)
            from tsdb.errors import TsdbError
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise TsdbError(f"{path} is not a readable checkpoint ({reason}); {CORRUPT_CKPT_FIX}") from None

    def remove_checkpoint(self, path) -> None:
        checksum.remove(path)


class ResumableWindows:
    """Mixin for LightningModules that own ``self.windows`` (a ``TrainingWindows``) and
    ``self.train_cfg``: the loader starts at the checkpointed stream position."""

    _resume_position: int | None = None

    def train_dataloader(self):
        from torch.utils.data import DataLoader

        from tsdb.errors import TsdbError
        world, rank = self.trainer.world_size, self.trainer.global_rank
        batch = self.train_cfg.batch_size
        if batch % world:
            raise TsdbError(f"batch_size {batch} must be divisible by ddp_devices {world}")
        position = self._resume_position
        if position is None:
            position = self.trainer.global_step * batch
        # each data-parallel process takes its share of one global window stream, so DDP over
        # W processes sees exactly the batches of a single process
        windows = self.windows.start_at(position).shard(rank, world, batch // world)
        return DataLoader(windows, batch_size=batch // world, num_workers=self.train_cfg.num_workers)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tsdb_data"] = {"windows_consumed": int(self.trainer.global_step * self.train_cfg.batch_size),
                                   "seed": int(self.windows.seed)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        data = checkpoint.get("tsdb_data")
        if data is not None:
            self._resume_position = int(data["windows_consumed"])


# -- signals --------------------------------------------------------------------------------

class StopOnSignal(Callback):
    """At a step boundary after SIGTERM/SIGINT: save ``ckpt_path`` there and stop with
    :class:`tsdb.errors.Interrupted` (its message says how to resume)."""

    def __init__(self, ckpt_path: str | Path, unit: str):
        self.ckpt_path = Path(ckpt_path)
        self.unit = unit

    def _signum(self, trainer) -> int | None:
        if received() is not None:
            return received()
        return signal.SIGTERM if trainer.received_sigterm else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        signum = self._signum(trainer)
        if signum is None or trainer.global_step >= trainer.max_steps:
            return   # the last step: let the block finish normally
        trainer.save_checkpoint(self.ckpt_path)
        name = signal.Signals(signum).name
        raise Interrupted(signum, f"{name} at {self.unit} step {trainer.global_step}: checkpoint saved to "
                                  f"{self.ckpt_path}")


__all__ = ["ChecksummedCheckpointIO", "ResumableWindows", "StopOnSignal"]
