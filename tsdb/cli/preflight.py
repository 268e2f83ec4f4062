"""Checks of the command line and its files that run before any heavy import.

torch, lightning, gluonts and polars take seconds to import; a mistyped flag, a missing or
empty file, a corrupt run directory or an existing ``--out`` holding another input's model
is answered in well under a second by :func:`check`, with one line that names the file or
flag and the fix (``tsdb: error: ...``, exit code 2). Only the standard library, yaml and
pydantic (for ``config.yaml``) are imported here.

The argparse types (:func:`positive_int`, :func:`seed`, :func:`quantiles`) reject bad
values while parsing; :class:`OneLineParser` prints argparse's own errors as one line.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from tsdb import checksum
from tsdb.errors import TsdbError
from tsdb.pretrain import WEIGHTS_FILE

TABLE_SUFFIXES = (".csv", ".parquet")
STREAM_FORMATS = ("tsdb-streaming-onnx", "tsdb-streaming-onnx-horizon")
DATA_FILE = "data.json"        # what a run was trained on (written by tsdb train / forecast)


# -- argparse -------------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (``tsdb: error: ...``) and exits 2."""

    def error(self, message: str):
        self.exit(2, f"tsdb: error: {message} (see `{self.prog} --help`)\n")


def _int_at_least(text: str, low: int, words: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {words}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    return _int_at_least(text, 0, "0 or more")


def seed(text: str) -> int:
    """A random seed: an integer in [0, 2**63)."""
    value = nonnegative_int(text)
    if value >= 2**63:
        raise argparse.ArgumentTypeError(f"must be below 2**63, got {value}")
    return value


def quantiles(text: str) -> tuple[float, ...]:
    """Comma-separated quantile levels strictly inside (0, 1)."""
    levels = []
    for part in text.split(","):
        try:
            q = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part.strip()!r} is not a number; give levels in (0, 1) such as "
                                             "0.1,0.5,0.9") from None
        if not 0 < q < 1:
            raise argparse.ArgumentTypeError(f"quantile levels must lie strictly between 0 and 1, got {part.strip()}")
        levels.append(q)
    return tuple(levels)


# -- files ----------------------------------------------------------------------------------

