"""Render the README's results section from committed ``reports/*/results.json``.

``python -m tsdb.bench.readme`` rewrites the text between the results markers of README.md, so
every number there comes from a benchmark's own output, never typed by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tsdb.bench.experiment import ExperimentSpec
from tsdb.bench.stats import crps_ratio, mean_std_text, ratio_text

ROOT = Path(__file__).resolve().parents[2]  # the source checkout (README.md, reports/)
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _folder(results_json: Path, reports: Path) -> Path:
    """A report's folder as the README links it (relative to the folder that holds ``reports``)."""
    return results_json.parent.relative_to(reports.parent)


def _row(name: str, f: dict, e2e: dict, cols: list[str]) -> str:
    cells = [name, str(len(f["seeds"])) if f.get("seeds") else "1"]
    for c in cols:
        cells.append(mean_std_text(f, c, 4 if c == "crps" else 3))
    cells.append(ratio_text(*crps_ratio(f, e2e)))
    mem = (e2e["train_state_bytes"] / f["train_state_bytes"]
           if e2e.get("train_state_bytes") and f.get("train_state_bytes") else None)
    cells.append("n/a" if mem is None else f"{mem:.2f}x")
    secs = f.get("train_seconds")
    cells.append("n/a" if secs is None else f"{secs:.0f}")
    return "| " + " | ".join(cells) + " |"


def _verdicts(res: dict) -> list[str]:
    """The paired-bootstrap verdicts of the best tsdb arm, of the validation-chosen arm and of
    a benchmark's headline comparison (results.json schema 2)."""
    out = []
    for c in res.get("comparisons") or []:
        if not (c["role"].startswith(("best", "validation-chosen")) or c.get("headline")):
            continue
        verdict = "tie" if c["verdict"] == "tie" else f"{c[c['verdict']]} lower"
        out.append(f"{c['a']} vs {c['b']}: {c.get('metric', 'crps').upper()} ratio {c['ratio']:.3f} "
                   f"[{c['ratio_ci'][0]:.3f}, {c['ratio_ci'][1]:.3f}], {verdict}")
    if not out:
        return []
    return ["", f"Paired bootstrap over test windows ({int(100 * res['comparisons'][0]['level'])}% interval): "
            + "; ".join(out) + "."]


def render(reports: Path = ROOT / "reports") -> str:
    blocks = []
    for path in sorted(reports.glob("*/results.json")):
        res = json.loads(path.read_text())
        arms = res.get("arms", {})
        if not arms or "crps" not in next(iter(arms.values())):
            continue
        cols = ["crps", "mase"] + (["mse", "mae"] if res["task"].get("protocol") == "etth1" else [])
        e2e = arms.get("e2e", {})
        command = res.get("command") or f"tsdb bench {path.parent.name}"
        rel = _folder(path, reports)
        seeded = any(f.get("seeds") for f in arms.values())
        lines = [f"**{res['name']}** ({res['task']['num_windows']} test windows; command: `{command}`; "
                 f"report: [`{rel}/report.md`]({rel}/report.md)"
                 + ("; mean ± std over seeds, CRPS / e2e with the range of per-seed ratios" if seeded else
                    "; one seed") + ")", "",
                 "| arm | seeds | " + " | ".join(c.upper() for c in cols)
                 + " | CRPS / e2e | e2e / arm training state | train s |",
                 "|---" * (len(cols) + 5) + "|"]
        lines += [_row(n, f, e2e, cols) for n, f in arms.items()]
        lines += _verdicts(res)
        spec = path.parent / "spec.yaml"
        unrun = ExperimentSpec.from_yaml(spec).unrun(res) if spec.exists() else []
        if unrun:
            lines += ["", f"_Arms of the spec not run yet: {', '.join(unrun)}; the spec's command without `--arms` "
                          f"runs them and reuses the arms above._"]
        blocks.append("\n".join(lines))
    for extra in (_forecast_defaults(reports), _memory(reports), _streaming(reports), _streamed_accuracy(reports),
                  _zero_shot(reports), _finetune(reports)):
        if extra:
            blocks.append(extra)
    return "\n\n".join(blocks) if blocks else "_No benchmark has been run yet._"


