"""Pretraining (tsdb.pretrain: train, zero-shot evaluation, fine-tuning, conversion, checkpoint,
pipeline) on tiny configurations: the machinery, not the quality (reports/pretrain-quick/ has
the real run)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from tsdb.data.series import Series, SeriesDataset
from tsdb.errors import DataError, TsdbError
from tsdb.pretrain import Corpus, CorpusConfig, CorpusWindows, TsdbPipeline
from tsdb.pretrain.checkpoint import as_shipped, load_pretrained, save_pretrained
from tsdb.pretrain.config import PretrainConfig
from tsdb.pretrain.convert import convert_e2e_to_blocks
from tsdb.pretrain.finetuning import finetune, initialised
from tsdb.pretrain.pipeline import sample_paths
from tsdb.pretrain.train import corpus_windows, pretrain, usage
from tsdb.strategies import get_strategy

TINY = {
    "model": {"strategy": "depth", "context_length": 32, "horizon": 16, "patch_length": 8, "d_model": 16,
              "n_heads": 2, "n_layers": 2, "n_blocks": 2, "num_steps": 4, "num_samples": 8},
    "train": {"steps_per_block": 3, "batch_size": 8, "warmup_steps": 1, "seed": 0, "progress": False},
    "corpus": {"weights": {"kernel_synth": 1.0}, "kernel_synth": {"length": 96}},
    "stream": {"series_per_chunk": 4, "windows_per_series": 4},
    "arms": ["depth", "e2e"],
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny pretraining run of both arms."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    pretrain(PretrainConfig.model_validate(TINY), out, log=lambda *_: None)
    return out


def toy_dataset(n: int = 3, length: int = 120) -> SeriesDataset:
    t = np.arange(length)
    series = [Series(f"s{i}", (10 + i + np.sin(2 * np.pi * t / 8) + 0.1 * np.cos(t)).astype(np.float32),
                     pd.Period("2024-01-01 00:00", freq="h"), "h") for i in range(n)]
    return SeriesDataset("toy", series, "h", 8)


def test_pretrain_writes_a_train_run_per_arm_and_resumes(run):
    for arm, units in (("depth", 2), ("e2e", 1)):
        training = json.loads((run / arm / "training.json").read_text())
        assert len(training["units"]) == units
        assert all(u["steps"] == 3 and u["memory"]["train_state_bytes"] > 0 for u in training["units"].values())
    depth = json.loads((run / "depth" / "training.json").read_text())
    e2e = json.loads((run / "e2e" / "training.json").read_text())
    # one block holds half of the layers: less parameter state than the e2e model of the same layers
    assert depth["units"]["block-0"]["memory"]["param_bytes"] < e2e["units"]["block-0"]["memory"]["param_bytes"]
    weights = (run / "depth" / "units" / "block-0" / "weights.pt").stat().st_mtime_ns
    pretrain(PretrainConfig.model_validate(TINY), run, arms=["depth"], log=lambda *_: None)   # all done: reused
    assert (run / "depth" / "units" / "block-0" / "weights.pt").stat().st_mtime_ns == weights
    assert set(usage(run)) == {"depth", "e2e"}
    other = PretrainConfig.model_validate({**TINY, "train": {**TINY["train"], "lr": 0.5}})
    with pytest.raises(TsdbError, match="different config"):
        pretrain(other, run, log=lambda *_: None)


def test_short_contexts_keep_at_least_min_context_observed():
    corpus = Corpus(CorpusConfig(weights={"kernel_synth": 1.0}, kernel_synth={"length": 128}))
    kw = dict(context_length=64, horizon=16, patch_length=8, min_context=16, series_per_chunk=4, windows_per_series=16)
    plain = CorpusWindows(corpus, **kw)
    short = CorpusWindows(corpus, short_context_prob=1.0, **kw)
    ctx, _, _ = next(iter(DataLoader(short, batch_size=64)))
    observed = (~torch.isnan(ctx)).sum(1)
    assert observed.min() >= 16 and observed.float().std() > 0
    ctx_plain, _, _ = next(iter(DataLoader(plain, batch_size=64)))
    assert (~torch.isnan(ctx_plain)).sum(1).float().mean() > observed.float().mean()
    # the option off leaves the stream as it was
    again, _, _ = next(iter(DataLoader(CorpusWindows(corpus, short_context_prob=0.0, **kw), batch_size=64)))
    assert torch.equal(torch.nan_to_num(ctx_plain, 7.0), torch.nan_to_num(again, 7.0))


def test_config_refuses_train_changes_per_arm_that_change_the_optimisation():
    with pytest.raises(ValueError, match="arm_train"):
        PretrainConfig.model_validate({**TINY, "arm_train": {"e2e": {"lr": 0.1}}})
    cfg = PretrainConfig.model_validate({**TINY, "arm_train": {"e2e": {"ddp_devices": 2}}})
    assert cfg.arm_config("e2e").train.ddp_devices == 2 and cfg.arm_config("depth").train.ddp_devices == 1
    assert corpus_windows(cfg).context_length == 32


def test_conversion_gives_each_block_its_layers_and_a_copy_of_stem_and_head():
    cfg = PretrainConfig.model_validate({**TINY, "model": {**TINY["model"], "n_layers": 4}})
    e2e = get_strategy(cfg.arm_config("e2e").model).build()
    depth = get_strategy(cfg.arm_config("depth").model).build()
    state = convert_e2e_to_blocks(e2e.state_dict(), depth.state_dict(), num_blocks=2)
    depth.load_state_dict(state)
    for j in range(4):
        torch.testing.assert_close(depth.blocks[j // 2].layers[j % 2].qkv.weight, e2e.blocks[0].layers[j].qkv.weight)
    for i in range(2):
        torch.testing.assert_close(depth.blocks[i].context_embed.weight, e2e.blocks[0].context_embed.weight)
        torch.testing.assert_close(depth.blocks[i].lead_time, e2e.blocks[0].lead_time)
    torch.testing.assert_close(depth.edges, get_strategy(cfg.arm_config("depth").model).build().edges)
    with pytest.raises(TsdbError, match="divisible"):
        convert_e2e_to_blocks(e2e.state_dict(), depth.state_dict(), num_blocks=3)


def test_anchor_adds_the_fixed_sigma_loss():
    strategy = get_strategy(PretrainConfig.model_validate(TINY).arm_config("depth").model)
    state = strategy.build().state_dict()
    batch = next(iter(DataLoader(corpus_windows(PretrainConfig.model_validate(TINY)), batch_size=8)))
    plain = initialised(strategy, state)
    anchored = initialised(strategy, state, anchor_weight=2.0)
    m1, m2 = plain.build(), anchored.build()
    for p in m2.parameters():   # weights loaded from `state`, and F != 0 so the anchor is not trivial
        torch.nn.init.normal_(p, std=0.05) if not p.abs().sum() else None
    m1.load_state_dict(m2.state_dict())
    torch.manual_seed(0)
    base = plain.units(m1)[0].loss(batch)
    torch.manual_seed(0)
    total = anchored.units(m2)[0].loss(batch)
    assert total > base > 0
    assert isinstance(anchored, type(strategy)) and anchored.name == "depth"


def test_finetune_starts_from_the_pretrained_weights(run, tmp_path):
    data = toy_dataset()
    pre = torch.load(run / "depth" / "model.pt", weights_only=True)
    summary = finetune(run / "depth", data, tmp_path / "ft", steps=2, lr=1e-3, progress=False)
    assert all(u["steps"] == 2 for u in summary["units"].values())
    after = torch.load(tmp_path / "ft" / "model.pt", weights_only=True)
    changed = [k for k in pre if not torch.equal(pre[k], after[k])]
    assert changed and all(k.startswith("blocks.") for k in changed)
    # the first optimizer step moves weights by about lr: fine-tuning started from `pre`
    key = "blocks.0.layers.0.qkv.weight"
    assert (after[key] - pre[key]).abs().max() < 0.01
    # conversion: an e2e model into two blocks
    finetune(run / "e2e", data, tmp_path / "conv", steps=1, lr=1e-3, num_blocks=2, anchor_weight=1.0, progress=False)
    cfg, strategy, _ = load_pretrained(tmp_path / "conv")
    assert cfg.model.strategy == "depth" and len(strategy.units(strategy.build())) == 2


def test_checkpoint_pipeline_and_rollout(run, tmp_path):
    cfg, strategy, model = load_pretrained(run / "depth")
    ckpt = save_pretrained(cfg, model, tmp_path / "ckpt")
    assert (ckpt / "model.safetensors").exists() and not (ckpt / "model.pt").exists()
    pipe = TsdbPipeline.from_pretrained(ckpt)
    series = [np.sin(np.arange(50) / 3).astype(np.float32), np.r_[np.arange(10.0), np.nan, np.arange(9.0)],
              torch.arange(10.0)]
    samples = pipe.predict(series, horizon=40, num_samples=5, seed=1)    # 40 > model horizon 16: rollout
    assert samples.shape == (3, 5, 40) and np.isfinite(samples).all()
    np.testing.assert_array_equal(samples, pipe.predict(series, horizon=40, num_samples=5, seed=1))
    # the rollout's first model horizon is the direct forecast with the same noise
    direct = pipe.predict(series, horizon=16, num_samples=5, seed=1)
    np.testing.assert_allclose(samples[:, :, :16], direct, rtol=1e-5, atol=1e-5)
    q, mean = pipe.predict_quantiles(series[:1], horizon=12, num_samples=20)
    assert q.shape == (1, 12, 9) and mean.shape == (1, 12) and (np.diff(q, axis=-1) >= 0).all()
    # the checkpoint holds float16 weights; the model with its weights rounded so (as the
    # zero-shot figures are measured) gives the same samples as the pipeline
    from safetensors import safe_open
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float16"}
    exact = {k: v.clone() for k, v in model.state_dict().items()}
    as_shipped(model)
    rounded = model.state_dict()
    assert any(not torch.equal(exact[k], rounded[k]) for k in exact)
    assert all(torch.allclose(exact[k], rounded[k], rtol=1e-3, atol=1e-4) for k in exact)
    ref = sample_paths(strategy, model, np.stack([np.full(32, 1.0, np.float32)]), 4, 16,
                       generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(pipe.predict([np.ones(32)], 16, 4, seed=3), ref, rtol=1e-6)
    for bad, msg in (([np.array([1.0, np.inf])], "series 0: contains inf"),
                     ([np.ones(4), np.full(5, np.nan)], "series 1: no observed value"),
                     ([np.ones((2, 3))], "series 0: expected a 1-D"), ([], "no series")):
        with pytest.raises(DataError, match=msg):
            pipe.predict(bad, 8)


def test_export_and_forecast_from_a_shipped_checkpoint(run, tmp_path, capsys):
    """`tsdb export` and `tsdb forecast --pretrained` take the safetensors checkpoint folder."""
    from tsdb.cli.main import main

    cfg, _, model = load_pretrained(run / "depth")
    ckpt = save_pretrained(cfg, model, tmp_path / "ckpt")
    csv = tmp_path / "y.csv"
    pd.DataFrame({"ts": pd.date_range("2024-01-01", periods=60, freq="h").repeat(2),
                  "id": ["a", "b"] * 60, "y": np.tile([1.0, 5.0], 60) + np.arange(120) % 7}).to_csv(csv, index=False)
    assert main(["export", str(ckpt)]) == 0
    meta = json.loads((ckpt / "onnx" / "tsdb_model.json").read_text())
    assert meta["shapes"]["horizon"] == 16 and len(meta["graphs"]["denoise"]) == 2
    assert main(["forecast", "--pretrained", str(ckpt), "--input", str(csv), "--item-id", "id", "--timestamp", "ts",
                 "--target", "y", "--freq", "h", "--horizon", "20", "--num-samples", "10",
                 "--out", str(tmp_path / "fc")]) == 0
    table = pd.read_csv(tmp_path / "fc" / "forecast.csv")
    assert len(table) == 40 and set(table["item_id"]) == {"a", "b"}
    capsys.readouterr()
    assert main(["pretrain", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.yaml" in err


def _has(name: str) -> bool:
    from tsdb.data.registry import data_dirs
    return any((d / name).exists() for d in data_dirs())


@pytest.mark.skipif(not _has("exchange_rate.txt.gz"), reason="benchmark files absent")
def test_zero_shot_scores_against_seasonal_naive(run, tmp_path):
    from tsdb.pretrain.report import memory_table
    from tsdb.pretrain.zeroshot import evaluate_pretrained_run, geometric_mean

    results = evaluate_pretrained_run(run, arms=["depth"], report_dir=tmp_path / "report",
                                      protocols=["exchange_rate"], num_samples=4, log=lambda *_: None)
    p = results["arms"]["depth"]["protocols"]["exchange_rate"]
    assert p["model"]["num_windows"] == 40 and p["model"]["rollout"]          # H = 30 > model horizon 16
    assert p["crps_ratio"] == pytest.approx(p["model"]["crps"] / p["seasonal_naive"]["crps"])
    assert results["arms"]["depth"]["summary"]["crps_ratio_geomean"] == pytest.approx(p["crps_ratio"])
    assert geometric_mean([0.5, 2.0]) == pytest.approx(1.0)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "exchange_rate" in report and (tmp_path / "report" / "model" / "model.safetensors").exists()
    assert memory_table(run, ["depth", "e2e"])["e2e_over_largest_block"] > 1


@pytest.mark.skipif(not _has("exchange_rate.txt.gz"), reason="benchmark files absent")
def test_a_twin_report_sets_its_arm_beside_the_other_arms_report(run, tmp_path):
    """The e2e twin trained in another run of the same config: its report reads the depth
    report's memory and zero-shot, and refuses a report of another config."""
    from tsdb.pretrain.zeroshot import evaluate_pretrained_run

    kw = dict(protocols=["exchange_rate"], num_samples=4, log=lambda *_: None)
    depth = evaluate_pretrained_run(run, arms=["depth"], report_dir=tmp_path / "depth", **kw)
    twin = evaluate_pretrained_run(run, arms=["e2e"], report_dir=tmp_path / "e2e", against=tmp_path / "depth", **kw)
    saved = json.loads((tmp_path / "e2e" / "results.json").read_text())
    e2e_bytes = json.loads((run / "e2e" / "training.json").read_text())["train_state_bytes"]
    block_bytes = json.loads((run / "depth" / "training.json").read_text())["train_state_bytes"]
    assert saved["memory"]["e2e_over_largest_block"] == pytest.approx(e2e_bytes / block_bytes)
    assert saved["against"]["summaries"]["depth"] == depth["arms"]["depth"]["summary"]
    assert twin["arms"].keys() == {"e2e"}
    report = (tmp_path / "e2e" / "report.md").read_text()
    assert f"| depth | {depth['arms']['depth']['summary']['crps_ratio_geomean']:.3f} |" in report
    other = json.loads((tmp_path / "depth" / "results.json").read_text())
    other["config"]["model"]["d_model"] += 8
    (tmp_path / "depth" / "results.json").write_text(json.dumps(other))
    with pytest.raises(TsdbError, match="model.d_model"):
        evaluate_pretrained_run(run, arms=["e2e"], report_dir=tmp_path / "e2e", against=tmp_path / "depth", **kw)


