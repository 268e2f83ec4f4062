"""Training memory: measured where training happens, and reduced where it can be.

Measuring
    ``MemoryMeter`` is a Lightning callback on the real ``Trainer.fit`` of a unit, so its
    figures are those of the training device, precision and optimizer. For the first
    ``steps`` optimizer steps of each unit (each optimizer) it records exact bytes of
    parameters, gradients, optimizer state and the tensors autograd saves for backward
    (unique storages seen by ``saved_tensors_hooks``, parameters excluded; under
    ``bf16-mixed`` they include the bf16 weight copies autocast keeps for backward), the
    process peak RSS (``VmHWM``), on CUDA ``torch.cuda.max_memory_allocated``, and the
    step's wall time (synchronized on CUDA) and the process's CPU time during it (on a
    shared CPU machine other jobs stretch wall time, not CPU time). Peaks are reset when each measured step
    starts, so a peak is one step's own, whatever ran before it in the process.
    ``measure_training_step`` gives the same byte counts for one step outside Lightning
    (memory sweeps of fresh models).

Reducing
    ``HostOffload`` (interleaved schedule) keeps only the unit being stepped on the
    accelerator; the others and their optimizer state wait in host memory (pinned on CUDA).
    ``checkpoint_layers`` turns on per-layer activation checkpointing (the ``e2e-ckpt``
    arm): each transformer layer keeps only its inputs for backward and recomputes the rest.
"""

from __future__ import annotations

import gc
import json
import re
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
from lightning.pytorch import Callback
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.checkpoint import checkpoint

from tsdb.nn import TransformerLayer
from tsdb.strategies.base import TrainUnit

BYTE_FIELDS = ("param_bytes", "grad_bytes", "optimizer_bytes", "saved_activation_bytes")


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(tensor_bytes(state.values()) for state in optimizer.state.values())


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class SavedActivations:
    """Context manager counting unique storages autograd saves for backward.

    ``exclude``: tensors (parameters) not to count, or a callable returning them; a callable
    is read at the first saved tensor, so parameters moved to the device just before the
    forward (``HostOffload``) are excluded at their current address.
    """

    def __init__(self, exclude: Iterable[Tensor] | Callable[[], Iterable[Tensor]] = ()):
        self._exclude_source = exclude
        self._exclude: set[int] | None = None
        self._seen: dict[int, int] = {}

    def _pack(self, t: Tensor):
        if self._exclude is None:
            source = self._exclude_source() if callable(self._exclude_source) else self._exclude_source
            self._exclude = {p.untyped_storage().data_ptr() for p in source}
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


def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"{field}:\s+(\d+) kB", text)
    return int(m.group(1)) * 1024 if m else None


# VmHWM before MemoryMeter's per-step resets: the process-wide peak keeps it
_peak_before_step_resets = 0


def peak_rss_bytes() -> int | None:
    """High-water mark of this process's resident set since it started or since the last
    ``reset_peak_rss`` (VmHWM; a ``MemoryMeter``'s per-step resets do not lower it), or
    None off Linux."""
    hwm = _status_kib("VmHWM")
    return None if hwm is None else max(hwm, _peak_before_step_resets)


def rss_bytes() -> int | None:
    """This process's resident set now (VmRSS), or None off Linux."""
    return _status_kib("VmRSS")


def reset_peak_rss() -> None:
    """Reset the process's peak RSS to its current RSS."""
    global _peak_before_step_resets
    _peak_before_step_resets = 0
    _clear_vm_hwm()


def _reset_step_peak_rss() -> None:
    """Start a step's own VmHWM, remembering the process's peak so far for ``peak_rss_bytes``."""
    global _peak_before_step_resets
    _peak_before_step_resets = max(_peak_before_step_resets, _status_kib("VmHWM") or 0)
    _clear_vm_hwm()


