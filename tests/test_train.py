"""Training: gradient isolation, resumability, memory accounting, a model that learns."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

import tsdb.training.loop as train_mod
from tsdb.config import ExperimentConfig
from tsdb.data.series import Series, SeriesDataset
from tsdb.errors import TsdbError
from tsdb.training.memory import SavedActivations, measure_training_step
from tsdb.strategies import get_strategy
from tsdb.training.loop import InterleavedModule, load_model, train_model


def sine_dataset(n=4, length=600, seed=0) -> SeriesDataset:
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    series = [Series(f"s{i}", (10 + (i + 1) * np.sin(2 * np.pi * t / 24 + i)
                               + 0.1 * rng.standard_normal(length)).astype(np.float32),
                     pd.Period("2024-01-01 00:00", "h"), "h") for i in range(n)]
    return SeriesDataset("sine", series, "h", 24)


def tiny_cfg(**model) -> ExperimentConfig:
    base = dict(context_length=48, horizon=24, patch_length=8, d_model=32, n_heads=4, n_layers=4, n_blocks=4)
    base.update(model)
    return ExperimentConfig().with_overrides(
        model=base, train=dict(steps_per_block=40, batch_size=16, warmup_steps=5, progress=False))


def batch(cfg, n=8):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, cfg.model.context_length, generator=g), torch.randn(n, cfg.model.horizon, generator=g))


def test_block_loss_reaches_only_its_block():
    cfg = tiny_cfg()
    strategy = get_strategy(cfg.model)
    model = strategy.build()
    units = strategy.units(model)
    units[2].loss(batch(cfg)).backward()
    for i, block in enumerate(model.blocks):
        has_grad = [p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters()]
        assert any(has_grad) == (i == 2)


def test_interleaved_step_leaves_idle_blocks_without_gradients():
    cfg = tiny_cfg()
    strategy = get_strategy(cfg.model)
    model = strategy.build()
    module = InterleavedModule(strategy.units(model), cfg.train)
    opts = [torch.optim.AdamW(u.parameters(), lr=1e-3) for u in module.units]
    before = [[p.detach().clone() for p in u.parameters()] for u in module.units]
    # one manual step on unit 1, as training_step does
    loss = module._losses[1](batch(cfg))
    loss.backward()
    assert all(p.grad is None for i, u in enumerate(module.units) if i != 1 for p in u.parameters())
    opts[1].step()
    opts[1].zero_grad(set_to_none=True)
    for i, u in enumerate(module.units):
        changed = any(not torch.equal(a, b) for a, b in zip(before[i], u.parameters()))
        assert changed == (i == 1)


def test_interleaved_schedule_trains_every_block(tmp_path):
    cfg = tiny_cfg().with_overrides(train=dict(schedule="interleaved", steps_per_block=10))
    model, summary = train_model(cfg, sine_dataset(), tmp_path / "run")
    fresh = get_strategy(cfg.model).build()
    for trained, init in zip(model.blocks, fresh.blocks):
        assert not torch.equal(trained.out.weight, init.out.weight)  # zero-init head moved
    assert (tmp_path / "run" / "model.pt").exists()


class _Kill(Exception):
    pass


def test_training_resumes_after_a_kill(tmp_path, monkeypatch):
    cfg = tiny_cfg(n_blocks=2, n_layers=2)
    run = tmp_path / "run"
    real_trainer = train_mod._trainer

    class KillAt:
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 25:
                raise _Kill()

    def killing_trainer(train, unit_dir, max_steps, name):
        trainer = real_trainer(train, unit_dir, max_steps, name)
        if name == "block-1":
            from lightning.pytorch import Callback
            trainer.callbacks.append(type("K", (Callback,), {"on_train_batch_end": KillAt.on_train_batch_end})())
        return trainer

    monkeypatch.setattr(train_mod, "_trainer", killing_trainer)
    with pytest.raises(_Kill):
        train_model(cfg, sine_dataset(), run)
    assert (run / "units" / "block-0" / "done.json").exists()
    assert not (run / "units" / "block-1" / "done.json").exists()
    ckpt = torch.load(run / "units" / "block-1" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 20  # checkpoint every max_steps // 4 = 10 steps
    block0_done = (run / "units" / "block-0" / "done.json").stat().st_mtime_ns

    monkeypatch.setattr(train_mod, "_trainer", real_trainer)
    model, summary = train_model(cfg, sine_dataset(), run)
    assert (run / "units" / "block-0" / "done.json").stat().st_mtime_ns == block0_done  # not retrained
    info = json.loads((run / "units" / "block-1" / "done.json").read_text())
    assert info["steps"] == 40
    metrics = json.loads((run / "training.json").read_text())
    assert metrics["train_state_bytes"] == max(u["memory"]["train_state_bytes"] for u in metrics["units"].values())
    assert metrics["peak_rss_bytes"] > 0
    cfg2, strategy, loaded = load_model(run)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_run_dir_refuses_a_different_config_or_other_data(tmp_path):
    cfg = tiny_cfg(n_blocks=1, n_layers=1).with_overrides(train=dict(steps_per_block=2))
    train_model(cfg, sine_dataset(), tmp_path)
    ident = json.loads((tmp_path / "identity.json").read_text())
    assert ident["data"]["series"] == 4 and len(ident["config_sha256"]) == 64
    with pytest.raises(TsdbError) as err:
        train_model(cfg.with_overrides(model=dict(d_model=16)), sine_dataset(), tmp_path)
    assert str(err.value) == (f"{tmp_path} holds a run with a different config (model.d_model: 32 -> 16); "
                              f"pick a new --out directory or delete {tmp_path}")
    with pytest.raises(TsdbError, match=r"other training data \(sha256: [0-9a-f]+\.\.\. -> [0-9a-f]+\.\.\.\)"):
        train_model(cfg, sine_dataset(seed=1), tmp_path)   # same shape, other values
    with pytest.raises(TsdbError, match=r"other training data \(series: 4 -> 3;"):
        train_model(cfg, sine_dataset(n=3), tmp_path)
    train_model(cfg.with_overrides(train=dict(progress=True)), sine_dataset(), tmp_path)  # display only: reused


def test_saved_activation_bytes_exact_for_a_linear_layer():
    lin = torch.nn.Linear(10, 20, bias=False)
    x = torch.randn(7, 10)
    with SavedActivations(exclude=list(lin.parameters())) as saved:
        torch.relu(lin(x))
    # matmul saves its input x (7x10); relu saves its output (7x20); the weight is excluded
    assert saved.bytes == (7 * 10 + 7 * 20) * 4


def test_block_training_state_is_a_fraction_of_e2e():
    cfg = tiny_cfg(d_model=64, n_layers=8, n_blocks=4)
    b = batch(cfg, 32)
    depth = get_strategy(cfg.model)
    e2e = get_strategy(cfg.model.model_copy(update={"strategy": "e2e"}))
    opt = lambda p: torch.optim.AdamW(p, lr=1e-3)
    block = depth.units(depth.build())[0]
    whole = e2e.units(e2e.build())[0]
    m_block = measure_training_step(block.module, lambda: block.loss(b), opt)
    m_e2e = measure_training_step(whole.module, lambda: whole.loss(b), opt)
    # Adam keeps 2 moments per parameter that gets a gradient (the last layer's context
    # MLP feeds nothing, so it gets none); grads and moments match in size
    assert m_block["optimizer_bytes"] >= 2 * m_block["grad_bytes"]
    assert 0.9 * m_block["param_bytes"] < m_block["grad_bytes"] <= m_block["param_bytes"]
    ratio = m_e2e["train_state_bytes"] / m_block["train_state_bytes"]
    assert 2.5 < ratio < 4.5


def test_a_trained_model_beats_the_climatology_on_a_sine(tmp_path):
    cfg = tiny_cfg(n_blocks=2, n_layers=2, num_steps=4).with_overrides(train=dict(steps_per_block=150, lr=2e-3))
    data = sine_dataset(n=3, length=400)
    model, _ = train_model(cfg, data, tmp_path)
    strategy = get_strategy(cfg.model)
    ctx = torch.tensor(np.stack([s.target[-72:-24] for s in data]))
    truth = np.stack([s.target[-24:] for s in data])
    samples = strategy.forecast(model, ctx, 32, generator=torch.Generator().manual_seed(0)).numpy()
    assert samples.shape == (3, 32, 24) and np.isfinite(samples).all()
    mae = np.abs(np.median(samples, 1) - truth).mean()
    climatology = np.abs(ctx.numpy().mean(1, keepdims=True) - truth).mean()
    assert mae < 0.5 * climatology


def test_weight_decay_applies_to_matrices_only():
    from tsdb.config import TrainConfig
    from tsdb.training.loop import make_optimizer

    strategy = get_strategy(tiny_cfg().model)
    block = strategy.build().blocks[0]
    opt = make_optimizer(block.parameters(), TrainConfig(weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    for name, p in block.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2), name
    assert any("weight" in n and p.dim() == 2 for n, p in block.named_parameters() if id(p) in decayed)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(block.parameters()))
