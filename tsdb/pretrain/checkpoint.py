"""Pretrained checkpoints: a folder with ``config.yaml`` (the `ExperimentConfig` the model was
built from) and ``model.safetensors`` (its weights), small enough to commit and ship.

A checkpoint folder is also a run directory as far as `tsdb.training.loop.load_model` is
concerned, so ``tsdb export``, ``tsdb forecast --pretrained``, ``tsdb finetune`` and
`tsdb.pretrain.TsdbPipeline` all take either a checkpoint folder or a trained run directory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from tsdb.config import ExperimentConfig
from tsdb.errors import TsdbError
from tsdb.pretrain import WEIGHTS_FILE

# shipped weights are float16 (half the bytes; loading casts them back to the model's float32),
# and the zero-shot figures are measured on the rounded weights (`as_shipped`)
SHIPPED_DTYPE = torch.float16


def shipped_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as a checkpoint stores it: floating tensors in :data:`SHIPPED_DTYPE`,
    contiguous, on the CPU (safetensors refuses shared or strided storage)."""
    return {k: (v.to(SHIPPED_DTYPE) if v.is_floating_point() else v).detach().contiguous().cpu()
            for k, v in model.state_dict().items()}


def as_shipped(model: nn.Module) -> nn.Module:
    """``model`` with its weights rounded as a shipped checkpoint holds them (in place)."""
    model.load_state_dict(shipped_state(model))
    return model


def save_pretrained(cfg: ExperimentConfig, model: nn.Module, out_dir: str | Path, info: dict | None = None) -> Path:
    """Write ``config.yaml``, ``model.safetensors`` and ``checkpoint.json`` (sha256 of the
    weights, parameter count, ``info``) to ``out_dir``; returns it."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(out / "config.yaml")
    save_file(shipped_state(model), str(out / WEIGHTS_FILE))
    digest = hashlib.sha256((out / WEIGHTS_FILE).read_bytes()).hexdigest()
    meta = {"weights": WEIGHTS_FILE, "sha256": digest, "bytes": (out / WEIGHTS_FILE).stat().st_size,
            "params": sum(p.numel() for p in model.parameters()), "dtype": str(SHIPPED_DTYPE).removeprefix("torch."),
            "strategy": cfg.model.strategy, **(info or {})}
    (out / "checkpoint.json").write_text(json.dumps(meta, indent=2))
    return out


def load_pretrained(path: str | Path):
    """``(cfg, strategy, model)`` from a checkpoint folder or a trained run directory; the model
    is in eval mode on the CPU."""
    from tsdb.training.loop import load_model

    path = Path(path)
    if not (path / "config.yaml").exists():
        raise TsdbError(f"{path} is neither a pretrained checkpoint folder ({WEIGHTS_FILE} + config.yaml) nor a "
                        "trained run directory; pass the folder `tsdb pretrain` or `tsdb train` wrote")
    return load_model(path)