def _clear_vm_hwm() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def state_figures(optimizer: torch.optim.Optimizer, saved_activation_bytes: int) -> dict:
    """Exact bytes of one unit's training state right after its optimizer step (gradients
    still held): parameters, gradients, optimizer state, saved activations."""
    params = optimizer_params(optimizer)
    out = {"params": sum(p.numel() for p in params), "param_bytes": tensor_bytes(params),
           "grad_bytes": tensor_bytes(p.grad for p in params if p.grad is not None),
           "optimizer_bytes": optimizer_state_bytes(optimizer),
           "saved_activation_bytes": saved_activation_bytes}
    out["train_state_bytes"] = sum(out[k] for k in BYTE_FIELDS)
    return out


def measure_training_step(module: nn.Module, loss_fn: Callable[[], Tensor],
                          make_optimizer: Callable[[list], torch.optim.Optimizer]) -> dict:
    """Exact training-state bytes of one optimizer step on ``module`` (fp32 where it lives).

    The optimizer is created fresh, so the module's weights change by one step; call this
    on a copy when that matters. Training itself is measured by ``MemoryMeter``.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(params)
    optimizer.zero_grad(set_to_none=True)
    with SavedActivations(exclude=list(module.parameters())) as saved:
        loss = loss_fn()
    loss.backward()
    optimizer.step()
    out = state_figures(optimizer, saved.bytes)
    optimizer.zero_grad(set_to_none=True)
    return out


class MemoryMeter(Callback):
    """Measures the first ``steps`` optimizer steps of each unit of a ``Trainer.fit``.

    ``names[i]`` is the unit trained by the fit's optimizer ``i`` (one for a sequential
    unit, one per unit for the interleaved schedule). A step's figures are taken by an
    optimizer step post-hook (gradients are still held then, also under manual
    optimization); per unit the maximum over its measured steps is kept. Besides the
    unit's own ``train_state_bytes``, ``device_resident_bytes`` counts every parameter,
    gradient and optimizer-state tensor of the fit that sits on the training device at
    that moment: the unit alone when the others are offloaded (or absent), all of them
    when they stay resident.

    ``path``: the figures are also written there once measured, and read back when a fit
    resumes with no step left to measure.
    """

    def __init__(self, names: list[str], steps: int = 3, path: str | Path | None = None):
        self.names = list(names)
        self.steps = steps
        self.path = Path(path) if path else None
        self.figures: dict[str, dict] = {}
        self._counts = [0] * len(self.names)
        self._hooks: list = []
        self._saved: SavedActivations | None = None
        self._step_start: float | None = None

    # -- Lightning hooks ------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        if len(trainer.optimizers) != len(self.names):
            raise ValueError(f"MemoryMeter got {len(self.names)} unit names for {len(trainer.optimizers)} optimizers")
        self._device = pl_module.device
        self._precision = str(trainer.precision)
        self._optimizers = list(trainer.optimizers)
        self._module = pl_module
        self._hooks = [opt.register_step_post_hook(self._post_step_hook(i)) for i, opt in enumerate(self._optimizers)]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self._measuring():
            return
        self._sync()
        if min(self._counts) == 0 and self._device.type == "cuda":
            gc.collect()  # an earlier unit's tensors held in reference cycles must not count in the peak
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
        _reset_step_peak_rss()
        self._rss_at_start = rss_bytes()
        self._saved = SavedActivations(exclude=lambda: list(self._module.parameters()))
        self._saved.__enter__()
        self._stepped: int | None = None
        self._step_start, self._cpu_start = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._saved is None:
            return
        self._saved.__exit__(None, None, None)
        self._saved = None
        self._sync()
        if self._stepped is not None:  # the step's wall and CPU time, forward to optimizer step
            figures = self.figures[self.names[self._stepped]]
            figures["step_seconds"].append(time.perf_counter() - self._step_start)
            figures["step_cpu_seconds"].append(time.process_time() - self._cpu_start)
        if not self._measuring() and self._hooks:
            self._remove_hooks()
            self._write(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._hooks:  # the fit ended before every unit had all its measured steps
            self._remove_hooks()
            self._write(trainer)

    def _write(self, trainer) -> None:
        if self.path and self.figures and trainer.is_global_zero:
            self.path.write_text(json.dumps(self.figures, indent=2))

    # -- measuring ------------------------------------------------------------------------
    def _post_step_hook(self, i: int):
        def hook(optimizer, args, kwargs):
            if self._saved is None or self._counts[i] >= self.steps:
                return
            self._sync()
            step = state_figures(optimizer, self._saved.bytes)
            step["device_resident_bytes"] = self._resident_bytes()
            # the kernel's RSS counters are batched per thread (up to ~100 KiB apart), so the
            # step's VmHWM can read just below the RSS sampled at its start: the peak is at least that
            hwm = _status_kib("VmHWM")
            step["step_peak_rss_bytes"] = None if hwm is None else max(hwm, self._rss_at_start or 0)
            step["rss_bytes_at_step_start"] = self._rss_at_start
            if self._device.type == "cuda":
                step["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated(self._device)
            self._record(i, step)
            self._stepped = i
        return hook

    def _record(self, i: int, step: dict) -> None:
        name = self.names[i]
        old = self.figures.get(name)
        if old is None:
            self.figures[name] = {**step, "measured_steps": 0, "device": str(self._device),
                                  "precision": self._precision, "step_seconds": [], "step_cpu_seconds": []}
        else:
            for k, v in step.items():
                if isinstance(v, (int, float)) and isinstance(old.get(k), (int, float)):
                    old[k] = max(old[k], v)
            old["train_state_bytes"] = sum(old[k] for k in BYTE_FIELDS)
        self.figures[name]["measured_steps"] += 1
        self._counts[i] += 1

    def _resident_bytes(self) -> int:
        tensors = {}
        for opt in self._optimizers:
            for p in optimizer_params(opt):
                tensors[id(p)] = p
                if p.grad is not None:
                    tensors[id(p.grad)] = p.grad
            for state in opt.state.values():
                tensors.update({id(t): t for t in state.values() if isinstance(t, Tensor)})
        return tensor_bytes(t for t in tensors.values() if t.device == self._device)

    def _measuring(self) -> bool:
        return bool(self._hooks) and min(self._counts) < self.steps

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def unit_figures(self, name: str) -> dict:
        """The figures of unit ``name``: measured in this fit, else those a resumed fit's earlier
        run wrote to ``path``, else ``{"measured_steps": 0}``."""
        if name in self.figures:
            return self.figures[name]
        if self.path and self.path.exists():
            return json.loads(self.path.read_text()).get(name, {"measured_steps": 0})
        return {"measured_steps": 0}


def summarize_memory(per_unit: list[dict]) -> dict:
    """Run-level figures: the largest unit's training state, saved activations and (CUDA)
    step peak; units resumed without a measured step are skipped."""
    out = {}
    for key in ("train_state_bytes", "saved_activation_bytes", "cuda_max_memory_allocated"):
        values = [m[key] for m in per_unit if m.get(key) is not None]
        if values:
            out[key] = max(values)
    return out


class HostOffload(Callback):
    """Interleaved schedule: only the unit being stepped lives on the accelerator.

    Lightning moves the whole module to the device when the fit starts (so every unit's
    weights are there for a moment); at train start every unit and its optimizer state go
    to host buffers (pinned on CUDA), and a unit comes back right before its loss is
    computed, after the unit stepped before it went out. Parameters keep their identity
    (only ``.data`` moves), so optimizers, gradient clipping and checkpoints see the same
    objects; Adam's ``step`` counters stay where torch keeps them (host). On CPU the device
    is host memory and nothing moves; ``force`` moves anyway (copies through the host
    buffers; tests use it).
    """

    def __init__(self, force: bool = False):
        self.force = force
        self.enabled = False
        self.active: int | None = None
        self.modules: list[nn.Module] = []
        self._host: dict[tuple, Tensor] = {}

    def wrap(self, units: list[TrainUnit]) -> list[TrainUnit]:
        """The units with losses that first bring their unit to the device."""
        self.modules = [u.module for u in units]
        return [TrainUnit(u.name, u.module, self._loss_on_device(i, u.loss)) for i, u in enumerate(units)]

    def _loss_on_device(self, i: int, loss):
        def loss_on_device(batch):
            self.activate(i)
            return loss(batch)
        return loss_on_device

    def on_train_start(self, trainer, pl_module) -> None:
        self.device = pl_module.device
        self.enabled = self.force or self.device.type != "cpu"
        self.optimizers = list(trainer.optimizers)
        if len(self.optimizers) != len(self.modules):
            raise ValueError(f"HostOffload wraps {len(self.modules)} units but the fit has "
                             f"{len(self.optimizers)} optimizers")
        if self.enabled:
            for i in range(len(self.modules)):
                self._move(i, to_host=True)
            self.active = None

    def on_train_end(self, trainer, pl_module) -> None:
        if self.enabled and self.active is not None:
            self._move(self.active, to_host=True)
            self.active = None

    def activate(self, i: int) -> None:
        """Unit ``i`` and its optimizer state on the device; the unit active before goes to host."""
        if not self.enabled or self.active == i:
            return
        if self.active is not None:
            self._move(self.active, to_host=True)
        self._move(i, to_host=False)
        self.active = i

    def resident(self, i: int) -> bool:
        return self.enabled and self.active == i

    def host_buffer(self, key: tuple) -> Tensor | None:
        """The host copy kept for ``("param", id(p))`` or ``("state", id(p), name)``."""
        return self._host.get(key)

    def _move(self, i: int, to_host: bool) -> None:
        opt = self.optimizers[i]
        for p in self.modules[i].parameters():
            p.data = self._place(("param", id(p)), p.data, to_host)
            if p.grad is not None:
                p.grad = self._place(("grad", id(p)), p.grad, to_host)
            state = opt.state.get(p, {})
            for name, value in state.items():
                if isinstance(value, Tensor) and name != "step":
                    state[name] = self._place(("state", id(p), name), value, to_host)
        if to_host and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # host copies readable (checkpoints)

    def _place(self, key: tuple, t: Tensor, to_host: bool) -> Tensor:
        if not to_host:
            return t.to(self.device, non_blocking=True, copy=True)
        buf = self._host.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.device.type == "cuda")
            self._host[key] = buf
        if buf.data_ptr() != t.data_ptr():
            buf.copy_(t, non_blocking=True)
        return buf


# -- activation checkpointing ---------------------------------------------------------------

class CheckpointedLayer(TransformerLayer):
    """A ``TransformerLayer`` whose context and future paths keep only their inputs for
    backward and recompute the rest (``torch.utils.checkpoint``, non-reentrant).

    ``checkpoint_layers`` swaps the class of existing layers, so parameter names, state
    dicts and checkpoints are those of the plain model (``model.pt`` loads into it).
    """

    def context(self, *args, **kwargs):
        return _checkpointed(super().context, *args, **kwargs)

    def future(self, *args, **kwargs):
        return _checkpointed(super().future, *args, **kwargs)


def _checkpointed(fn, *args, **kwargs):
    if not torch.is_grad_enabled():  # inference: nothing is saved, nothing to recompute
        return fn(*args, **kwargs)
    # every tensor as its own argument (not inside a KV tuple), so checkpoint keeps them as
    # saved tensors, where saved_tensors_hooks (and so the memory figures) see them
    flat, spec = tree_flatten((args, kwargs))

    def call(*leaves):
        a, kw = tree_unflatten(list(leaves), spec)
        return fn(*a, **kw)
    return tree_map(_compact, checkpoint(call, *flat, use_reentrant=False))


def _compact(t):
    """An output that views part of a larger buffer (a layer's values are a slice of its qkv
    projection) is copied, so that keeping it for the next checkpoint keeps only itself."""
    if isinstance(t, Tensor) and t.untyped_storage().nbytes() > t.numel() * t.element_size():
        return t.contiguous() if not t.is_contiguous() else t.clone()
    return t


def checkpoint_layers(model: nn.Module) -> int:
    """Per-layer activation checkpointing for every transformer layer of ``model``; returns
    how many layers it covers."""
    layers = [m for m in model.modules() if type(m) is TransformerLayer]
    for layer in layers:
        layer.__class__ = CheckpointedLayer
    return len(layers)
