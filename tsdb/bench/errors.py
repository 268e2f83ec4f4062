"""``tsdb bench errors``: every bad-input path of the command line, timed.

Each case is a real ``tsdb`` command on a bad input (made here in a temporary folder, with
one small trained-looking run directory whose model.pt is then damaged in several ways).
A case passes when the command exits 2, prints exactly one line on stderr naming the file,
series or flag, writes nothing under its ``--out``, and never imports torch or lightning
(checked in the process itself). ``tests/test_cli_errors.py`` asserts all of this for every
case; this benchmark adds the wall time of each command (the median of ``repeats`` runs,
Python startup included) and writes ``results.json`` and ``report.md``.
"""

from __future__ import annotations

import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COMMAND = "tsdb bench errors"
# run the CLI, then report on stdout's last line which slow libraries the process imported
PROBE = ("import json, sys\nfrom tsdb.cli.main import main\n"
         "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
         "print(json.dumps({'heavy': sorted(m for m in ('torch', 'lightning') if m in sys.modules)}))\n"
         "sys.exit(rc)\n")


@dataclass
class Case:
    name: str           # what is wrong, in words
    argv: list[str]     # the tsdb command line
    mentions: str       # a word the one-line message must contain (the file, series or flag)
    out: str | None = None   # a folder that must stay empty / absent


class _Evil:
    """A pickle that would run a shell command when unpickled (must never be loaded)."""

    def __reduce__(self):
        return (os.system, ("touch tsdb-pwned",))


