"""Training memory where training happens: the MemoryMeter callback's exact bytes, host offload
of the interleaved schedule, per-layer activation checkpointing (e2e-ckpt), and the
`tsdb bench memory` / `tsdb bench gpu --tiny` commands."""

import copy
import functools
import json

import pytest
import torch
import yaml

import tsdb.training.loop as train_mod
from test_train import batch, sine_dataset, tiny_cfg
from tsdb.cli.main import main
from tsdb.strategies import get_strategy
from tsdb.training.memory import CheckpointedLayer, HostOffload, checkpoint_layers, measure_training_step


def _with_draws(cfg, n=16):
    """A batch with the step's random numbers, so two models see the same noise."""
    context, target = batch(cfg, n)
    draws = torch.cat([torch.rand(n, 1, generator=torch.Generator().manual_seed(2)),
                       torch.randn(n, cfg.model.horizon, generator=torch.Generator().manual_seed(3))], dim=1)
    return context, target, draws


def test_meter_counts_exact_bytes_of_the_real_training_steps(tmp_path):
    cfg = tiny_cfg(strategy="e2e", n_layers=2, n_blocks=1).with_overrides(train=dict(steps_per_block=4))
    model, summary = train_mod.train_model(cfg, sine_dataset(), tmp_path / "fp32")
    memory = summary["units"]["block-0"]["memory"]

    # the analytic count: AdamW keeps two fp32 moments and a fp32 step counter for every
    # parameter tensor that gets a gradient (found by one backward on a fresh model)
    fresh = get_strategy(cfg.model)
    unit = fresh.units(fresh.build())[0]
    unit.loss(_with_draws(cfg)).backward()
    params = list(unit.module.parameters())
    with_grad = [p for p in params if p.grad is not None]
    assert len(with_grad) < len(params)  # the last layer's context-only norm feeds nothing
    assert memory["param_bytes"] == 4 * sum(p.numel() for p in params)
    assert memory["grad_bytes"] == 4 * sum(p.numel() for p in with_grad)
    assert memory["optimizer_bytes"] == 8 * sum(p.numel() for p in with_grad) + 4 * len(with_grad)
    assert memory["saved_activation_bytes"] > 0
    assert memory["train_state_bytes"] == sum(memory[k] for k in (
        "param_bytes", "grad_bytes", "optimizer_bytes", "saved_activation_bytes"))
    assert memory["measured_steps"] == 3 and len(memory["step_seconds"]) == 3
    assert memory["device"] == "cpu" and memory["precision"] == "32-true"
    assert memory["step_peak_rss_bytes"] >= memory["rss_bytes_at_step_start"] > 0
    assert memory["device_resident_bytes"] == memory["param_bytes"] + memory["grad_bytes"] + memory["optimizer_bytes"]
    training = json.loads((tmp_path / "fp32" / "training.json").read_text())
    assert training["train_state_bytes"] == memory["train_state_bytes"]
    assert training["peak_rss_bytes"] >= memory["step_peak_rss_bytes"]  # step resets keep the process peak
    assert json.loads((tmp_path / "fp32" / "units" / "block-0" / "memory.json").read_text())["block-0"] == memory

    # measured in the training precision: bf16 autocast saves half-size activations
    _, bf16 = train_mod.train_model(cfg.with_overrides(train=dict(precision="bf16-mixed")), sine_dataset(),
                                    tmp_path / "bf16")
    bf16 = bf16["units"]["block-0"]["memory"]
    assert bf16["precision"] == "bf16-mixed" and bf16["param_bytes"] == memory["param_bytes"]
    assert bf16["saved_activation_bytes"] < 0.8 * memory["saved_activation_bytes"]


