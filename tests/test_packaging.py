"""A plain (non-editable) install works: configs and dataset cards ship inside the wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # build from a copy: setuptools writes build/ and *.egg-info into the source tree
    src = tmp_path_factory.mktemp("src") / "tsdb"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "reports", "build", "dist",
                                                             "__pycache__", "*.egg-info", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(src)],
                   check=True, capture_output=True, text=True)
    (whl,) = out.glob("tsdb-*.whl")
    return whl


def test_the_wheel_ships_configs_and_dataset_cards(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "tsdb/configs/demo.yaml" in names and "tsdb/configs/bench/m4-hourly-quick.yaml" in names
    assert "tsdb/data/cards/vic_elec.yaml" in names and "tsdb/data/cards/m4_hourly.yaml" in names
    assert not any(n.startswith(("tests/", "reports/", "streaming/")) for n in names)


@pytest.mark.slow
def test_installed_wheel_lists_datasets_and_trains(wheel, tmp_path):
    """A fresh venv, `pip install tsdb-*.whl` (dependencies from the package index or its cache),
    then `tsdb datasets` and a tiny `tsdb train` run from a directory outside the checkout."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "torch==2.13.0", str(wheel)], check=True,
                   capture_output=True, text=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    tsdb = [str(venv / "bin" / "tsdb")]
    shown = subprocess.run(tsdb + ["datasets"], cwd=work, env=env, capture_output=True, text=True, check=True)
    assert "vic_elec" in shown.stdout and "m4_hourly" in shown.stdout
    where = subprocess.run([str(py), "-c", "import tsdb; print(tsdb.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert str(venv) in where  # the installed copy, not the checkout
    (work / "tiny.yaml").write_text(
        "model: {strategy: depth, context_length: 48, horizon: 16, patch_length: 8, d_model: 16, n_heads: 2,\n"
        "        n_layers: 2, n_blocks: 2, num_steps: 4}\n"
        "train: {steps_per_block: 3, batch_size: 8, progress: false}\n"
        "data: {dataset: vic_elec}\n")
    trained = subprocess.run(tsdb + ["train", "--config", "tiny.yaml", "--out", "run"], cwd=work, env=env,
                             capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert (work / "run" / "model.pt").exists()
    # a packaged config resolves by its documented name from any directory
    bad = subprocess.run(tsdb + ["train", "--config", "configs/nope.yaml", "--out", "x"], cwd=work, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "configs/demo.yaml" in bad.stderr