def make_cases(tmp: str | Path) -> list[Case]:
    """Write the bad inputs under ``tmp`` and return the cases."""
    tmp = Path(tmp)
    t = np.arange(200)
    good = tmp / "good.csv"
    rows = ["store,ts,sales"] + [f"{s},{ts},{100 + 10 * np.sin(i / 4) + k:.3f}"
                                 for k, s in enumerate("ab") for i, ts in
                                 enumerate(np.datetime_as_string(np.datetime64("2024-01-01T00") + t, "m"))]
    good.write_text("\n".join(rows) + "\n")

    def table(name: str, lines: list[str]) -> Path:
        path = tmp / name
        path.write_text("\n".join(lines) + "\n")
        return path

    def with_value(name: str, value: str) -> Path:
        bad = rows.copy()
        bad[50] = bad[50].rsplit(",", 1)[0] + f",{value}"
        return table(name, bad)

    (tmp / "empty.csv").write_text("")
    dup = rows.copy()
    dup[250] = dup[249]
    cols = ["--item-id", "store", "--timestamp", "ts", "--target", "sales", "--freq", "h"]

    def forecast(csv: Path, *extra: str, out: str = "fc", horizon: str = "12", target: str = "sales") -> list[str]:
        return ["forecast", "--input", str(csv), "--item-id", "store", "--timestamp", "ts", "--target", target,
                "--freq", "h", "--horizon", horizon, "--out", str(tmp / out), *extra]

    # a run directory whose model.pt is damaged in three ways (no torch needed to make them)
    run = tmp / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {context_length: 32, horizon: 16, patch_length: 8}\n")
    runs = {}
    for kind in ("bitflip", "truncated", "malicious"):
        d = tmp / f"run-{kind}"
        d.mkdir()
        (d / "config.yaml").write_text((run / "config.yaml").read_text())
        runs[kind] = d
    import hashlib
    import zipfile
    with zipfile.ZipFile(runs["bitflip"] / "model.pt", "w") as z:
        z.writestr("model/data.pkl", b"x" * 4096)
    data = (runs["bitflip"] / "model.pt").read_bytes()
    (runs["bitflip"] / "model.pt.sha256").write_text(hashlib.sha256(data).hexdigest() + "  model.pt\n")
    flipped = bytearray(data)
    for i in range(100, 500):
        flipped[i] ^= 0xFF
    (runs["bitflip"] / "model.pt").write_bytes(bytes(flipped))
    (runs["truncated"] / "model.pt").write_bytes(data[: len(data) // 2])
    (runs["malicious"] / "model.pt").write_bytes(pickle.dumps(_Evil()))
    # an --out whose run/ holds the model of another input
    other = tmp / "other-out" / "run"
    other.mkdir(parents=True)
    (other / "data.json").write_text(json.dumps({"source": "input", "input": "/elsewhere/sales.csv",
                                                 "sha256": "0" * 64, "item_id": "store", "timestamp": "ts",
                                                 "target": "sales", "freq": "h", "covariates": None,
                                                 "held_out": 0}))
    # a training run whose last checkpoint was damaged after it was written
    trained = tmp / "train-out" / "units" / "block-0"
    trained.mkdir(parents=True)
    ckpt = b"PK" + b"\0" * 2000
    (trained / "last.ckpt").write_bytes(ckpt[:1000])
    (trained / "last.ckpt.sha256").write_text(hashlib.sha256(ckpt).hexdigest() + "  last.ckpt\n")
    cfg = tmp / "tiny.yaml"
    cfg.write_text("model: {context_length: 32, horizon: 8, patch_length: 8, d_model: 16, n_heads: 2}\n")
    typo = tmp / "typo.yaml"
    typo.write_text("model: {n_blokcs: 4}\n")
    broken = tmp / "broken.yaml"
    broken.write_text("model: {context_length: [32\n")
    exported, damaged = tmp / "exported", tmp / "damaged"
    exported.mkdir()
    damaged.mkdir()
    (exported / "tsdb_model.json").write_text('{"format": "tsdb-streaming-onnx"}')
    (damaged / "tsdb_model.json").write_text('{"format": "tsdb-streaming-onnx", "graphs": ')
    foreign = tmp / "foreign"
    foreign.mkdir()
    (foreign / "tsdb_model.json").write_text('["not", "metadata"]')
    records = tmp / "records.ndjson"
    records.write_text('{"item_id": "a", "timestamp": 0, "value": 1.0}\n')
    stream = ["stream", str(exported), "--input", str(records)]
    train = ["train", "--config", str(cfg), "--input", str(good), *cols]
    # tuning specs (tsdb tune): the packaged quick M4 bench, a misspelt override, a missing arm
    def tune_spec(name: str, **fields) -> Path:
        path = tmp / name
        path.write_text(json.dumps({"name": "t", "bench": "configs/bench/m4-hourly-quick.yaml", "arm": "depth-b4",
                                    **fields}))
        return path

    tune_typo = tune_spec("tune-typo.yaml", variants={"head": {"model": {"linear_heed": True}}})
    tune_arm = tune_spec("tune-arm.yaml", arm="depth-b9")
    tune_ok = tune_spec("tune-ok.yaml")

    return [
        Case("forecast: empty CSV (0 bytes)", forecast(tmp / "empty.csv"), "empty.csv", "fc"),
        Case("forecast: CSV with a header and no rows", forecast(table("header.csv", rows[:1])), "header.csv",
             "fc"),
        Case("forecast: input file missing", forecast(tmp / "nope.csv"), "nope.csv", "fc"),
        Case("forecast: input not CSV/Parquet", forecast(table("data.txt", rows)), "data.txt", "fc"),
        Case("forecast: --horizon 0", forecast(good, horizon="0"), "--horizon", "fc"),
        Case("forecast: --horizon -3", forecast(good, horizon="-3"), "--horizon", "fc"),
        Case("forecast: --num-samples 0", forecast(good, "--num-samples", "0"), "--num-samples", "fc"),
        Case("forecast: --target names no column", forecast(good, target="revenue"), "revenue", "fc"),
        Case("forecast: duplicate timestamp", forecast(table("dup.csv", dup)), "'b'", "fc"),
        Case("forecast: non-numeric value", forecast(with_value("text.csv", "high")), "high", "fc"),
        Case("forecast: value 1e39 (beyond float32)", forecast(with_value("e39.csv", "1e39")), "'a'", "fc"),
        Case("forecast: value -1e39", forecast(with_value("me39.csv", "-1e39")), "'a'", "fc"),
        Case("forecast: value 1e300", forecast(with_value("e300.csv", "1e300")), "'a'", "fc"),
        Case("forecast: value 1e31 (beyond the 1e30 limit)", forecast(with_value("e31.csv", "1e31")), "'a'", "fc"),
        Case("forecast: series too short", forecast(table("short.csv", rows[:1] + rows[1:9] + rows[201:209])),
             "'a'", "fc"),
        Case("forecast: --out holds another input's model", forecast(good, out="other-out"), "other-out",
             "other-out/forecast.csv"),
        Case("forecast: --run whose model.pt is bit-flipped", forecast(good, "--run", str(runs["bitflip"])),
             "model.pt", "fc"),
        Case("forecast: --run whose model.pt is truncated", forecast(good, "--run", str(runs["truncated"])),
             "model.pt", "fc"),
        Case("forecast: --run whose model.pt is a malicious pickle",
             forecast(good, "--run", str(runs["malicious"])), "model.pt", "fc"),
        Case("forecast: --run is not a run", forecast(good, "--run", str(tmp / "nowhere")), "nowhere", "fc"),
        Case("train: --steps 0", train + ["--steps", "0", "--out", str(tmp / "tr")], "--steps", "tr"),
        Case("train: config field misspelt", ["train", "--config", str(typo), "--out", str(tmp / "tr")],
             "n_blokcs", "tr"),
        Case("train: config not valid YAML", ["train", "--config", str(broken), "--out", str(tmp / "tr")],
             "broken.yaml", "tr"),
        Case("train: config file missing", ["train", "--config", str(tmp / "no.yaml"), "--out", str(tmp / "tr")],
             "no.yaml", "tr"),
        Case("train: last.ckpt truncated after it was written", train + ["--out", str(tmp / "train-out")],
             "last.ckpt", "train-out/model.pt"),
        Case("train: --input and --dataset together", train + ["--dataset", "etth1", "--out", str(tmp / "tr")],
             "--dataset", "tr"),
        Case("evaluate: run folder missing", ["evaluate", str(tmp / "nowhere")], "nowhere"),
        Case("evaluate: --windows 0", ["evaluate", str(run), "--windows", "0"], "--windows"),
        Case("evaluate: run has no model.pt", ["evaluate", str(run)], "model.pt"),
        Case("evaluate: model.pt bit-flipped", ["evaluate", str(runs["bitflip"])], "model.pt"),
        Case("export: model.pt is a malicious pickle", ["export", str(runs["malicious"])], "model.pt"),
        Case("export: run has no model.pt", ["export", str(run)], "model.pt"),
        Case("stream: --num-samples 0", stream + ["--num-samples", "0"], "--num-samples"),
        Case("stream: --seed -1", stream + ["--seed", "-1"], "--seed"),
        Case("stream: --quantiles abc", stream + ["--quantiles", "abc"], "--quantiles"),
        Case("stream: --quantiles 0,1", stream + ["--quantiles", "0,1"], "--quantiles"),
        Case("stream: --batch-size 0", stream + ["--batch-size", "0"], "--batch-size"),
        Case("stream: tsdb_model.json is not JSON", ["stream", str(damaged), "--input", str(records)],
             "tsdb_model.json"),
        Case("stream: tsdb_model.json is not tsdb metadata", ["stream", str(foreign), "--input", str(records)],
             "tsdb_model.json"),
        Case("stream: model folder missing", ["stream", str(tmp / "nowhere"), "--input", str(records)], "nowhere"),
        Case("stream: --input missing", ["stream", str(exported), "--input", str(tmp / "no.ndjson")], "no.ndjson"),
        Case("stream: --state in a missing folder", stream + ["--state", str(tmp / "no" / "s.npz")], "--state"),
        Case("bench: unknown benchmark", ["bench", "nope"], "nope"),
        Case("bench: --config missing", ["bench", "m4-hourly", "--config", str(tmp / "no.yaml")], "no.yaml"),
        Case("bench soak: --updates 0", ["bench", "soak", "--updates", "0"], "--updates"),
        Case("tune: spec file missing", ["tune", "--config", str(tmp / "no-tune.yaml")], "no-tune.yaml"),
        Case("tune: variant field misspelt", ["tune", "--config", str(tune_typo), "--out", str(tmp / "tu")],
             "linear_heed", "tu"),
        Case("tune: arm not in the bench", ["tune", "--config", str(tune_arm), "--out", str(tmp / "tu")],
             "depth-b9", "tu"),
        Case("tune: --trials names no variant",
             ["tune", "--config", str(tune_ok), "--trials", "nope", "--out", str(tmp / "tu")], "nope", "tu"),
        Case("--threads 0", ["train", "--threads", "0", "--out", str(tmp / "tr")], "--threads", "tr"),
        Case("datasets: unknown dataset", ["datasets", "nope"], "nope"),
    ]


def run_case(case: Case, cwd: str | Path, env: dict | None = None) -> dict:
    """Run one case in a fresh process; its exit code, stderr lines, wall time and imports."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, *case.argv], capture_output=True, text=True, cwd=cwd,
                          env=env)
    seconds = time.perf_counter() - t0
    probe = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {"heavy": None}
    out = Path(cwd) / case.out if case.out else None
    wrote = bool(out and out.exists() and (out.is_file() or any(out.iterdir())))
    return {"case": case.name, "returncode": proc.returncode, "stderr": proc.stderr.strip().splitlines(),
            "seconds": seconds, "heavy_imports": probe["heavy"], "wrote_output": wrote,
            "mentions": case.mentions}


def passed(r: dict) -> bool:
    return (r["returncode"] == 2 and len(r["stderr"]) == 1 and r["stderr"][0].startswith("tsdb: error: ")
            and r["mentions"] in r["stderr"][0] and r["heavy_imports"] == [] and not r["wrote_output"])


def run_error_bench(out_dir: str | Path, repeats: int = 3) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="tsdb-errors-") as tmp:
        for case in make_cases(tmp):
            runs = [run_case(case, tmp, env) for _ in range(repeats)]
            rows.append({**runs[0], "seconds": statistics.median(r["seconds"] for r in runs),
                         "seconds_max": max(r["seconds"] for r in runs), "passed": all(map(passed, runs))})
    results = {"benchmark": "errors", "command": COMMAND, "repeats": repeats,
               "machine": {"platform": platform.platform(), "python": platform.python_version(),
                           "cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0]},
               "cases": len(rows), "passed": sum(r["passed"] for r in rows),
               "seconds_median": statistics.median(r["seconds"] for r in rows),
               "seconds_max": max(r["seconds_max"] for r in rows), "rows": rows}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(_report(results))
    return results


def _report(r: dict) -> str:
    m = r["machine"]
    lines = ["# Error paths of the `tsdb` command line", "",
             f"Produced by: `{r['command']}` ({m['platform']}, Python {m['python']}, {m['cpus']} CPUs, 1-minute load "
             f"average {m['load_average_1min']:.2f} when it finished). Each case is a fresh `tsdb` process on a bad "
             f"input, run {r['repeats']} times; seconds are the median wall time (Python startup included), max "
             "the slowest of the runs. A case passes when it exits 2 with exactly one `tsdb: error:` line naming "
             "the file, series or flag, writes nothing and never imports torch or lightning.", "",
             f"**{r['passed']} of {r['cases']} cases pass; median {r['seconds_median']:.2f} s, slowest "
             f"{r['seconds_max']:.2f} s (target: every error path under 3 s).**", "",
             "| case | exit | s (median) | s (max) | pass | message |", "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        msg = (row["stderr"][0] if row["stderr"] else "").replace("|", "\\|")
        lines.append(f"| {row['case']} | {row['returncode']} | {row['seconds']:.2f} | {row['seconds_max']:.2f} | "
                     f"{'yes' if row['passed'] else 'NO'} | `{msg}` |")
    lines += ["", "Figures are written by `tsdb.bench.errors` from `results.json` in this folder."]
    return "\n".join(lines) + "\n"


__all__ = ["Case", "make_cases", "passed", "run_case", "run_error_bench"]