def _streamed_accuracy(reports: Path) -> str:
    """The ``tsdb bench streamed-accuracy`` verdict: streamed against cold CRPS per policy."""
    path = reports / "streamed-accuracy" / "results.json"
    if not path.exists():
        return ""
    res = json.loads(path.read_text())
    if "choice" not in res:   # written while the bench runs; the choice comes at the end
        return (f"**streamed-accuracy**: partial results only ([`reports/streamed-accuracy/report.md`]"
                f"(reports/streamed-accuracy/report.md)); `{res['command']}` finishes them.")
    choice = res["choice"]
    rows = ", ".join(f"{r['dataset']} {r['strategy']} ({r['windows']} windows, seeds {', '.join(r['seeds'])})"
                     for r in res["rows"])
    worst = "; ".join(f"{policy} {ratio:.3f}" for policy, ratio in choice["worst_ratio"].items())
    return (f"**streamed-accuracy** (command: `{res['command']}`; report: "
            f"[`reports/streamed-accuracy/report.md`](reports/streamed-accuracy/report.md)): the same trained "
            f"model served cold and streamed by the torch-free runtime, on {rows}. Worst streamed / cold CRPS "
            f"per runtime policy: {worst}. Chosen: `{choice['policy']}` "
            f"({'meets' if choice['meets_target'] else 'misses'} the {100 * (choice['target'] - 1):.0f}% target); "
            "the state-keeping policies miss it because the streamed state reaches further back than the "
            "training context (see the report).")


def _forecast_defaults(reports: Path) -> str:
    """The ``tsdb bench forecast-defaults`` table: ``tsdb forecast`` with its defaults against
    seasonal naive and AutoETS on each dataset's held-out last window."""
    path = reports / "forecast-defaults" / "results.json"
    if not path.exists():
        return ""
    from tsdb.bench.forecast_defaults import target_met, verdict_text
    res = json.loads(path.read_text())
    rows = []
    for key, r in res["datasets"].items():
        sp = r["tsdb"]["spread"]["crps"]
        rows.append(f"| {key} | {r['series']} | {r['horizon']} | {sp['mean']:.4f} ± {sp['std']:.4f} | "
                    + " | ".join(f"{p['crps']:.4f}" for p in r["peers"].values()) + " | "
                    + "; ".join(f"{n}: {verdict_text(r, p)}" for n, p in r["peers"].items())
                    + f" | {'met' if target_met(r) else 'missed'} |")
    peers = list(next(iter(res["datasets"].values()))["peers"])
    return "\n".join([
        f"**forecast-defaults** (command: `{res['command']}`; report: "
        "[`reports/forecast-defaults/report.md`](reports/forecast-defaults/report.md)): `tsdb forecast` given "
        "nothing but the horizon, on each dataset written as a long CSV without its last window, scored on that "
        f"window; seeds {res['spec']['seeds']}; CRPS(tsdb) / CRPS(peer) with a paired bootstrap over series.", "",
        "| dataset | series | horizon | tsdb CRPS | " + " | ".join(f"{p} CRPS" for p in peers)
        + " | tsdb / peer | target |", "|---" * (len(peers) + 6) + "|", *rows])


def _memory(reports: Path) -> str:
    """The ``tsdb bench memory`` report: every depth-bB training state against both e2e and
    e2e with activation checkpointing, and what checkpointing costs in step time."""
    path = reports / "memory" / "results.json"
    if not path.exists():
        return ""
    from tsdb.bench.memory import depth_arms, index_points, ratio_rows, step_time_label
    res = json.loads(path.read_text())
    arms = depth_arms(res)
    first = next(p for p in res["points"] if "error" not in p)
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}x"  # noqa: E731
    cols = [f"{base} / {arm}" for arm in arms for base in ("e2e", "e2e-ckpt")]
    rows = [f"| {r['width']} | {r['depth']} | {r['params'] / 1e6:.1f}M | "
            + " | ".join(fmt(r[c.replace(" / ", "/")]) for c in cols) + f" | {fmt(r['ckpt_time'])} "
            + ("" if not r["ckpt_time_range"] else "({:.2f}-{:.2f}) |".format(*r["ckpt_time_range"]))
            for r in ratio_rows(res)]
    rel = _folder(path, reports)
    why = ("" if first["device"].startswith("cuda")
           else ": other jobs on the shared machine stretch wall time, not CPU time")
    return "\n".join([
        f"**memory** (exact training-state bytes of one training step, baseline / arm; {first['device']} "
        f"{first['precision']}, batch {first['batch_size']} x {first['tokens_per_sample']} tokens, "
        f"{res['threads']} thread(s); command: `{res['command']}`; report: [`{rel}/report.md`]({rel}/report.md))", "",
        "| d | L | e2e params | " + " | ".join(cols) + " | e2e-ckpt / e2e step time |",
        "|---" * (len(cols) + 4) + "|", *rows, "",
        "Bytes are exact and the same for every seed. e2e-ckpt is e2e with per-layer activation checkpointing; its "
        f"step time over e2e's is the price of checkpointing ({step_time_label(index_points(res))}{why}; in "
        "brackets the range over the timed steps). Peak memory, step times and where the bytes are: the report."])


