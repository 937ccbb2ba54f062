"""Checkpoints: a run killed with SIGKILL and resumed logs the same per-step losses as an
uninterrupted run (exactly, on CPU); a checkpoint of another model shape is refused."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwenkit.errors import CheckpointError
from qwenkit.train.metrics import read_metrics
from train_tiny import pretrain_sections, write_config

ROOT = Path(__file__).resolve().parents[1]


def _cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qwenkit.cli", "train", "pretrain", "--config", str(config), *extra]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "eval_loss" not in r}


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    steps = 40
    sections = pretrain_sections(tmp_path, max_steps=steps, checkpoint_every=5, eval_every=20, log_every=1)
    config = write_config(tmp_path / "c.toml", sections)
    full = tmp_path / "full"
    subprocess.run(_cmd(config, "--out", str(full)), check=True, env=_env(), capture_output=True, cwd=ROOT)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(config, "--out", str(killed)), env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and max(_losses(killed), default=0) < 12:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reached = max(_losses(killed), default=0)
    assert 12 <= reached < steps, "the run should be killed mid-way"
    subprocess.run(_cmd(config, "--out", str(killed), "--resume", "auto"), check=True, env=_env(),
                   capture_output=True, cwd=ROOT)
    assert _losses(killed) == _losses(full)
    assert len(_losses(full)) == steps


def test_resume_from_another_model_shape_fails_clearly(tmp_path):
    from qwenkit.train.cli import main

    config = write_config(tmp_path / "c.toml", pretrain_sections(tmp_path, max_steps=2, checkpoint_every=2))
    assert main(["pretrain", "--config", str(config)]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002.pt"
    assert ckpt.is_file() and not list(ckpt.parent.glob("*.tmp"))
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    _assert_same_logits_as_transformers(tmp_path / "hf")
    wider = pretrain_sections(tmp_path, max_steps=4)
    wider["model.config"]["hidden_size"] = 48
    write_config(tmp_path / "wide.toml", wider)
    with pytest.raises(CheckpointError, match=r"another shape: hidden_size=32 \(this run: 48\)"):
        main(["pretrain", "--config", str(tmp_path / "wide.toml"), "--out", str(tmp_path / "w"),
              "--resume", str(ckpt)])


def test_lora_run_resumes_from_adapter_only_checkpoint(tmp_path):
    from qwenkit.train.cli import main
    from train_tiny import write_sft

    sections = pretrain_sections(tmp_path, max_steps=4, checkpoint_every=2, eval_every=0)
    sections["data"].update(train=str(write_sft(tmp_path / "sft.jsonl")), seq_len=48)
    sections["lora"] = {"enabled": True, "r": 2, "dropout": 0.2}
    config = write_config(tmp_path / "c.toml", sections)
    assert main(["sft", "--config", str(config), "--out", str(tmp_path / "a")]) == 0
    ckpt = tmp_path / "a" / "checkpoints" / "step-00000002.pt"
    import torch

    saved = torch.load(ckpt, weights_only=False)["model"]
    assert saved and all(".lora." in k for k in saved)  # frozen base weights are not copied
    assert main(["sft", "--config", str(config), "--out", str(tmp_path / "b"), "--resume", str(ckpt)]) == 0
    assert _losses(tmp_path / "b") == {k: v for k, v in _losses(tmp_path / "a").items() if k > 2}


def _assert_same_logits_as_transformers(path: Path) -> None:
    import torch

    import qwenkit
    from tiny import load_reference

    ours = qwenkit.load_model(path, dtype=torch.float32)
    ids = torch.randint(0, ours.config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(load_reference(path)(input_ids=ids).logits, ours(ids), atol=1e-5, rtol=1e-5)