@pytest.mark.skipif(not _has("ETTh1.csv"), reason="benchmark files absent")
def test_finetune_bench_chooses_lr_on_validation_and_scores_every_arm(run, tmp_path):
    from tsdb.pretrain.finetune_bench import FinetuneBenchConfig, run_finetune_bench

    cfg = FinetuneBenchConfig(pretrained_run=str(run), datasets=["etth1_96"], arms=["scratch", "convert-anchor",
                              "zero-shot"], seeds=[0, 1], steps=1, lrs=[1e-3, 1e-2], num_samples=2,
                              etth1_stride=1500, workers=1)
    results = run_finetune_bench(cfg, tmp_path / "bench", report_dir=tmp_path / "report", log=lambda *_: None)
    # lr chosen per choosing arm on validation; convert-anchor takes the fine-tuning arm's
    assert set(results["chosen_lr"]) == {"etth1_96/scratch", "etth1_96/finetune"}
    val = {(v["job"]["arm"], v["job"]["lr"]): v["crps"] for v in results["validation"]}
    best = min(cfg.lrs, key=lambda lr: val[("finetune", lr)])
    cells = results["test"]["etth1_96"]
    assert cells["convert-anchor"]["lr"] == best and cells["convert-anchor"]["seeds"] == [0, 1]
    assert cells["zero-shot"]["lr"] is None and len(cells["scratch"]["crps"]) == 2
    assert cells["scratch"]["crps_vs_scratch"] == pytest.approx(1.0)
    # the bootstrap's point ratio, from per-window scores averaged over seeds, is the ratio of the
    # seed-mean CRPS that gluonts' totals give
    paired = results["against_scratch"]["etth1_96"]["convert-anchor"]
    assert paired["ratio"] == pytest.approx(cells["convert-anchor"]["crps_vs_scratch"], rel=1e-6)
    assert paired["ratio_ci"][0] <= paired["ratio"] <= paired["ratio_ci"][1] and paired["windows"] > 1
    assert (tmp_path / "report" / "report.md").read_text().count("| convert-anchor |") == 1
    # cached: a second call trains nothing and returns the same figures
    again = run_finetune_bench(cfg, tmp_path / "bench", log=lambda *_: None)
    assert again["test"] == results["test"]
    # the same models named one by one (as a shipped checkpoint folder would be): the same jobs
    named = cfg.model_copy(update={"pretrained_run": None, "depth_model": str(run / "depth"),
                                   "e2e_model": str(run / "e2e")})
    assert run_finetune_bench(named, tmp_path / "bench", log=lambda *_: None)["test"] == results["test"]
    # a cached job made with another recipe is refused, naming what changed
    with pytest.raises(TsdbError, match=r"steps: 1 -> 2"):
        run_finetune_bench(cfg.model_copy(update={"steps": 2}), tmp_path / "bench", log=lambda *_: None)
    with pytest.raises(TsdbError, match="set e2e_model or pretrained_run"):
        named.model_copy(update={"e2e_model": None}).model_dir("e2e")