def _streaming(reports: Path) -> str:
    """One row per committed ``tsdb bench streaming`` report, at its longest target history."""
    rows = []
    for path in sorted(reports.glob("*/results.json")):
        res = json.loads(path.read_text())
        if res.get("benchmark") != "streaming":
            continue
        row = [r for r in res["rows"] if not r["extra"]][-1]
        m, su = res["model"], res["summary"]
        ok = res["checks"]
        rows.append(f"| [{m['arm']}]({_folder(path, reports)}/report.md) | `{res['command']}` | "
                    f"{m['params'] / 1e3:.0f}k | {row['history']} | {row['ort_streaming_ms']:.1f} | "
                    f"{row['torch_streaming_ms']:.1f} | {row['torch_recompute_ms']:.1f} | "
                    f"{su['flat_ratio_ort']:.2f}x | {su['speedup_ort_vs_recompute']:.2f}x"
                    f"{'' if any(ok[k] for k in ok if k.startswith('ORT streaming >=')) else ' (target 5x missed)'} | "
                    f"{su['parity_ort_vs_torch']:.1e} |")
    if not rows:
        return ""
    return "\n".join([
        "**streaming** (per update: one new value, then a forecast of 100 samples; 1 thread; median ms)", "",
        "| model | command | params | history | ORT streaming | PyTorch streaming | PyTorch recompute "
        "| ORT growth 128 -> 2048 | ORT vs recompute | parity ORT-PyTorch |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows, "",
        "The recompute encodes the whole history with the same sliding window and noise (the same numbers "
        "as streaming); for `horizon` it replays every roll since initialisation. Where the time goes is "
        "in each report."])


def update(readme: Path = ROOT / "README.md") -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        sys.exit(f"{readme} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{render()}\n{END}{tail}")


def _zero_shot(reports: Path) -> str:
    """One row per arm of each committed ``tsdb pretrain-eval`` report: zero-shot CRPS / seasonal naive."""
    rows, protocols, seeds = [], None, set()
    for path in sorted(reports.glob("*/results.json")):
        res = json.loads(path.read_text())
        arms = res.get("arms", {})
        if not arms or "summary" not in next(iter(arms.values())):
            continue
        seeds.add(res["config"]["train"]["seed"])
        for arm, r in arms.items():
            protocols = protocols or list(r["protocols"])
            cells = [f"{r['protocols'][p]['crps_ratio']:.3f}" if p in r["protocols"] else "n/a" for p in protocols]
            rows.append(f"| [{path.parent.name}]({_folder(path, reports)}/report.md) {arm} | " + " | ".join(cells)
                        + f" | {r['summary']['crps_ratio_geomean']:.3f} |")
    if not rows:
        return ""
    return "\n".join([
        "**zero-shot** (pretrained on the local corpus only; CRPS / seasonal naive's with its intervals; "
        "geometric mean over M4 Hourly, ETTh1-96 and exchange rate, the GIFT-Eval summary; one pretraining "
        f"run per model, seed {', '.join(map(str, sorted(seeds)))}: no seed spread yet, so no difference "
        "between the two models is claimed)", "",
        "| model | " + " | ".join(protocols) + " | geometric mean |", "|---" * (len(protocols) + 2) + "|", *rows])


def _finetune(reports: Path) -> str:
    """The ``tsdb finetune-bench`` table: each start against blocks trained from scratch at the same steps."""
    path = reports / "pretrain-finetune" / "results.json"
    if not path.exists():
        return ""
    res = json.loads(path.read_text())
    c = res["config"]
    arms = [a for a in c["arms"] if a != "scratch"]
    rows = []
    for dataset, cells in res["test"].items():
        paired = res.get("against_scratch", {}).get(dataset, {})
        row = [dataset, f"{cells['scratch']['crps_mean']:.4f} ± {cells['scratch']['crps_std']:.4f}"]
        for arm in arms:
            p = paired.get(arm)
            row.append("n/a" if arm not in cells else f"{cells[arm]['crps_mean']:.4f} ("
                       + (f"{p['ratio']:.3f} [{p['ratio_ci'][0]:.3f}, {p['ratio_ci'][1]:.3f}]"
                          + {"a": ", lower", "b": ", higher", "tie": ", tie"}[p["verdict"]] if p else "") + ")")
        rows.append("| " + " | ".join(row) + " |")
    return "\n".join([
        f"**fine-tuning** (command: `{res['command']}`; report: "
        "[`reports/pretrain-finetune/report.md`](reports/pretrain-finetune/report.md)): depth blocks trained "
        f"{c['steps']} steps each from scratch or from the pretrained checkpoints, learning rates chosen on validation "
        f"windows, seeds {c['seeds']}; CRPS mean, and in brackets CRPS / scratch with a 95% paired bootstrap over "
        "test windows", "",
        "| dataset | scratch | " + " | ".join(arms) + " |", "|---" * (len(arms) + 2) + "|", *rows])


if __name__ == "__main__":
    update()
