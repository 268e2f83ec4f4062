"""Faults: `tsdb train` killed (SIGKILL), stopped (SIGTERM, SIGINT) and resumed equals an
uninterrupted run bit for bit; `tsdb stream` killed and resumed from --state loses and repeats
no update; truncated and bit-flipped checkpoints, weights and state files are one line.

The training runs pause at a chosen step (a Lightning callback added by the wrapper script
below, outside tsdb) and write a marker file; the test signals them once the marker exists,
so nothing depends on timing."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from tsdb.cli.main import main
from tsdb.config import ExperimentConfig
from tsdb.data.readers import read_long
from tsdb.errors import TsdbError
from tsdb.cli.stream import run_stream
from tsdb.training.loop import load_model, train_model

from conftest import ndjson, records

STEPS, PAUSE_AT, EVERY = 40, 25, 10   # checkpoints every 10 steps: a kill at 25 resumes from 20
CONFIG = {"model": dict(context_length=32, horizon=8, patch_length=8, d_model=16, n_heads=2, n_layers=2,
                        n_blocks=2, num_steps=4),
          "train": dict(steps_per_block=STEPS, batch_size=8, warmup_steps=5)}

# `tsdb train` with a callback that, the first time a block reaches step PAUSE_AT, writes the
# marker and waits for a signal (SIGKILL ends it there; SIGTERM/SIGINT are seen by tsdb's handlers)
PAUSING_TSDB = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from lightning.pytorch.callbacks import Callback
    import tsdb.training.loop
    from tsdb.signals import received

    step, marker = int(os.environ["PAUSE_AT"]), Path(os.environ["PAUSE_MARKER"])

    class Pause(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == step and not marker.exists():
                marker.write_text(str(step))
                while received() is None and not trainer.received_sigterm:
                    time.sleep(0.02)

    make = tsdb.training.loop._trainer
    def with_pause(*args, **kwargs):
        trainer = make(*args, **kwargs)
        trainer.callbacks.insert(0, Pause())
        return trainer
    tsdb.training.loop._trainer = with_pause
    from tsdb.cli.main import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Config, data and the weights of an uninterrupted run."""
    tmp = tmp_path_factory.mktemp("faults")
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(CONFIG))
    t = np.arange(300)
    pd.DataFrame({"ts": pd.date_range("2024-01-01", periods=300, freq="h"),
                  "y": 10 + np.sin(t / 5) + 0.1 * np.random.default_rng(0).normal(size=300)}
                 ).to_csv(tmp / "data.csv", index=False)
    (tmp / "pausing.py").write_text(PAUSING_TSDB)
    cfg = ExperimentConfig.from_yaml(tmp / "cfg.yaml").with_overrides(train={"progress": False})
    data = read_long(tmp / "data.csv", item_id=None, timestamp="ts", target="y", freq="h")
    model, _ = train_model(cfg, data, tmp / "reference")
    return tmp, model.state_dict()


def train_argv(tmp, out):
    return ["train", "--config", str(tmp / "cfg.yaml"), "--input", str(tmp / "data.csv"), "--timestamp", "ts",
            "--target", "y", "--freq", "h", "--out", str(tmp / out), "--no-progress", "--threads", "1"]


