"""LoRA adapters over HTTP, with the official openai client on a real loopback server: `model`
picks an adapter, concurrent requests for the base model and two adapters each answer like that
adapter merged, /v1/models lists them, vLLM's load/unload routes (unloading an adapter in use is
deferred), errors name what is at fault; and `qwenkit serve --lora` as a subprocess."""

from __future__ import annotations

import threading

import pytest
import torch

import qwenkit
from qwenkit.engine import EngineSettings
from test_multi_lora import save_random_adapter
from test_server import VOCAB, Server, write_tokenizer
from test_server_cli import free_port, served_process
from tiny import make_checkpoint

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
PROMPT = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("base") / "tiny", "qwen2", vocab_size=VOCAB)
    write_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def adapter_dirs(ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"attn": save_random_adapter(ckpt, root / "attn", 4, ("q", "k", "v", "o"), 1),
            "mlp": save_random_adapter(ckpt, root / "mlp", 8, ("v", "gate", "up", "down"), 2)}


@pytest.fixture(scope="module")
def server(ckpt, adapter_dirs):
    model = qwenkit.load_model(ckpt, dtype=torch.float32)
    settings = EngineSettings(block_size=8, num_blocks=300, max_loras=3, max_lora_rank=8)
    s = Server(model, qwenkit.load_tokenizer(ckpt), settings, allow_runtime_lora=True)
    for name, path in adapter_dirs.items():
        s.engine.engine.adapters.load(name, path)
    yield s
    s.close()


def expected_text(ckpt, adapter, n: int) -> str:
    model = qwenkit.load_model(ckpt, dtype=torch.float32, adapter=adapter)
    return qwenkit.load_tokenizer(ckpt).decode(qwenkit.generate(model, PROMPT, n), skip_special_tokens=True)


def complete(server, model: str, n: int = 8):
    return server.client.completions.create(model=model, prompt=PROMPT, max_tokens=n, temperature=0)


def test_models_lists_adapters_under_the_base(server, adapter_dirs):
    cards = httpx.get(server.url + "/v1/models").json()["data"]
    assert [c["id"] for c in cards] == ["tiny", "attn", "mlp"]
    assert all(c["parent"] == "tiny" and c["root"] == str(adapter_dirs[c["id"]]) for c in cards[1:])


def test_concurrent_requests_each_answer_like_their_adapter_merged(server, ckpt, adapter_dirs):
    names = ["tiny", "attn", "mlp", "attn", "tiny", "mlp"]
    replies = [None] * len(names)

    def ask(i):
        replies[i] = complete(server, names[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, r in zip(names, replies):
        assert r.model == name
        assert r.choices[0].text == expected_text(ckpt, adapter_dirs.get(name), 8), name
    two = server.client.completions.create(model="mlp", prompt=PROMPT, max_tokens=8, temperature=0, n=2)
    assert [c.text for c in two.choices] == [expected_text(ckpt, adapter_dirs["mlp"], 8)] * 2


def test_unknown_model_is_a_404_naming_it(server):
    with pytest.raises(openai.NotFoundError, match="model 'atn' does not exist; this server has 'tiny', 'attn', 'mlp'"):
        complete(server, "atn")
    r = httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "atn"})
    assert r.status_code == 404 and "'atn'" in r.json()["error"]["message"]


def test_load_and_unload_routes(server, ckpt, adapter_dirs, tmp_path):
    url = server.url
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path)})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(f"lora_path: {tmp_path}: not a LoRA")
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "again", "lora_path": str(adapter_dirs["mlp"])})
    assert r.status_code == 200 and "again" in r.text
    assert complete(server, "again").choices[0].text == expected_text(ckpt, adapter_dirs["mlp"], 8)
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "more", "lora_path": str(adapter_dirs["attn"])})
    assert r.status_code == 400 and "all 3 LoRA adapter slots are taken" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": 5, "lora_path": "p"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "again"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        complete(server, "again")


def test_unloading_an_adapter_in_use_is_deferred(server, ckpt, adapter_dirs):
    httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "busy", "lora_path": str(adapter_dirs["attn"])})
    stream = server.client.completions.create(model="busy", prompt=PROMPT, max_tokens=24, temperature=0, stream=True)
    pieces = [next(iter(stream)).choices[0].text]
    r = httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "busy"})
    assert r.status_code == 200
    assert "busy" not in [m.id for m in server.client.models.list().data]
    pieces += [c.choices[0].text for c in stream if c.choices]
    assert "".join(pieces) == expected_text(ckpt, adapter_dirs["attn"], 24)
    server.wait_idle()
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "busy2", "lora_path": str(adapter_dirs["attn"])})
    assert r.status_code == 200  # the slot came back with the stream's end
    httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "busy2"})


def test_runtime_loading_is_off_by_default(ckpt, adapter_dirs):
    model = qwenkit.load_model(ckpt, dtype=torch.float32)
    s = Server(model, qwenkit.load_tokenizer(ckpt), EngineSettings(block_size=8, num_blocks=50, max_loras=1))
    try:
        r = httpx.post(s.url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(adapter_dirs["attn"])})
        assert r.status_code == 403 and "--allow-runtime-lora" in r.json()["error"]["message"]
    finally:
        s.close()


def test_serve_cli_with_lora_flags(ckpt, adapter_dirs):
    port = free_port()
    flags = ["--lora", f"attn={adapter_dirs['attn']}", "--max-lora-rank", "8", "--kv-cache-memory", "4MiB"]
    with served_process(ckpt, port, *flags) as banner:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny", "attn"]
        r = client.completions.create(model="attn", prompt=PROMPT, max_tokens=6, temperature=0)
        assert r.choices[0].text == expected_text(ckpt, adapter_dirs["attn"], 6)
    assert "LoRA: attn; 1 slot of rank <= 8" in banner


@pytest.mark.parametrize("flags, message", [
    (["--lora", "attn"], "--lora attn: want NAME=DIR"),
    (["--lora", "a=/nonexistent"], "--lora a=/nonexistent: /nonexistent holds no adapter_config.json"),
    (["--lora", "a=ADAPTER", "--max-lora-rank", "2"], "has rank 4; this engine holds ranks up to 2"),
])
def test_serve_cli_lora_flag_errors_are_one_line(ckpt, adapter_dirs, flags, message):
    import subprocess
    import sys

    flags = [f.replace("ADAPTER", str(adapter_dirs["attn"])) for f in flags]
    cmd = [sys.executable, "-m", "qwenkit.cli", "serve", "--model", str(ckpt), "--port", str(free_port()),
           "--dtype", "float32", *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr
