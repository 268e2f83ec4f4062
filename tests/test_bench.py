"""Benchmark machinery: seed spread, the paired bootstrap, parameter-matched arms, counted
function evaluations, and reports of old and new results.json."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tsdb.bench.experiment import (
    ExperimentSpec,
    TaskSpec,
    aggregate,
    comparison_lines,
    comparisons,
    function_evaluations,
    match_parameters,
    parameter_count,
    with_new_defaults,
    write_report,
)
from tsdb.bench.stats import bootstrap_blocks, paired_bootstrap, spread
from tsdb.config import ExperimentConfig
from tsdb.strategies import get_strategy

ROOT = Path(__file__).resolve().parents[1]


def test_spread_over_seeds():
    assert spread([0.3, 0.1, 0.2]) == pytest.approx({"mean": 0.2, "std": 0.1, "min": 0.1, "max": 0.3, "n": 3})
    assert spread([0.5]) == {"mean": 0.5, "std": 0.0, "min": 0.5, "max": 0.5, "n": 1}
    assert spread([None, float("nan")])["n"] == 0


def test_bootstrap_blocks_group_overlapping_windows_of_a_series():
    # ETTh1's quick tier: H = 96, stride 25 -> 4 consecutive windows of a series per block
    assert bootstrap_blocks(["a"] * 5 + ["b"] * 3, horizon=96, stride=25) == [0, 0, 0, 0, 1, 2, 2, 2]
    assert bootstrap_blocks(["a", "b", "c"], horizon=48, stride=None) == [0, 1, 2]   # M4: a window per series


def test_paired_bootstrap_verdicts():
    rng = np.random.default_rng(0)
    den = rng.uniform(50, 150, 300)
    b = den * rng.uniform(0.02, 0.06, 300)
    same = paired_bootstrap(b, b, den)
    assert same["diff"] == 0 and same["diff_ci"] == [0, 0] and same["verdict"] == "tie"
    better = paired_bootstrap(0.9 * b, b, den)
    assert better["verdict"] == "a" and better["diff_ci"][1] < 0
    assert better["ratio"] == pytest.approx(0.9) and better["ratio_ci"] == pytest.approx([0.9, 0.9])
    assert paired_bootstrap(b, 0.9 * b, den)["verdict"] == "b"
    noisy = paired_bootstrap(b * rng.normal(1, 0.3, 300), b, den)
    lo, hi = noisy["diff_ci"]
    assert lo < noisy["diff"] < hi
    assert paired_bootstrap(b, b * 1.01, den, seed=3) == paired_bootstrap(b, b * 1.01, den, seed=3)


def test_paired_bootstrap_covers_a_zero_difference_at_its_level():
    """Two arms whose windows' scores come from the same distribution: the 95% interval of
    the difference contains 0 in about 95% of independent experiments."""
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(200):
        den = rng.uniform(50, 150, 80)
        a, b = (den * rng.gamma(4, 0.01, 80) for _ in range(2))
        lo, hi = paired_bootstrap(a, b, den, resamples=400, seed=int(rng.integers(1 << 30)))["diff_ci"]
        hits += lo <= 0 <= hi
    assert 0.88 <= hits / 200 <= 0.99


def test_block_bootstrap_widens_the_interval_of_correlated_windows():
    rng = np.random.default_rng(2)
    den = np.ones(400)
    shared = np.repeat(rng.normal(0, 1, 100), 4)   # overlapping windows: runs of 4 share their error
    a, b = 1 + 0.1 * shared, np.ones(400)
    blocks = bootstrap_blocks(["s"] * 400, horizon=4, stride=1)
    iid, blocked = paired_bootstrap(a, b, den)["diff_ci"], paired_bootstrap(a, b, den, blocks)["diff_ci"]
    assert blocked[1] - blocked[0] > 1.6 * (iid[1] - iid[0])


def _cfg(**model):
    shape = dict(context_length=48, horizon=24, patch_length=8, d_model=32, n_heads=4, n_layers=8, n_blocks=4)
    return ExperimentConfig().with_overrides(model={**shape, **model})


def test_e2e_params_arm_matches_depth_within_three_percent():
    depth = _cfg(strategy="depth")
    target = parameter_count(depth)
    e2e = _cfg(strategy="e2e")
    assert parameter_count(e2e) < 0.97 * target   # same layers: fewer parameters (one stem, head)
    matched = match_parameters(e2e, target)
    assert abs(parameter_count(matched) / target - 1) <= 0.03
    assert matched.model.d_model == 32 and matched.model.n_layers > 8   # same width, more layers
    spec = ExperimentSpec.model_validate({"name": "x", "task": {"protocol": "m4-hourly", "dataset": "m4_hourly"},
                                          "base": depth.model_dump(), "arms": {"depth-b4": {}, "e2e-params":
                                          {"model": {"strategy": "e2e"}}}, "match_params": {"e2e-params": "depth-b4"},
                                          "seeds": [0, 1, 2]})
    assert spec.arm_config("e2e-params", 2).model == matched.model and spec.arm_config("e2e-params", 2).train.seed == 2
    with pytest.raises(ValueError, match="match_params"):
        ExperimentSpec.model_validate({"name": "x", "task": {"protocol": "m4-hourly", "dataset": "m4_hourly"},
                                       "arms": {"a": {}}, "match_params": {"a": "b"}})
    with pytest.raises(ValueError, match="chosen must name one of our arms"):
        ExperimentSpec.model_validate({"name": "x", "task": {"protocol": "m4-hourly", "dataset": "m4_hourly"},
                                       "arms": {"a": {}}, "chosen": "b"})


@pytest.mark.parametrize("strategy, sampler, steps, nfe, layers_per_call", [
    ("depth", "heun", 4, 7, 2), ("depth", "euler", 8, 8, 2), ("e2e", "heun", 4, 7, 8), ("looped", "heun", 5, 5, 3),
])
def test_function_evaluations_are_counted_per_forecast(strategy, sampler, steps, nfe, layers_per_call):
    cfg = _cfg(strategy=strategy, sampler=sampler, num_steps=steps, core_layers=3)
    s = get_strategy(cfg.model)
    model = s.build().eval()
    context = np.random.default_rng(0).normal(10, 1, (1, 48)).astype(np.float32)
    assert function_evaluations(s, model, context) == {"nfe": nfe, "layer_passes": nfe * layers_per_call}
    assert "denoise_future" not in vars(model.blocks[0])   # the counting wrappers are gone
    if strategy == "looped":
        assert function_evaluations(s, model, context, num_steps=15)["nfe"] == 15   # looped at e2e's NFE


def test_horizon_forecast_runs_every_block_per_sub_step():
    cfg = _cfg(strategy="horizon", n_blocks=3, n_layers=3, num_steps=6)
    s = get_strategy(cfg.model)
    out = function_evaluations(s, s.build().eval(), np.ones((1, 48), np.float32))
    assert out["nfe"] > 0 and out["nfe"] % 3 == 0 and out["layer_passes"] == out["nfe"]


def test_aggregate_and_comparisons_of_seeded_arms():
    rng = np.random.default_rng(0)
    den = rng.uniform(50, 150, 40).tolist()

    def run(kind, level, seed):
        num = (np.asarray(den) * level * rng.uniform(0.9, 1.1, 40)).tolist()
        crps = sum(num) / sum(den)
        return {"crps": crps, "mase": 1.0, "mse": 2.0, "mae": 1.0, "train_seconds": 10.0 + seed, "kind": kind,
                "arm": {"depth": "depth-b4", "e2e": "e2e"}.get(kind), "seed": seed,
                "provenance": {"config_sha256": f"c{seed}", "data_sha256": "d"},
                "window_scores": {"crps_num": num, "abs_target": den, "mase": [1.0] * 40, "mse": [2.0] * 40,
                                  "mae": [1.0] * 40}}

    arms = {"depth-b4": aggregate({s: {**run("depth", 0.03, s), "kind": "tsdb"} for s in (0, 1, 2)}),
            "e2e": aggregate({s: {**run("e2e", 0.04, s), "kind": "tsdb", "arm": "e2e"} for s in (0, 1, 2)}),
            "mstl": aggregate({None: run("peer", 0.02, 0)})}
    d = arms["depth-b4"]
    assert d["seeds"] == [0, 1, 2] and d["train_seconds"] == 11.0 and d["spread"]["train_seconds"]["std"] == 1.0
    assert d["crps"] == pytest.approx(np.mean([d["per_seed"][s]["crps"] for s in "012"]))
    assert arms["mstl"]["seeds"] == [] and "spread" not in arms["mstl"]
    # the seed-mean window scores rebuild the seed-mean... ratio of sums, close to the mean of ratios
    assert sum(d["window_scores"]["crps_num"]) / sum(den) == pytest.approx(d["crps"], rel=0.02)
    comps = comparisons({"arms": arms, "windows": {"abs_target": den, "block": list(range(40))}}, resamples=500)
    assert [(c["a"], c["b"], c["verdict"]) for c in comps] == [("depth-b4", "mstl", "b"), ("depth-b4", "e2e", "a")]

    # an arm chosen on validation windows, not the lowest on test: against the best peer in CRPS,
    # and in MASE against the peer of lowest MASE (not the one of lowest CRPS)
    chosen = {s: {**run("depth", 0.035, s), "kind": "tsdb"} for s in (0, 1, 2)}
    for s, r in chosen.items():
        r["window_scores"]["mase"] = (0.8 + 0.1 * rng.uniform(size=40)).tolist()
        r["mase"] = float(np.mean(r["window_scores"]["mase"]))
    theta = run("peer", 0.05, 0)
    theta["window_scores"]["mase"], theta["mase"] = [0.9] * 40, 0.9
    arms = {**arms, "depth-b2": aggregate(chosen), "theta": aggregate({None: theta})}
    results = {"arms": arms, "windows": {"abs_target": den, "block": list(range(40))}}
    comps = comparisons(results, resamples=500, chosen="depth-b2")
    extra = [(c["a"], c["b"], c["metric"], c["verdict"]) for c in comps if c["role"].startswith("validation")]
    assert extra == [("depth-b2", "mstl", "crps", "b"), ("depth-b2", "theta", "mase", "a")]
    mase = comps[-1]
    assert mase["crps_a"] == pytest.approx(np.mean(arms["depth-b2"]["window_scores"]["mase"])) and mase["crps_b"] == 0.9
    again = comparisons(results, resamples=500, chosen="depth-b4")   # chosen = best: no CRPS repeat
    assert [c["metric"] for c in again if c["role"].startswith("validation")] == ["mase"]
    lines = comparison_lines(comps)
    assert lines.index("| comparison | a | b | MASE a | MASE b | a - b [CI] | a / b [CI] | verdict |") == len(lines) - 3


def test_report_renders_the_committed_single_seed_results(tmp_path):
    """`tsdb report DIR` still renders a results.json written before seeds (schema 1: one figure
    per arm, no seeds, window scores or comparisons), here the committed ablation cut down to it."""
    src = ROOT / "reports" / "ablation-m4-hourly-quick"
    shutil.copy(src / "spec.yaml", tmp_path / "spec.yaml")
    current = json.loads((src / "results.json").read_text())
    kept = ("crps", "mase", "mse", "mae", "train_seconds", "predict_seconds", "train_state_bytes",
            "saved_activation_bytes", "peak_rss_bytes", "params")
    results = {"name": current["name"], "task": current["task"], "machine": current["machine"],
               "arms": {n: {k: f[k] for k in kept if k in f} for n, f in current["arms"].items()}}
    write_report(ExperimentSpec.from_yaml(tmp_path / "spec.yaml"), results, tmp_path)
    report = (tmp_path / "report.md").read_text()
    crps = results["arms"]["depth-b3"]["crps"]
    assert f"| depth-b3 | 1 | {crps:.4f} | n/a |" in report and "Paired bootstrap" not in report


def test_a_record_older_than_a_field_is_reused_only_at_the_fields_default():
    """Records written before ``task.split`` and ``model.linear_head`` existed lack them; they
    match a config that keeps those fields at their defaults, and nothing else."""
    from tsdb.provenance import mismatch, record
    task = TaskSpec(protocol="m4-hourly", dataset="m4_hourly").model_dump()
    model = ExperimentConfig().model.model_dump()
    train = ExperimentConfig().train.model_dump(exclude={"progress"})
    current = record({"kind": "tsdb", "model": model, "train": train}, {"task": task, "train_sha256": "ab"})
    old_model = {k: v for k, v in model.items() if k != "linear_head"}
    old = record({"kind": "tsdb", "model": old_model, "train": train},
                 {"task": {k: v for k, v in task.items() if k != "split"}, "train_sha256": "ab"})
    assert mismatch(old, current) != {}                    # as stored, the hashes differ
    assert mismatch(with_new_defaults(old), current) == {}
    with_head = record({"kind": "tsdb", "model": {**model, "linear_head": True}, "train": train},
                       {"task": task, "train_sha256": "ab"})
    assert mismatch(with_new_defaults(old), with_head) == {"config": "model.linear_head: false -> true"}
    on_val = record(current["config"], {"task": {**task, "split": "val"}, "train_sha256": "ab"})
    assert mismatch(with_new_defaults(old), on_val) == {"data": "task.split: test -> val"}
    other_data = record(current["config"], {"task": task, "train_sha256": "cd"})
    assert mismatch(with_new_defaults(old), other_data) == {"data": "train_sha256: ab -> cd"}
