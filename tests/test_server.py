"""The HTTP server, started for real (uvicorn in a thread, a free loopback port) and driven with
the official `openai` client: chat, completions, streaming, tool calls, reasoning, errors,
client disconnects. The model is tiny and random; tool calls and reasoning come from a model
that follows a script after one known prompt."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

import qwenkit
from qwenkit.engine import Engine, EngineSettings
from qwenkit.engine.async_engine import AsyncEngine
from qwenkit.model.qwen import QwenForCausalLM
from qwenkit.server import metrics
from test_engine import tiny_model

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

DATA = Path(__file__).parent / "data" / "tokenizer"
ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<think>", "</think>",
         "<tool_response>", "</tool_response>"]
SPECIAL = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
VOCAB = 272  # 256 bytes + added tokens, rounded up
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
THINK_ASK = [{"role": "user", "content": "Is it sunny?"}]
TOOL_REPLY = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
THINK_REPLY = "<think>\nThe sky is clear.\n</think>\n\nYes, it is sunny."


def write_tokenizer(root: Path) -> Path:
    """A byte-level Qwen-style tokenizer (no merges) with Qwen3's chat template."""
    from qwenkit.tokenizer.bpe import build_backend, spell_bytes

    vocab = {spell_bytes(bytes([b])): b for b in range(256)}
    backend = build_backend(vocab, [], [(t, 256 + i, t in SPECIAL) for i, t in enumerate(ADDED)])
    root.mkdir(parents=True, exist_ok=True)
    backend.save(str(root / "tokenizer.json"))
    template = json.loads((DATA / "qwen3_tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    config = {"chat_template": template, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": [258, 256]}))
    return root


class ScriptedQwen(QwenForCausalLM):
    """A Qwen model that, after a prompt of length L in `scripts`, must produce scripts[L]."""
    scripts: dict[int, list[int]] = {}

    def forward(self, input_ids, attention_mask=None, *, cache=None, logits_to_keep=0):
        if cache is None:
            return super().forward(input_ids, attention_mask, logits_to_keep=logits_to_keep)
        positions, _ = cache.begin(attention_mask, input_ids.shape[1])  # asked before the call stores anything
        logits = super().forward(input_ids, attention_mask, cache=cache, logits_to_keep=logits_to_keep)
        for (b, t), pos in zip(torch.cartesian_prod(*map(torch.arange, logits.shape[:2])).tolist(),
                               positions[:, -logits.shape[1]:].flatten().tolist()):
            for length, script in self.scripts.items():
                if 0 <= pos + 1 - length < len(script):
                    logits[b, t] = -1e4
                    logits[b, t, script[pos + 1 - length]] = 1e4
        return logits


class Server:
    """uvicorn in a thread on a free loopback port, over an AsyncEngine."""

    def __init__(self, model, tokenizer, settings: EngineSettings, name: str = "tiny", api_key=None, **app_options):
        from qwenkit.server.app import build_app

        self.engine = AsyncEngine(Engine(model, settings, tokenizer)).start()
        app = build_app(self.engine, tokenizer, name, api_key, **app_options)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key or "none", max_retries=0, timeout=60)

    def metrics(self) -> dict[str, float]:
        return metrics.parse(httpx.get(self.url + "/metrics").text)

    def wait_idle(self, timeout: float = 20) -> dict[str, float]:
        deadline = time.time() + timeout
        while True:
            m = self.metrics()
            if m["qwenkit_kv_blocks_used"] == 0 and m["qwenkit_requests_running"] == 0 or time.time() > deadline:
                return m
            time.sleep(0.05)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.shutdown()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return qwenkit.load_tokenizer(write_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def model():
    m = tiny_model(vocab_size=VOCAB, max_position_embeddings=2048)
    m.eos_token_ids = [258, 256]
    return m


@pytest.fixture(scope="module")
def server(model, tokenizer):
    s = Server(model, tokenizer, EngineSettings(block_size=8, num_blocks=600, max_prefill_tokens=256))
    yield s
    s.close()


def scripted_model(tokenizer) -> ScriptedQwen:
    """A model that answers TOOL_ASK (with WEATHER) by TOOL_REPLY and THINK_ASK by THINK_REPLY."""
    m = tiny_model(vocab_size=VOCAB, max_position_embeddings=2048, seed=1)
    m.__class__ = ScriptedQwen
    m.eos_token_ids = [258, 256]
    m.scripts = {}
    for messages, tools, reply in ((TOOL_ASK, WEATHER, TOOL_REPLY), (THINK_ASK, None, THINK_REPLY)):
        prompt = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True)
        m.scripts[len(prompt)] = tokenizer.encode(reply) + [258]
    assert len(m.scripts) == 2
    return m


