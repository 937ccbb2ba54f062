"""Data parallelism: 2 processes (torchrun, gloo on CPU) under DDP and under FSDP2 reach the same
losses as one process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwenkit.train.metrics import read_metrics
from train_tiny import pretrain_sections, write_config

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def _run(config: Path, out: Path, nproc: int, mode: str) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = ["pretrain", "--config", str(config), "--out", str(out), "--set", f"run.distributed={mode}"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "qwenkit.cli", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "qwenkit.train.cli", *args]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "eval_loss" not in r]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    sections = pretrain_sections(tmp, max_steps=STEPS, checkpoint_every=0, eval_every=0)
    sections["run"].update(batch_size=4, micro_batch_size=2)
    config = write_config(tmp / "c.toml", sections)
    return tmp, config, _run(config, tmp / "single", 1, "ddp")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(setup, mode):
    tmp, config, single = setup
    losses = _run(config, tmp / mode, 2, mode)
    assert len(losses) == len(single) == STEPS
    assert single[-1] < single[0]
    for a, b in zip(losses, single):
        assert abs(a - b) < 1e-5, (losses, single)
