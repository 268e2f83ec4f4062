"""Training memory, measured rather than assumed.

``measure_training_step`` runs one real optimizer step of a unit and counts exact bytes of
parameters, gradients, optimizer state and the tensors autograd saves for backward
(unique storages seen by ``saved_tensors_hooks``, parameters excluded). Process peak RSS
(``VmHWM``) and, on GPU, ``torch.cuda.max_memory_allocated`` are reported beside them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(tensor_bytes(state.values()) for state in optimizer.state.values())


class SavedActivations:
    """Context manager counting unique storages autograd saves for backward."""

    def __init__(self, exclude: list[Tensor] = ()):
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: dict[int, int] = {}

    def _pack(self, t: Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._exclude and ptr not in self._seen:
            self._seen[ptr] = storage.nbytes()
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())


def peak_rss_bytes() -> int | None:
    """High-water mark of this process's resident set (VmHWM), or None off Linux."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(m.group(1)) * 1024 if m else None


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def measure_training_step(module: nn.Module, loss_fn: Callable[[], Tensor],
                          make_optimizer: Callable[[list], torch.optim.Optimizer]) -> dict:
    """Exact training-state bytes of one optimizer step on ``module``.

    The optimizer is created fresh, so the module's weights change by one step; call this
    on a copy when that matters.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(params)
    optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with SavedActivations(exclude=list(module.parameters())) as saved:
        loss = loss_fn()
    loss.backward()
    grad_bytes = tensor_bytes(p.grad for p in params if p.grad is not None)
    optimizer.step()
    out = {
        "params": sum(p.numel() for p in params),
        "param_bytes": tensor_bytes(params),
        "grad_bytes": grad_bytes,
        "optimizer_bytes": optimizer_state_bytes(optimizer),
        "saved_activation_bytes": saved.bytes,
    }
    optimizer.zero_grad(set_to_none=True)
    out["train_state_bytes"] = (out["param_bytes"] + out["grad_bytes"] + out["optimizer_bytes"]
                                + out["saved_activation_bytes"])
    if torch.cuda.is_available():
        out["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated()
    return out