def existing_file(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise TsdbError(f"{what} {path} does not exist; check the path")
    if not path.is_file():
        raise TsdbError(f"{what} {path} is not a file")
    return path


def table_columns(path: str | Path) -> list[str]:
    """Column names of a CSV or Parquet table that has at least one data row."""
    path = existing_file(path, "input file")
    if path.suffix not in TABLE_SUFFIXES:
        raise TsdbError(f"cannot read {path.name}: pass a .csv or .parquet file")
    if path.stat().st_size == 0:
        raise TsdbError(f"{path.name} is empty; it needs a header row and at least one data row")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            meta = pq.read_metadata(path)
        except Exception as e:  # noqa: BLE001  (pyarrow raises several kinds for a bad file)
            raise TsdbError(f"cannot read {path.name}: {str(e).splitlines()[0][:160]}; check that it is a valid "
                            "Parquet file") from None
        if meta.num_rows == 0:
            raise TsdbError(f"{path.name} has no data rows; check the input")
        return list(meta.schema.to_arrow_schema().names)
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if not header or not any(c.strip() for c in header):
            raise TsdbError(f"{path.name} has no header row; the first line must name the columns")
        if not any(any(c.strip() for c in row) for row in rows):
            raise TsdbError(f"{path.name} has no data rows; check the input")
    return header


def require_columns(path: str | Path, names: dict[str, str | None]) -> None:
    """``names`` maps a flag (``--target``) to the column it names; each must be in the table."""
    columns = table_columns(path)
    for flag, name in names.items():
        if name is not None and name not in columns:
            shown = ", ".join(columns[:12]) + (", ..." if len(columns) > 12 else "")
            raise TsdbError(f"column {name!r} not found in {Path(path).name} (columns: {shown}); pass the right "
                            f"column name with {flag}")




def run_dir(path: str | Path) -> Path:
    """A trained run (config.yaml readable and valid, model.pt present and intact) or a
    pretrained checkpoint folder (config.yaml and model.safetensors)."""
    from tsdb.config import ExperimentConfig
    path = Path(path)
    if not path.is_dir():
        raise TsdbError(f"run directory {path} does not exist; pass a folder written by `tsdb train` or "
                        "`tsdb forecast` (its run/)")
    shipped = not (path / "model.pt").exists() and (path / WEIGHTS_FILE).exists()
    if not (path / "model.pt").exists() and not shipped:
        raise TsdbError(f"{path} has no trained model (model.pt); run `tsdb train` first")
    ExperimentConfig.from_yaml(path / "config.yaml")
    if not shipped:   # (safetensors files are checked by their own loader: no code runs on load)
        intact(path / "model.pt", MODEL_FIX)
    return path


MODEL_FIX = "retrain the run (`tsdb train`) or restore model.pt from a backup"


def intact(f: Path, fix: str) -> None:
    """``f`` matches its sidecar checksum, or has none (older runs) and is at least a complete
    zip archive (what ``torch.save`` writes): a damaged file is reported before torch loads."""
    import zipfile
    if checksum.sidecar(f).exists():
        checksum.verify(f, fix)
    elif not zipfile.is_zipfile(f):
        raise TsdbError(f"{f} is not a complete torch file (truncated, or not written by tsdb); {fix}")


def run_files(path: str | Path) -> None:
    """Every checkpoint and weights file of a run directory (``tsdb train --out``) intact."""
    path = Path(path)
    if not path.is_dir():
        return
    for f in sorted([*path.rglob("*.ckpt"), *path.rglob("*.pt")]):
        intact(f, "delete it (and its .sha256) to restart that block from scratch" if f.suffix == ".ckpt" else
               f"delete {f.parent} to retrain that unit" if f.name == "weights.pt" else MODEL_FIX)


def model_dir(path: str | Path) -> Path:
    """An exported model (tsdb_model.json readable, a known format) or a run to export."""
    path = Path(path)
    meta_path = path / "tsdb_model.json"
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except (UnicodeDecodeError, ValueError) as e:
            raise TsdbError(f"{meta_path} is not valid JSON ({e}); re-export the model with `tsdb export RUN`") \
                from None
        if not isinstance(meta, dict) or meta.get("format") not in STREAM_FORMATS:
            raise TsdbError(f"{meta_path} is not tsdb export metadata (format "
                            f"{meta.get('format') if isinstance(meta, dict) else None!r}); re-export the model "
                            "with `tsdb export RUN`")
        return path
    if (path / "model.pt").exists() or (path / WEIGHTS_FILE).exists():
        return run_dir(path)
    if not path.is_dir():
        raise TsdbError(f"model directory {path} does not exist; pass the folder written by `tsdb export RUN`")
    raise TsdbError(f"{path} is neither an exported model (tsdb_model.json) nor a training run (model.pt); "
                    "run `tsdb export RUN_DIR` first")


def output_dir(path: str | Path, flag: str = "--out") -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TsdbError(f"{flag} {path} is a file; pass a folder")
    return path


# -- what a run was trained on --------------------------------------------------------------

def input_fingerprint(args) -> dict:
    """The user table and column flags of ``tsdb forecast`` / ``tsdb train --input``."""
    path = Path(args.input).expanduser().resolve()
    with open(path, "rb") as f:
        import hashlib
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"source": "input", "input": str(path), "sha256": digest, "item_id": args.item_id,
            "timestamp": args.timestamp, "target": args.target, "freq": args.freq,
            "covariates": getattr(args, "covariates", None) or None}


def record_training_data(run: Path, record: dict) -> None:
    """Write ``run/data.json`` (what the run trains on); refuse a run trained on other data."""
    path = Path(run) / DATA_FILE
    if path.exists():
        old = checksum.read_json(path, f"delete {run} to retrain")
        if not _same_data(old, record):
            raise TsdbError(f"{run} holds a run trained on other data ({_describe(old)}, not "
                            f"{_describe(record)}); pick a new --out directory or delete {run}")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    checksum.write_text(path, json.dumps(record, indent=2))


def _same_data(old, new: dict) -> bool:
    """Same data, wherever the file lies now (the path may differ, the content may not)."""
    return isinstance(old, dict) and {k: v for k, v in old.items() if k != "input"} == \
        {k: v for k, v in new.items() if k != "input"}


def _describe(record) -> str:
    if not isinstance(record, dict):
        return "unknown"
    return record.get("input") or f"dataset {record.get('dataset')}"