def test_step_peak_resets_keep_the_process_peak():
    from tsdb.training.memory import _reset_step_peak_rss, _status_kib, peak_rss_bytes, reset_peak_rss, rss_bytes
    # 256 MiB against a 128 MiB threshold: other threads freeing a few MiB meanwhile (CI once saw 8 MiB)
    # must not decide the test.
    mib = 2**20
    reset_peak_rss()
    before = rss_bytes()
    big = torch.ones(256 * mib // 4)  # touched, then freed (an mmap: its pages leave the RSS)
    del big
    assert peak_rss_bytes() >= before + 128 * mib
    _reset_step_peak_rss()  # what MemoryMeter does before each measured step
    assert _status_kib("VmHWM") < before + 128 * mib <= peak_rss_bytes()
    reset_peak_rss()
    assert peak_rss_bytes() < before + 128 * mib


def test_interleaved_offload_keeps_inactive_units_on_host_and_trains_the_same(tmp_path, monkeypatch):
    cfg = tiny_cfg(n_blocks=2, n_layers=2).with_overrides(train=dict(schedule="interleaved", steps_per_block=6))
    resident, _ = train_mod.train_model(cfg, sine_dataset(), tmp_path / "resident")
    info = json.loads((tmp_path / "resident" / "units" / "interleaved" / "done.json").read_text())
    assert {u["memory"]["inactive_units"] for u in info.values()} == {"resident"}  # CPU: the device is the host

    checks = []
    real_activate = HostOffload.activate

    def checked_activate(self, i):
        real_activate(self, i)
        for j, (module, opt) in enumerate(zip(self.modules, self.optimizers)):
            for p in module.parameters():
                on_host = p.data_ptr() == self.host_buffer(("param", id(p))).data_ptr()
                assert on_host == (j != i), (i, j)
                for name, value in opt.state.get(p, {}).items():
                    if name != "step":
                        buf = self.host_buffer(("state", id(p), name))  # none yet: created on the device
                        assert (buf is not None and value.data_ptr() == buf.data_ptr()) == (j != i), (i, j, name)
                        checks.append(name)
    monkeypatch.setattr(HostOffload, "activate", checked_activate)
    monkeypatch.setattr(train_mod, "HostOffload", functools.partial(HostOffload, force=True))
    offloaded, _ = train_mod.train_model(cfg, sine_dataset(), tmp_path / "offloaded")
    assert {"exp_avg", "exp_avg_sq"} <= set(checks)  # optimizer state went out and came back
    info = json.loads((tmp_path / "offloaded" / "units" / "interleaved" / "done.json").read_text())
    assert {u["memory"]["inactive_units"] for u in info.values()} == {"host"}
    for (name, a), b in zip(resident.state_dict().items(), offloaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_activation_checkpointing_keeps_gradients_and_drops_saved_activations():
    cfg = tiny_cfg(strategy="e2e", n_layers=8, n_blocks=1)
    strategy = get_strategy(cfg.model)
    plain = strategy.build()
    ckpt = copy.deepcopy(plain)
    assert checkpoint_layers(ckpt) == 8
    assert all(isinstance(layer, CheckpointedLayer) for layer in ckpt.blocks[0].layers)
    assert list(ckpt.state_dict()) == list(plain.state_dict())  # checkpoints load into a plain model
    for model in (plain, ckpt):  # adaLN-Zero starts at F = 0: randomise so every path carries gradient
        torch.manual_seed(5)
        for p in model.parameters():
            p.data.normal_(0, 0.05)
    b = _with_draws(cfg)
    losses = []
    for model in (plain, ckpt):
        loss = strategy.units(model)[0].loss(b)
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():  # inference does not go through checkpoint
        ctx = torch.randn(3, cfg.model.context_length)
        g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        torch.testing.assert_close(strategy.forecast(ckpt, ctx, 4, generator=g()),
                                   strategy.forecast(plain, ctx, 4, generator=g()))

    opt = lambda p: torch.optim.AdamW(p)  # noqa: E731
    units = [strategy.units(m)[0] for m in (plain, ckpt)]
    plain_m, ckpt_m = (measure_training_step(u.module, lambda u=u: u.loss(b), opt) for u in units)
    assert ckpt_m["saved_activation_bytes"] < plain_m["saved_activation_bytes"] / 4
    # what checkpointing keeps per layer: the context and future token states and the
    # context keys/values the future path reads (fp32)
    layer_inputs = 4 * 16 * cfg.model.d_model * (3 * cfg.model.context_length + cfg.model.horizon) // 8
    assert ckpt_m["saved_activation_bytes"] > 8 * layer_inputs


def _tiny_memory_spec(tmp_path):
    spec = {"name": "memory-tiny", "task": {"protocol": "rolling", "dataset": "vic_elec", "horizon": 24},
            "base": {"model": {"context_length": 48, "horizon": 24, "patch_length": 8},
                     "train": {"batch_size": 4, "accelerator": "cpu"}},
            "arms": {"e2e": {"model": {"strategy": "e2e"}},
                     "e2e-ckpt": {"model": {"strategy": "e2e"}, "train": {"activation_checkpointing": True}},
                     "depth-b2": {"model": {"strategy": "depth", "n_blocks": 2}}},
            "depths": [4], "widths": [16], "head_dim": 8, "warmup": 1, "timed": 2}
    path = tmp_path / "memory.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_bench_memory_measures_every_point_in_its_own_process(tmp_path):
    from tsdb.bench.memory import run_memory_bench
    out = tmp_path / "memory"
    results = run_memory_bench(out, _tiny_memory_spec(tmp_path), log=lambda *_: None)
    points = {p["arm"]: p for p in results["points"]}
    assert set(points) == {"e2e", "e2e-ckpt", "depth-b2"} and not any("error" in p for p in points.values())
    for p in points.values():
        assert p["measured_steps"] == 3 and len(p["step_seconds"]) == 2 and p["rss_baseline_bytes"] > 0
        assert p["step_peak_rss_bytes"] > p["rss_baseline_bytes"]
    e2e, ckpt, b2 = points["e2e"], points["e2e-ckpt"], points["depth-b2"]
    assert ckpt["param_bytes"] == e2e["param_bytes"]
    assert ckpt["saved_activation_bytes"] < e2e["saved_activation_bytes"]
    assert b2["units"] == 2 and b2["params"] < 0.6 * e2e["params"]  # one block of two, measured alone
    report = (out / "report.md").read_text()
    assert "| e2e / depth-b2 | e2e-ckpt / depth-b2 |" in report and "e2e-ckpt / e2e" in report
    assert (out / "memory.png").stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["points"] == results["points"]


def test_bench_gpu_tiny_runs_the_gpu_arms_on_cpu(tmp_path, capsys):
    from tsdb.bench.gpu import run_gpu_bench
    out = tmp_path / "gpu"
    results = run_gpu_bench(out, tiny=True, log=lambda *_: None)
    arms = results["arms"]
    assert list(arms) == ["e2e", "e2e-ckpt", "depth-b4"] and results["device"] == "cpu"
    for f in arms.values():
        assert f["precision"] == "bf16-mixed" and f["steps_per_second"] > 0 and f["peak_bytes"] > 0
    assert arms["depth-b4"]["units"] == 4 and arms["depth-b4"]["steps"] == 4 * arms["e2e"]["steps"]
    assert arms["e2e-ckpt"]["saved_activation_bytes"] < arms["e2e"]["saved_activation_bytes"]
    # checkpointing recomputes, it does not change training: same data, same noise, same loss
    assert arms["e2e-ckpt"]["final_loss"]["block-0"] == pytest.approx(arms["e2e"]["final_loss"]["block-0"], rel=1e-3)
    assert "e2e-ckpt / depth-b4" in (out / "report.md").read_text()
    assert not (out / "runs").exists()  # checkpoints of GPU-sized runs are not left behind
    if not torch.cuda.is_available():
        capsys.readouterr()  # only what the command below prints
        assert main(["bench", "gpu", "--device", "cuda", "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "CUDA is not available" in err[0] and "--tiny" in err[0]