def start_paused(tmp, out, marker):
    env = {**os.environ, "PAUSE_AT": str(PAUSE_AT), "PAUSE_MARKER": str(marker)}
    return subprocess.Popen([sys.executable, str(tmp / "pausing.py"), *train_argv(tmp, out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def signal_at_marker(proc, marker, sig) -> tuple[int, str]:
    """Wait until the paused run wrote ``marker``, send ``sig``; its exit code and stderr."""
    while not marker.exists():
        try:
            proc.wait(0.05)
        except subprocess.TimeoutExpired:
            continue
        raise AssertionError(proc.communicate())
    proc.send_signal(sig)
    return proc.wait(), proc.communicate()[1]


def ckpt_step(path):
    return torch.load(path, weights_only=True, map_location="cpu")["global_step"]


def check_stopped(tmp, name, rc, err, sig, code, unit):
    """Exit 128 + signal, one line naming the step and the resume command, a checkpoint there."""
    assert rc == code, err
    [line] = err.strip().splitlines()
    assert line.startswith(f"tsdb: stopped by {sig} at {unit} step {PAUSE_AT}: checkpoint saved to "), line
    assert line.endswith(f"resume with: tsdb {' '.join(train_argv(tmp, name))}"), line
    assert ckpt_step(tmp / name / "units" / unit / "last.ckpt") == PAUSE_AT
    assert not (tmp / name / "model.pt").exists()


def test_killed_and_stopped_training_resumes_to_the_uninterrupted_weights(setup):
    tmp, reference = setup
    # SIGKILL and SIGTERM at step 25 of block 0 (two runs at once)
    kill = start_paused(tmp, "kill", tmp / "kill.marker")
    term = start_paused(tmp, "term", tmp / "term.marker")
    rc, _ = signal_at_marker(kill, tmp / "kill.marker", signal.SIGKILL)
    # nothing saved at a kill: the last periodic checkpoint (step 20) remains
    assert rc == -signal.SIGKILL
    assert ckpt_step(tmp / "kill" / "units" / "block-0" / "last.ckpt") == PAUSE_AT // EVERY * EVERY
    check_stopped(tmp, "term", *signal_at_marker(term, tmp / "term.marker", signal.SIGTERM), "SIGTERM", 143,
                  "block-0")
    # the stream position is part of the checkpoint
    assert torch.load(tmp / "term" / "units" / "block-0" / "last.ckpt", weights_only=True)["tsdb_data"] == {
        "windows_consumed": PAUSE_AT * CONFIG["train"]["batch_size"], "seed": 0}
    # resume the SIGTERM run with the same command; Ctrl-C (SIGINT) at step 25 of block 1
    resumed = start_paused(tmp, "term", tmp / "int.marker")
    check_stopped(tmp, "term", *signal_at_marker(resumed, tmp / "int.marker", signal.SIGINT), "SIGINT", 130,
                  "block-1")
    # resume both to the end (the same code as `tsdb train`, in this process) and compare every weight
    cfg = ExperimentConfig.from_yaml(tmp / "cfg.yaml").with_overrides(train={"progress": False})
    data = read_long(tmp / "data.csv", item_id=None, timestamp="ts", target="y", freq="h")
    for name in ("kill", "term"):
        train_model(cfg, data, tmp / name)
        state = torch.load(tmp / name / "model.pt", weights_only=True)
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference), name


def flip(path, start=600, n=400):
    raw = bytearray(path.read_bytes())
    for i in range(start, min(start + n, len(raw))):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def one_error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tsdb: error: "), err
    return err[0]


@pytest.mark.parametrize("damage", [flip, truncate])
def test_damaged_checkpoint_or_weights_is_one_line(setup, tmp_path, capsys, damage):
    tmp, _ = setup
    run = tmp_path / "run"
    shutil.copytree(tmp / "reference", run)
    args = train_argv(tmp, "unused")
    args[args.index("--out") + 1] = str(run)
    for name in ("units/block-1/last.ckpt", "units/block-0/weights.pt", "model.pt"):
        target = run / name
        backup = target.read_bytes()
        damage(target)
        line = one_error_line(capsys, args)
        assert str(target) in line and "corrupt" in line, line
        target.write_bytes(backup)
    # without the sidecar a truncated file is still caught (not a complete torch zip)
    damage(run / "model.pt")
    (run / "model.pt.sha256").unlink()
    if damage is truncate:
        assert "not a complete torch file" in one_error_line(capsys, ["evaluate", str(run)])
    else:  # a flip inside the zip's data: only the checksum could tell; loading must not crash
        try:
            load_model(run)
        except TsdbError as e:
            assert "model.pt" in str(e)


# ---------------------------------------------------------------------------------------
# tsdb stream
# ---------------------------------------------------------------------------------------

def stream_lines(model_dir, recs, **kw):
    out = io.StringIO()
    run_stream(model_dir, io.StringIO(ndjson(recs)), out, num_samples=8, **kw)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def stream_command(model_dir, state, every: int) -> list[str]:
    return [sys.executable, "-m", "tsdb.cli", "stream", str(model_dir), "--state", str(state),
            "--checkpoint-every", str(every), "--num-samples", "8", "--threads", "1"]


def stream_answers(cmd, recs, answered: int):
    """Start ``tsdb stream``, send ``recs`` (stdin stays open) and read ``answered`` output lines."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdin.write(ndjson(recs))
    proc.stdin.flush()
    return proc, [json.loads(proc.stdout.readline()) for _ in range(answered)]


def test_stream_killed_and_resumed_loses_and_repeats_no_update(tiny_run, tmp_path):
    model_dir = tiny_run / "onnx"
    recs = records(40, items=("a", "b", "c"))
    full = stream_lines(model_dir, recs)
    state = tmp_path / "state.npz"
    cmd = stream_command(model_dir, state, 7)
    proc, first = stream_answers(cmd, recs[:60], 50)   # 50 answered, 10 more sent
    proc.kill()
    proc.wait()
    assert state.exists()
    # restart and replay the whole input: applied records come back as duplicates
    second = subprocess.run(cmd, input=ndjson(recs), capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    second = [json.loads(line) for line in second.stdout.splitlines()]
    assert len(second) == len(recs)
    fresh = [r for r in second if "error" not in r]
    skipped = [r["error"] for r in second if "error" in r]
    assert all("duplicate" in e or "out-of-order" in e for e in skipped)   # already applied before the kill
    assert 0 < len(fresh) < len(recs) - 40    # the kill came after a checkpoint, before the end
    # every record applied exactly once: the records after the last checkpoint are applied again
    # from the restored state, so the resumed stream's forecasts are an uninterrupted stream's, and
    # those made both before the kill and after it are identical
    assert fresh == full[len(full) - len(fresh):]
    assert first == full[:50]
    assert {(r["item_id"], r["observations"]) for r in fresh[-3:]} == {("a", 40), ("b", 40), ("c", 40)}


@pytest.mark.parametrize("damage", [flip, truncate])
def test_damaged_stream_state_is_one_line(tiny_run, tmp_path, capsys, damage):
    model_dir = tiny_run / "onnx"
    state = tmp_path / "state.npz"
    stream_lines(model_dir, records(10), state_path=state)
    damage(state)
    inp = tmp_path / "in.ndjson"
    inp.write_text(ndjson(records(12)[-2:]))
    line = one_error_line(capsys, ["stream", str(model_dir), "--input", str(inp), "--state", str(state)])
    assert str(state) in line and "delete" in line


def test_stream_sigterm_saves_the_state_and_exits_143(tiny_run, tmp_path):
    model_dir = tiny_run / "onnx"
    recs = records(20)
    state = tmp_path / "state.npz"
    proc, first = stream_answers(stream_command(model_dir, state, 1000), recs[:15], 15)   # stdin still open
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 143
    assert proc.stderr.read().strip().startswith("tsdb: stopped by SIGTERM")
    # the state holds all 15 records although no periodic checkpoint was due: the rest follows on
    rest = stream_lines(model_dir, recs[15:], state_path=state)
    assert first + rest == stream_lines(model_dir, recs)


def test_sigterm_outside_training_stops_a_bench_without_partial_results(tmp_path):
    """`tsdb bench` between trainings (here the error-path benchmark, which imports no torch)."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "tsdb.cli", "bench", "errors", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children = f"/proc/{proc.pid}/task/{proc.pid}/children"
    while proc.poll() is None and not open(children).read().strip():   # its first case is running
        try:
            proc.wait(0.05)
        except subprocess.TimeoutExpired:
            pass
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 143
    [line] = proc.stderr.read().strip().splitlines()
    assert line == f"tsdb: stopped by SIGTERM; resume with: tsdb bench errors --out {out}"
    assert not (out / "results.json").exists()
