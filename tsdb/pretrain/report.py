"""The pretraining report: training cost (wall and CPU seconds), training-state bytes per
block against the end-to-end model as the training loop measured them, zero-shot figures
against seasonal naive, and the shipped checkpoint of the first arm."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tsdb.errors import TsdbError
from tsdb.pretrain.config import PretrainConfig
from tsdb.pretrain.train import LOG_FILE, load_pretrain_config, packaged_tier, usage

MEMORY_PARTS = ("param_bytes", "grad_bytes", "optimizer_bytes", "saved_activation_bytes", "train_state_bytes")


def memory_table(run_dir: Path, arms: list[str]) -> dict:
    """Per arm and unit the training-state bytes recorded in ``training.json`` (one real step of
    the unit, measured by the training loop), and the e2e / largest-block ratios."""
    out = {}
    for arm in arms:
        path = run_dir / arm / "training.json"
        if path.exists():
            summary = json.loads(path.read_text())
            out[arm] = {"units": {name: {k: u["memory"].get(k) for k in (*MEMORY_PARTS, "params",
                                                                           "cuda_max_memory_allocated")
                                         if k in u["memory"]} for name, u in summary["units"].items()},
                        "largest_unit_train_state_bytes": summary["train_state_bytes"],
                        "params": summary["params"]}
    if "e2e" in out and "depth" in out:
        e2e, depth = out["e2e"]["largest_unit_train_state_bytes"], out["depth"]["largest_unit_train_state_bytes"]
        out["e2e_over_largest_block"] = e2e / depth
    return out


# what may differ between two runs of one pretraining config whose reports are compared: which
# arms a run trains and how an arm's steps are spread over processes (the optimisation is the same)
_RUN_ONLY = {"arms": True, "arm_train": True, "train": {"progress"}}


def against_report(report: Path, cfg) -> dict:
    """Memory and zero-shot summaries of another arm's report of the same pretraining config
    (e.g. the depth arm, when this run trained only its e2e twin), refused if the configs differ."""
    from tsdb.provenance import differences

    path = Path(report) / "results.json"
    if not path.exists():
        raise TsdbError(f"{report} holds no pretraining report (results.json); run `tsdb pretrain-eval --report` first")
    other = json.loads(path.read_text())
    changed = differences(PretrainConfig.model_validate(other["config"]).model_dump(exclude=_RUN_ONLY),
                          cfg.model_dump(exclude=_RUN_ONLY))
    if changed:
        raise TsdbError(f"{report} was pretrained with another config ({'; '.join(changed[:3])}); compare runs of one "
                        "config only")
    return {"report": str(report), "memory": {a: m for a, m in other["memory"].items() if isinstance(m, dict)},
            "summaries": {a: r["summary"] for a, r in other["arms"].items()}}


def write_pretrain_report(run_dir: Path, results: dict, report_dir: Path, command: str | None = None,
                          against: Path | None = None) -> Path:
    """``results.json``, ``report.md`` and ``model/`` (the first arm's checkpoint) in ``report_dir``;
    with ``against``, memory and zero-shot beside that report's other arms."""
    from tsdb.pretrain.checkpoint import save_pretrained
    from tsdb.training.loop import load_model

    cfg = load_pretrain_config(run_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    arms = list(results["arms"])
    memory = memory_table(run_dir, cfg.arms)
    results = dict(results, config=cfg.model_dump(mode="json"), usage=usage(run_dir), memory=memory,
                   tier=packaged_tier(cfg), invocations=invocations(run_dir), command=command)
    if against is not None:
        results["against"] = against_report(against, cfg)
        both = {**results["against"]["memory"], **{a: m for a, m in memory.items() if isinstance(m, dict)}}
        if "e2e" in both and "depth" in both:
            memory["e2e_over_largest_block"] = (both["e2e"]["largest_unit_train_state_bytes"]
                                                / both["depth"]["largest_unit_train_state_bytes"])
    arm_cfg, _, model = load_model(run_dir / arms[0])
    ckpt = save_pretrained(arm_cfg, model, report_dir / "model", info={"arm": arms[0], "run": str(run_dir)})
    results["checkpoint"] = json.loads((ckpt / "checkpoint.json").read_text())
    shutil.copy(run_dir / "pretrain.yaml", report_dir / "pretrain.yaml")
    results.pop("path", None)
    (report_dir / "results.json").write_text(json.dumps(results, indent=2))
    (report_dir / "report.md").write_text(render(results, cfg, command))
    return report_dir / "results.json"


def invocations(run_dir: Path) -> list[dict]:
    """The records of ``pretrain-log.jsonl`` (one per invocation and arm)."""
    path = run_dir / LOG_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _mib(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:.2f}"


def render(results: dict, cfg, command: str | None = None) -> str:
    m, t = cfg.model, cfg.train
    run = results["run"]
    tier = results.get("tier") or "pretrain.yaml (beside this report)"
    lines = ["# Pretraining report", "",
             f"Produced by `tsdb pretrain --config {tier} --out {run}` (the invocations, with their wall and CPU "
             f"seconds, are in `{run}/pretrain-log.jsonl`; the table below sums them) and:", "", "```bash",
             command or f"tsdb pretrain-eval {run} --report <this folder>", "```", "",
             f"Model: `{m.strategy}` {m.n_layers} layers in {m.n_blocks} blocks, d_model {m.d_model}, "
             f"context {m.context_length}, horizon {m.horizon}, patch {m.patch_length}, K = {m.inference_steps} "
             f"{m.sampler} steps. Training: {t.steps_per_block} steps per unit, batch {t.batch_size}, lr {t.lr}. "
             f"Corpus weights {cfg.corpus.weights}; short-context share {cfg.stream.short_context_prob}. "
             "The full configuration is `pretrain.yaml` beside this report.", ""]
    lines += ["## Training cost", "",
              "Wall and CPU seconds summed over each arm's block jobs (`pretrain-log.jsonl`); the machine is "
              "shared, so CPU seconds are the steadier figure.", "",
              "| arm / job | invocations | wall s | CPU s |", "|---|---|---|---|"]
    for arm, u in results["usage"].items():
        lines.append(f"| {arm} | {u['invocations']} | {u['wall_seconds']:.0f} | {u['cpu_seconds']:.0f} |")
    runs = results.get("invocations", [])
    if runs:
        lines += ["", "Invocations (`pretrain-log.jsonl`):", ""]
        lines += [f"- {r['finished']}: {r['arm']}" + (f" blocks {r['blocks']}" if r.get("blocks") else "")
                  + f", {r['wall_seconds']:.0f} s wall, {r['cpu_seconds']:.0f} CPU s, load {r['load_average']:.1f}"
                  + (f" (`{r['command']}`)" if r.get("command") else "") for r in runs]
    mem = results["memory"]
    lines += ["", "## Training memory per unit", "",
              "Exact bytes of one real training step of each unit as the training loop records them "
              "(`units/<unit>/done.json`, `training.json`): parameters + gradients + AdamW state + saved "
              "activations.", "",
              "| arm | unit | params | param MiB | grad MiB | optimizer MiB | saved act. MiB | train state MiB |",
              "|---|---|---|---|---|---|---|---|"]
    for arm in (a for a in mem if isinstance(mem[a], dict)):
        for name, u in mem[arm]["units"].items():
            lines.append(f"| {arm} | {name} | {u.get('params', 'n/a'):,} | {_mib(u.get('param_bytes'))} | "
                         f"{_mib(u.get('grad_bytes'))} | {_mib(u.get('optimizer_bytes'))} | "
                         f"{_mib(u.get('saved_activation_bytes'))} | {_mib(u.get('train_state_bytes'))} |")
    a = results.get("against")
    if a:
        lines += ["", f"The same config's other arm(s), from `{a['report']}`:", "",
                  "| arm | units | params | largest unit's train state MiB |", "|---|---|---|---|"]
        lines += [f"| {arm} | {len(m['units'])} | {m['params']:,} | {_mib(m['largest_unit_train_state_bytes'])} |"
                  for arm, m in a["memory"].items()]
    if "e2e_over_largest_block" in mem:
        lines += ["", f"End-to-end training state / largest block's: **{mem['e2e_over_largest_block']:.2f}x**."]
    s = results["settings"]
    lines += ["", "## Zero-shot", "",
              f"{s['num_samples']} samples, K = {s['num_steps']}, ETTh1 every {s['etth1_stride']}th test window, "
              f"{s['torch_threads']} torch thread(s). Reference: "
              f"{next(iter(next(iter(results['arms'].values()))['protocols'].values()))['seasonal_naive']['reference']}. "
              "CRPS = mean weighted quantile loss over q = 0.1..0.9, MASE of the sample median (gluonts.ev).", ""]
    for arm, r in results["arms"].items():
        lines += [f"### {arm}", "",
                  "| protocol | windows | CRPS | seasonal naive CRPS | ratio | MASE | seasonal naive MASE | ratio | rollout |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, p in r["protocols"].items():
            o, n = p["model"], p["seasonal_naive"]
            lines.append(f"| {name} | {o['num_windows']} | {o['crps']:.4f} | {n['crps']:.4f} | {p['crps_ratio']:.3f} | "
                         f"{o['mase']:.3f} | {n['mase']:.3f} | {p['mase_ratio']:.3f} | {'yes' if o['rollout'] else 'no'} |")
        sm = r["summary"]
        lines += ["", f"Geometric mean over {', '.join(sm['datasets'])}: CRPS ratio **{sm['crps_ratio_geomean']:.3f}** "
                  f"(target <= 0.85), MASE ratio {sm['mase_ratio_geomean']:.3f}; over all protocols: CRPS ratio "
                  f"{sm['all_protocols_crps_ratio_geomean']:.3f}, MASE ratio {sm['all_protocols_mase_ratio_geomean']:.3f}. "
                  f"CRPS below seasonal naive on every protocol: **{'yes' if sm['below_seasonal_naive_everywhere'] else 'no'}**.", ""]
    if a:
        lines += [f"Zero-shot of the other arm(s) in `{a['report']}` (same protocols and seasonal naive):", "",
                  "| arm | geometric mean CRPS ratio (" + ", ".join(next(iter(a["summaries"].values()))["datasets"])
                  + ") | over all protocols | below seasonal naive everywhere |", "|---|---|---|---|"]
        lines += [f"| {arm} | {sm['crps_ratio_geomean']:.3f} | {sm['all_protocols_crps_ratio_geomean']:.3f} | "
                  f"{'yes' if sm['below_seasonal_naive_everywhere'] else 'no'} |" for arm, sm in a["summaries"].items()]
        lines.append("")
    c = results["checkpoint"]
    lines += ["## Checkpoint", "",
              f"`model/` holds the `{c['arm']}` arm: `{c['weights']}` ({c['bytes'] / 2**20:.2f} MiB, {c['params']:,} "
              f"parameters, sha256 `{c['sha256'][:16]}...`) and `config.yaml`. Load it with "
              "`tsdb.pretrain.TsdbPipeline.from_pretrained(\"reports/<this folder>/model\")`, fine-tune it with "
              "`tsdb finetune`, export it with `tsdb export`.", "",
              "Figures are written by `tsdb.pretrain.report` from `results.json` in this folder."]
    return "\n".join(lines) + "\n"
