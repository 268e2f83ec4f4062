"""Block-parallel training, single-block jobs, assembly, and DDP within a block (gloo, CPU)."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

CFG = {"model": {"context_length": 32, "horizon": 16, "patch_length": 8, "d_model": 16, "n_heads": 2,
                 "n_layers": 2, "n_blocks": 2},
       "train": {"steps_per_block": 6, "batch_size": 8, "warmup_steps": 1, "accelerator": "cpu"}}


def tsdb(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "tsdb.cli.main", *args], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


@pytest.fixture()
def setup(tmp_path):
    t = np.arange(300)
    df = pd.DataFrame({"id": np.repeat(["a", "b"], 300),
                       "ts": np.tile(pd.date_range("2024-01-01", periods=300, freq="h"), 2),
                       "y": np.concatenate([np.sin(t / 4), np.cos(t / 6)])})
    df.to_csv(tmp_path / "data.csv", index=False)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(CFG))
    data = ["--input", str(tmp_path / "data.csv"), "--item-id", "id", "--timestamp", "ts", "--target", "y",
            "--freq", "h", "--no-progress"]
    return tmp_path, data


def weights(run, block):
    return torch.load(run / "units" / f"block-{block}" / "weights.pt", weights_only=True)


def test_ddp_two_processes_match_one_process(setup):
    tmp, data = setup
    tsdb("train", "--config", str(tmp / "cfg.yaml"), "--out", str(tmp / "single"), "--block", "0", *data)
    tsdb("train", "--config", str(tmp / "cfg.yaml"), "--out", str(tmp / "ddp"), "--block", "0", "--ddp", "2", *data)
    single, ddp = weights(tmp / "single", 0), weights(tmp / "ddp", 0)
    diffs = [float((single[k] - ddp[k]).abs().max()) for k in single]
    assert max(diffs) < 1e-4, max(diffs)
    # and training did move the weights (the zero-initialised output layer)
    assert single["out.weight"].abs().max() > 0


def test_blocks_as_separate_jobs_then_assemble(setup):
    tmp, data = setup
    run = tmp / "jobs"
    tsdb("train", "--config", str(tmp / "cfg.yaml"), "--out", str(run), "--block", "1", *data)
    assert not (run / "model.pt").exists()
    proc = tsdb("assemble", str(run), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"tsdb: error: {run}: units ['block-0'] are not finished; "
                                   f"run `tsdb train --block K` for each")
    tsdb("train", "--config", str(tmp / "cfg.yaml"), "--out", str(run), "--block", "0", *data)
    assert (run / "model.pt").exists()  # the last job assembles
    tsdb("assemble", str(run))


def test_parallel_workers_equal_sequential(setup):
    tmp, data = setup
    tsdb("train", "--config", str(tmp / "cfg.yaml"), "--out", str(tmp / "seq"), *data)
    tsdb("train", "--config", str(tmp / "cfg.yaml"), "--out", str(tmp / "par"), "--devices", "2", *data)
    a = torch.load(tmp / "seq" / "model.pt", weights_only=True)
    b = torch.load(tmp / "par" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