@pytest.fixture(scope="module")
def scripted(tokenizer):
    s = Server(scripted_model(tokenizer), tokenizer, EngineSettings(block_size=8, num_blocks=600))
    yield s
    s.close()


def reference(model, tokenizer, prompt_ids, n) -> str:
    return tokenizer.decode(qwenkit.generate(model, prompt_ids, n), skip_special_tokens=True)


def test_health_and_models(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert [m.id for m in server.client.models.list().data] == ["tiny"]


def test_chat_greedy_matches_generate(server, model, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello <|im_end|> there"}]
    r = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    prompt = tokenizer.apply_chat_template(messages, tokenize=True)
    assert prompt.count(258) == 2  # the user's "<|im_end|>" stayed text
    assert r.choices[0].message.content == reference(model, tokenizer, prompt, 12)
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens <= 12
    assert r.choices[0].finish_reason in ("stop", "length")


def test_streamed_chat_joins_to_the_whole_reply(server):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Count"}], max_tokens=20, temperature=0)
    whole = server.client.chat.completions.create(**kw)
    chunks = list(server.client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_completion_text_stream_and_logprobs(server, model, tokenizer):
    r = server.client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=10, temperature=0,
                                         logprobs=3)
    assert r.choices[0].text == reference(model, tokenizer, tokenizer.encode("def add(a, b):"), 10)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == r.usage.completion_tokens and all(len(t) <= 3 for t in lp.top_logprobs)
    streamed = server.client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=10,
                                                temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_stop_strings_and_seeded_sampling(server):
    base = dict(model="tiny", prompt=[1, 2, 3], max_tokens=24, temperature=0)
    full = server.client.completions.create(**base).choices[0].text
    stop = full[5:7]
    cut = server.client.completions.create(**base, stop=[stop]).choices[0]
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"
    seeded = dict(base, temperature=1.0, top_p=0.9, seed=7)
    a, b = (server.client.completions.create(**seeded).choices[0].text for _ in range(2))
    assert a == b


def test_tool_calls_streamed_and_whole_parse_the_same(scripted):
    kw = dict(model="tiny", messages=TOOL_ASK, tools=WEATHER, max_tokens=100, temperature=0)
    whole = scripted.client.chat.completions.create(**kw)
    msg = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls" and not msg.content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == \
           [("get_weather", {"city": "Paris"})]
    chunks = list(scripted.client.chat.completions.create(**kw, stream=True))
    calls = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert [(t.index, t.function.name, json.loads(t.function.arguments)) for t in calls] == \
           [(0, "get_weather", {"city": "Paris"})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_reasoning_content_whole_and_streamed(scripted):
    kw = dict(model="tiny", messages=THINK_ASK, max_tokens=100, temperature=0)
    msg = scripted.client.chat.completions.create(**kw).choices[0].message
    assert msg.reasoning_content == "The sky is clear." and msg.content == "Yes, it is sunny."
    chunks = list(scripted.client.chat.completions.create(**kw, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "The sky is clear."
    assert "".join(d.content or "" for d in deltas) == "Yes, it is sunny."


@pytest.mark.parametrize("body,status", [
    (b'{"model": "tiny", "messages": [', 400),
    (json.dumps({"model": "tiny", "messages": "hi"}).encode(), 400),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}).encode(), 400),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}).encode(), 400),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 3000}]}).encode(), 400),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": -1}).encode(), 400),
    (json.dumps({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400),
    (json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}).encode(), 404),
])
def test_bad_requests_get_openai_errors_and_server_keeps_serving(server, body, status):
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) >= {"message", "type"}
    ok = server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert ok.choices[0].message is not None


def test_client_errors_through_the_openai_package(server):
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        server.client.completions.create(model="tiny", prompt=[5] * 2100, max_tokens=1)


def test_disconnect_mid_stream_frees_blocks(server):
    before = server.wait_idle()
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 1000, "stream": True,
            "temperature": 1.0, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert server.metrics()["qwenkit_kv_blocks_used"] > 0
    after = server.wait_idle()
    assert after["qwenkit_kv_blocks_used"] == 0 and after["qwenkit_kv_blocks_free"] == before["qwenkit_kv_blocks_free"]
    assert after["qwenkit_requests_aborted_total"] == before["qwenkit_requests_aborted_total"] + 1


def test_disconnect_while_waiting_for_a_whole_reply_frees_blocks(server):
    before = server.wait_idle()
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 1500, "temperature": 1.0, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.5)
    after = server.wait_idle()
    assert after["qwenkit_kv_blocks_used"] == 0
    assert after["qwenkit_requests_aborted_total"] == before["qwenkit_requests_aborted_total"] + 1