def check_reuse(run: Path, fingerprint: dict) -> None:
    """Refuse a ``tsdb forecast --out`` whose run/ holds a model trained on another input."""
    if not run.exists():
        return
    recorded = run / DATA_FILE
    if not recorded.exists():
        raise TsdbError(f"{run} holds a model of unknown input; choose a new --out, or pass --run {run} to "
                        "forecast with that model")
    old = checksum.read_json(recorded, f"delete {run} to retrain")
    if not isinstance(old, dict) or any(old.get(k) != v for k, v in fingerprint.items() if k != "input"):
        was = old.get("input") if isinstance(old, dict) else None
        raise TsdbError(f"{run} holds a model trained on other input ({was}); choose a new --out, or pass "
                        f"--run {run} to forecast with that model")


# -- per command ----------------------------------------------------------------------------

def _data_flags(args) -> None:
    if getattr(args, "input", None):
        if getattr(args, "dataset", None):
            raise TsdbError("pass either --dataset or --input, not both")
        cols = {"--item-id": args.item_id, "--timestamp": args.timestamp, "--target": args.target}
        for i, name in enumerate(c for c in (getattr(args, "covariates", None) or "").split(",") if c):
            cols[f"--covariates (#{i + 1})"] = name
        require_columns(args.input, cols)


def _forecast(args) -> None:
    if not args.input:
        raise TsdbError("tsdb forecast needs --input FILE (a long-format CSV or Parquet)")
    _data_flags(args)
    output_dir(args.out)
    if getattr(args, "pretrained", None):
        if args.run or getattr(args, "covariates", None):
            raise TsdbError("--pretrained starts from a pretrained model: drop --run and --covariates")
        if not Path(args.pretrained).is_dir():
            raise TsdbError(f"--pretrained {args.pretrained}: no such checkpoint folder (model.safetensors + "
                            "config.yaml, e.g. tsdb/data/pretrained/...)")
    elif args.run:
        run_dir(args.run)
    else:
        check_reuse(Path(args.out) / "run", input_fingerprint(args))


def _train(args) -> None:
    if args.config:
        from tsdb.config import ExperimentConfig
        ExperimentConfig.from_yaml(args.config)       # a file, or a packaged config's name
    _data_flags(args)
    output_dir(args.out)
    run_files(args.out)


def _stream(args) -> None:
    model_dir(args.model_dir)
    if args.input:
        existing_file(args.input, "--input")
    if args.state:
        state = Path(args.state)
        if state.exists() and not state.is_file():
            raise TsdbError(f"--state {state} is not a file")
        if not state.parent.is_dir():
            raise TsdbError(f"--state {state}: folder {state.parent} does not exist; create it first")




def bench_names() -> list[str]:
    """Every ``tsdb bench NAME``: the tiered configs (NAME-quick.yaml, ...) and the programs."""
    from tsdb.cli.bench import PROGRAMS   # (light: the programs import their modules when run)
    from tsdb.config import packaged
    tiered = {p.name.removesuffix(".yaml").rsplit("-", 1)[0] for p in packaged("configs", "bench").iterdir()
              if p.name.count("-") and p.name.endswith(".yaml")}
    return sorted(tiered | set(PROGRAMS))


def _bench(args) -> None:
    from tsdb.cli.bench import PROGRAMS
    from tsdb.config import packaged, resolve_config
    if args.config:
        resolve_config(args.config)
    elif (args.name not in PROGRAMS
          and not packaged("configs", "bench", f"{args.name}-{args.tier}.yaml").is_file()):
        raise TsdbError(f"no benchmark {args.name!r} at tier {args.tier!r}; known: {bench_names()}")


def _tune(args) -> None:
    from tsdb.bench.tune_spec import check as check_tune_spec
    check_tune_spec(args.config, args.trials)
    for flag in ("--out", "--runs"):
        if getattr(args, flag[2:]):
            output_dir(getattr(args, flag[2:]), flag)


def _resolve_config(path) -> None:
    from tsdb.config import resolve_config
    resolve_config(path)


CHECKS = {
    "forecast": _forecast,
    "train": _train,
    "evaluate": lambda a: run_dir(a.run),
    "export": lambda a: (run_dir(a.run), a.out and output_dir(a.out)),
    "assemble": lambda a: existing_file(Path(a.run) / "config.yaml", "run config"),
    "stream": _stream,
    "bench": _bench,
    "ablate": lambda a: _resolve_config(a.config),
    "tune": _tune,
}


def check(args) -> None:
    """Raise a one-line `TsdbError` if ``args`` (a parsed ``tsdb`` command line) cannot work."""
    CHECKS.get(args.command, lambda a: None)(args)
