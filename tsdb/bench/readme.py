"""Render the README's results section from committed ``reports/*/results.json``.

``python -m tsdb.bench.readme`` rewrites the text between the results markers of README.md, so
every number there comes from a benchmark's own output, never typed by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tsdb.bench.stats import crps_ratio, mean_std_text, ratio_text

ROOT = Path(__file__).resolve().parents[2]  # the source checkout (README.md, reports/)
START, END = "<!-- results:start -->", "<!-- results:end -->"


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
    """The paired-bootstrap verdicts of the best tsdb arm (results.json schema 2)."""
    out = []
    for c in res.get("comparisons") or []:
        if not c["role"].startswith("best"):
            continue
        verdict = "tie" if c["verdict"] == "tie" else f"{c[c['verdict']]} lower"
        out.append(f"{c['a']} vs {c['b']}: CRPS ratio {c['ratio']:.3f} "
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
        seeded = any(f.get("seeds") for f in arms.values())
        lines = [f"**{res['name']}** ({res['task']['num_windows']} test windows; command: `{command}`; "
                 f"report: [`{path.parent.relative_to(ROOT)}/report.md`]({path.parent.relative_to(ROOT)}/report.md)"
                 + ("; mean ± std over seeds, CRPS / e2e with the range of per-seed ratios" if seeded else
                    "; one seed") + ")", "",
                 "| arm | seeds | " + " | ".join(c.upper() for c in cols)
                 + " | CRPS / e2e | e2e / arm training state | train s |",
                 "|---" * (len(cols) + 5) + "|"]
        lines += [_row(n, f, e2e, cols) for n, f in arms.items()]
        lines += _verdicts(res)
        blocks.append("\n".join(lines))
    streaming = _streaming(reports)
    if streaming:
        blocks.append(streaming)
    return "\n\n".join(blocks) if blocks else "_No benchmark has been run yet._"


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
        rows.append(f"| [{m['arm']}]({path.parent.relative_to(ROOT)}/report.md) | `{res['command']}` | "
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


if __name__ == "__main__":
    update()
