"""The CLI on a hybrid checkpoint: `generate` and `chat` run it (static cache, speculation too),
`serve` refuses what it cannot run in one line, as real subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hybrid_tiny import make_hybrid
from test_server import VOCAB, write_tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = make_hybrid(tmp_path_factory.mktemp("h") / "tiny-hybrid", "qwen3_5_text", vocab_size=VOCAB)
    write_tokenizer(path)
    return path


def _qwenkit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwenkit.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_generate_and_chat_run_a_hybrid(ckpt):
    out = _qwenkit("generate", "--model", str(ckpt), "--prompt", "hello", "--max-new-tokens", "6")
    assert out.returncode == 0, out.stderr
    chat = _qwenkit("chat", "--model", str(ckpt), "--message", "hi", "--max-new-tokens", "6")
    assert chat.returncode == 0, chat.stderr


def test_serve_refuses_deterministic_mode_on_a_hybrid_in_one_line(ckpt):
    out = _qwenkit("serve", "--model", str(ckpt), "--port", "0", "--deterministic")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "does not run deterministic mode" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_speculative_generate_on_a_hybrid_prints_what_plain_decoding_prints(ckpt):
    common = ["generate", "--model", str(ckpt), "--dtype", "float32", "--prompt", "abcabcabcabc",
              "--max-new-tokens", "12"]
    plain, spec = _qwenkit(*common), _qwenkit(*common, "--speculative", "ngram")
    assert plain.returncode == spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout
