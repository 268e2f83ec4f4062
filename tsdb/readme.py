"""Render the README's results section from committed ``reports/*/results.json``.

``python -m tsdb.readme`` rewrites the text between the results markers of README.md, so
every number there comes from a benchmark's own output, never typed by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _row(name: str, f: dict, e2e: dict, cols: list[str]) -> str:
    cells = [name]
    for c in cols:
        v = f.get(c)
        cells.append("n/a" if v is None else f"{v:.4f}" if c == "crps" else f"{v:.3f}")
    ratio = f["crps"] / e2e["crps"] if e2e.get("crps") else None
    cells.append("n/a" if ratio is None else f"{ratio:.3f}")
    mem = (e2e["train_state_bytes"] / f["train_state_bytes"]
           if e2e.get("train_state_bytes") and f.get("train_state_bytes") else None)
    cells.append("n/a" if mem is None else f"{mem:.2f}x")
    secs = f.get("train_seconds")
    cells.append("n/a" if secs is None else f"{secs:.0f}")
    return "| " + " | ".join(cells) + " |"


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
        lines = [f"**{res['name']}** ({res['task']['num_windows']} test windows; command: `{command}`; "
                 f"report: [`{path.parent.relative_to(ROOT)}/report.md`]({path.parent.relative_to(ROOT)}/report.md))", "",
                 "| arm | " + " | ".join(c.upper() for c in cols) + " | CRPS / e2e | e2e / arm training state | train s |",
                 "|---" * (len(cols) + 4) + "|"]
        lines += [_row(n, f, e2e, cols) for n, f in arms.items()]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) if blocks else "_No benchmark has been run yet._"


def update(readme: Path = ROOT / "README.md") -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        sys.exit(f"{readme} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{render()}\n{END}{tail}")


if __name__ == "__main__":
    update()
