"""`qwenkit serve` as a user runs it: a subprocess on a tiny checkpoint directory, a free
loopback port, an API key; the official openai client talks to it."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time

import pytest

from test_server import VOCAB, write_tokenizer
from tiny import make_checkpoint

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("transformers")
pytest.importorskip("uvicorn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    except httpx.TransportError:
        return False


@contextlib.contextmanager
def served_process(ckpt, port: int, *flags: str):
    """`python -m qwenkit.cli serve` on ckpt until the block ends; yields the banner it printed."""
    cmd = [sys.executable, "-m", "qwenkit.cli", "serve", "--model", str(ckpt), "--port", str(port),
           "--dtype", "float32", "--threads", "1", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    banner = []
    try:
        deadline = time.time() + 120
        while not any("serving on" in line for line in banner):
            line = proc.stdout.readline()
            assert line and time.time() < deadline, "server exited or hung:\n" + "".join(banner)
            banner.append(line)
        while not _healthy(port):  # the banner comes just before uvicorn binds the port
            assert proc.poll() is None and time.time() < deadline, "server exited or hung:\n" + "".join(banner)
            time.sleep(0.05)
        yield "".join(banner)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-qwen", vocab_size=VOCAB, hidden_size=32,
                           intermediate_size=64, num_hidden_layers=2, eos_token_id=258)
    write_tokenizer(ckpt)
    port = free_port()
    with served_process(ckpt, port, "--api-key", "s3cret", "--kv-cache-memory", "1MiB") as banner:
        yield f"http://127.0.0.1:{port}", banner


def test_banner_reports_kv_capacity(served):
    _, banner = served
    # 1 MiB / (2 x 2 layers x 16 slots x 2 kv heads x 8 dims x 4 bytes) = 256 blocks of 16 tokens
    assert "256 blocks x 16 = 4096 tokens of context" in banner


def test_api_key_is_required(served):
    url, _ = served
    assert httpx.get(url + "/v1/models").status_code == 401
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_chat_and_completion_with_the_key(served):
    url, _ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny-qwen"]
    r = client.chat.completions.create(model="tiny-qwen", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert r.usage.completion_tokens <= 5 and r.choices[0].finish_reason in ("stop", "length")
    c = client.completions.create(model="tiny-qwen", prompt="ab", max_tokens=3, temperature=0)
    assert c.usage.completion_tokens <= 3


def test_binds_to_loopback_by_default():
    from qwenkit.server.command import parser

    assert parser("qwenkit serve").parse_args([]).host == "127.0.0.1"
