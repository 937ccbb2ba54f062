"""A hostile client against the real server (uvicorn on loopback, httpx and the official openai
client): every malformed body gets a JSON 4xx naming the field, never a 500; types are strict;
the Authorization scheme follows RFC 7235; bodies over --max-request-bytes get 413; a long prompt
is tokenized off the event loop; a request that fails inside an engine step fails alone."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

import qwenkit
from qwenkit.engine import Engine, EngineSettings, SamplingParams
from qwenkit.model.qwen import QwenForCausalLM
from test_engine import tiny_model
from test_server import VOCAB, WEATHER, Server, model, server, tokenizer  # noqa: F401  (fixtures)

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

POISON = 7  # a token id whose presence in a model call makes PoisonQwen fail that call
USER = [{"role": "user", "content": "x"}]


def deep(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def chat(**fields) -> bytes:
    return json.dumps({"model": "tiny", "messages": USER, "max_tokens": 2, **fields}).encode()


def assistant(**fields) -> bytes:
    return chat(messages=[{"role": "assistant", "content": "", **fields}, *USER])


# (route, raw body, what the error message must name)
MALFORMED = [
    ("chat/completions", b"", "body"),
    ("chat/completions", b"not json", "body"),
    ("chat/completions", b"[1, 2]", "body"),
    ("chat/completions", b'{"model": "tiny", "messages": [', "body"),
    ("chat/completions", b'{"model": "tiny", "messages": [}', "body: not valid JSON at character 31"),
    ("chat/completions", b"[" * 100_000, "body"),
    ("chat/completions", b'\xff\xfe{"model": "tiny"}', "body"),
    ("chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": Infinity}',
     "temperature"),
    ("chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_p": NaN}', "top_p"),
    ("chat/completions", json.dumps({"model": 5, "messages": USER}).encode(), "model"),
    ("chat/completions", chat(messages="hi"), "messages"),
    ("chat/completions", chat(messages=[]), "messages"),
    ("chat/completions", chat(messages=[1]), "messages.0"),
    ("chat/completions", chat(messages=[{"role": 5, "content": "x"}]), "messages.0.role"),
    ("chat/completions", chat(messages=[{"role": "user", "content": 5}]), "messages.0.content"),
    ("chat/completions", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]),
     "messages.0.content"),
    ("chat/completions", chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]), "messages.0.content"),
    ("chat/completions", chat(messages=[{"role": "user", "content": "x", "name": 5}]), "messages.0.name"),
    ("chat/completions", assistant(tool_calls="abc"), "messages.0.tool_calls"),
    ("chat/completions", assistant(tool_calls={"function": {"name": "f"}}), "messages.0.tool_calls"),
    ("chat/completions", assistant(tool_calls=[1]), "messages.0.tool_calls.0"),
    ("chat/completions", assistant(tool_calls=[{"function": "f"}]), "messages.0.tool_calls.0.function"),
    ("chat/completions", assistant(tool_calls=[{"function": {"name": 5}}]), "messages.0.tool_calls.0.function.name"),
    ("chat/completions", assistant(tool_calls=[{"function": {"name": "f", "arguments": 5}}]),
     "messages.0.tool_calls.0.function.arguments"),
    ("chat/completions", assistant(tool_calls=[{"function": {"name": "f", "arguments": deep(200)}}]),
     "messages.0.tool_calls.0.function.arguments"),
    ("chat/completions", assistant(tool_call_id=[1]), "messages.0.tool_call_id"),
    ("chat/completions", chat(messages=[{"role": "user", "content": "x", "extra": json.loads(deep(200))}]), "messages.0.extra"),
    ("chat/completions", chat(tools="x"), "tools"),
    ("chat/completions", chat(tools=[{"type": "function", "function": {"name": "f", "parameters": "x"}}]),
     "tools.0.function.parameters"),
    ("chat/completions", chat(tools=[{"type": "function", "function": {"name": "f", "parameters": json.loads(deep(200))}}]),
     "tools.0.function.parameters"),
    ("chat/completions", chat(tools=WEATHER, tool_choice=5), "tool_choice"),
    ("chat/completions", chat(tools=WEATHER, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    ("chat/completions", chat(chat_template_kwargs=[1]), "chat_template_kwargs"),
    ("chat/completions", chat(chat_template_kwargs={"messages": 1}), "chat_template_kwargs"),
    ("chat/completions", chat(chat_template_kwargs={"x": json.loads(deep(200))}), "chat_template_kwargs"),
    ("chat/completions", chat(max_tokens=True), "max_tokens"),
    ("chat/completions", chat(max_tokens="10"), "max_tokens"),
    ("chat/completions", chat(max_tokens=1.5), "max_tokens"),
    ("chat/completions", chat(max_tokens=0), "max_tokens"),
    ("chat/completions", chat(max_tokens=2**70), "max_tokens"),
    ("chat/completions", chat(max_completion_tokens="3"), "max_completion_tokens"),
    ("chat/completions", chat(temperature="0.5"), "temperature"),
    ("chat/completions", chat(temperature=True), "temperature"),
    ("chat/completions", chat(temperature=-1), "temperature"),
    ("chat/completions", chat(top_p=0), "top_p"),
    ("chat/completions", chat(top_k=2**70), "top_k"),
    ("chat/completions", chat(top_k="3"), "top_k"),
    ("chat/completions", chat(top_k=-5), "top_k"),
    ("chat/completions", chat(seed=2**70), "seed"),
    ("chat/completions", chat(seed="7"), "seed"),
    ("chat/completions", chat(n=0), "n"),
    ("chat/completions", chat(n=65), "n"),
    ("chat/completions", chat(n=2, best_of=3), "best_of"),
    ("chat/completions", chat(n=True), "n"),
    ("chat/completions", chat(logit_bias={"x": 1}), "logit_bias"),
    ("chat/completions", chat(logit_bias={"1": "a"}), "logit_bias.1"),
    ("chat/completions", chat(logit_bias=[1]), "logit_bias"),
    ("chat/completions", chat(stop=5), "stop"),
    ("chat/completions", chat(stop=[""]), "stop"),
    ("chat/completions", chat(stop_token_ids=[-1]), "stop_token_ids"),
    ("chat/completions", chat(stop_token_ids=[2**70]), "stop_token_ids.0"),
    ("chat/completions", chat(stream="yes"), "stream"),
    ("chat/completions", chat(stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
    ("chat/completions", chat(logprobs="yes"), "logprobs"),
    ("chat/completions", chat(logprobs=True, top_logprobs=50), "logprobs"),
    ("chat/completions", chat(top_logprobs=3), "top_logprobs"),
    ("chat/completions", chat(user=5), "user"),
    ("completions", json.dumps({"model": "tiny", "prompt": 5}).encode(), "prompt"),
    ("completions", json.dumps({"model": "tiny", "prompt": [1.5]}).encode(), "prompt"),
    ("completions", json.dumps({"model": "tiny", "prompt": [True]}).encode(), "prompt"),
    ("completions", json.dumps({"model": "tiny", "prompt": [-1]}).encode(), "prompt"),
    ("completions", json.dumps({"model": "tiny", "prompt": []}).encode(), "prompt"),
    ("completions", json.dumps({"model": "tiny", "prompt": [[1, 2]]}).encode(), "prompt"),
    ("completions", json.dumps({"model": "tiny", "prompt": ["a", "b"]}).encode(), "prompt"),
    ("completions", json.dumps({"model": "tiny", "prompt": ""}).encode(), "prompt"),
    ("completions", json.dumps({"model": "tiny", "prompt": "a", "echo": True}).encode(), "echo"),
    ("completions", json.dumps({"model": "tiny", "prompt": "a", "best_of": 2}).encode(), "best_of"),
    ("completions", json.dumps({"model": "tiny", "prompt": "a", "logprobs": 99}).encode(), "logprobs"),
    ("completions", json.dumps({"model": "tiny", "prompt": "a", "max_tokens": "4"}).encode(), "max_tokens"),
    ("completions", json.dumps({"model": "tiny", "prompt": "a", "junk": json.loads(deep(200))}).encode(), "junk"),
]


@pytest.mark.parametrize("route,body,field", MALFORMED, ids=[f"{i}-{f}" for i, (_, _, f) in enumerate(MALFORMED)])
def test_malformed_bodies_get_a_json_4xx_naming_the_field(server, route, body, field):  # noqa: F811
    r = httpx.post(f"{server.url}/v1/{route}", content=body, headers={"content-type": "application/json"},
                   timeout=60)
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert field in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_the_server_still_serves_after_the_malformed_bodies(server):  # noqa: F811
    r = server.client.chat.completions.create(model="tiny", messages=USER, max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_strict_types_through_the_openai_client(server):  # noqa: F811
    for bad in (dict(max_tokens="10"), dict(max_tokens=True), dict(temperature="0.7"), dict(seed=2**70)):
        with pytest.raises(openai.BadRequestError, match=next(iter(bad))):
            server.client.chat.completions.create(model="tiny", messages=USER, **bad)


@pytest.mark.parametrize("tiny", [dict(temperature=1e-40), dict(top_p=1e-300), dict(temperature=1e-40, top_p=1e-300)])
def test_vanishing_temperature_or_top_p_answers_as_greedy(server, tiny):  # noqa: F811
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=16, extra_body={"ignore_eos": True})
    greedy = server.client.completions.create(**kw, temperature=0).choices[0].text
    assert server.client.completions.create(**kw, **tiny).choices[0].text == greedy


# -- Authorization ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed(model, tokenizer):  # noqa: F811
    s = Server(model, tokenizer, EngineSettings(block_size=8, num_blocks=64), api_key="s3cret")
    yield s
    s.close()


@pytest.mark.parametrize("header,status", [
    ("Bearer s3cret", 200), ("bearer s3cret", 200), ("BEARER  s3cret", 200),
    ("s3cret", 401), ("Basic s3cret", 401), ("Bearer wrong", 401), ("Bearers3cret", 401), ("Bearer", 401),
    (None, 401),
])
def test_authorization_needs_the_bearer_scheme_in_any_case(keyed, header, status):
    headers = {"authorization": header} if header is not None else {}
    r = httpx.get(keyed.url + "/v1/models", headers=headers)
    assert r.status_code == status, r.text
    if status == 401:
        assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    assert [m.id for m in keyed.client.models.list().data] == ["tiny"]  # the openai client's own header


# -- body cap and tokenization off the event loop -------------------------------------------------

@pytest.fixture(scope="module")
def capped(model, tokenizer):  # noqa: F811
    s = Server(model, tokenizer, EngineSettings(block_size=8, num_blocks=64), max_request_bytes=65536)
    yield s
    s.close()


def test_a_body_over_the_cap_gets_413_naming_the_limit(capped):
    body = json.dumps({"model": "tiny", "prompt": "x" * 80_000}).encode()
    chunks = (body[i:i + 8192] for i in range(0, len(body), 8192))  # no Content-Length: counted as it comes
    for content in (body, chunks):
        r = httpx.post(capped.url + "/v1/completions", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "65536 bytes" in r.json()["error"]["message"], r.text
    under = httpx.post(capped.url + "/v1/completions", json={"model": "tiny", "prompt": "x" * 60_000})
    assert under.status_code == 400 and "context" in under.json()["error"]["message"]


def test_health_answers_while_a_long_prompt_is_tokenized(server):  # noqa: F811
    # 3.9 MB of text, under the default cap: tokenized whole, then refused for the context. On the
    # event loop, tokenizing it held /health for ~90% of the request's time; in a thread, ~20%.
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hello world, " * 300_000}]})
    result = {}

    def post():
        start = time.monotonic()
        result["response"] = httpx.post(server.url + "/v1/chat/completions", content=body.encode(),
                                         headers={"content-type": "application/json"}, timeout=120)
        result["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=post)
    thread.start()
    slowest = 0.0
    while thread.is_alive():
        start = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        slowest = max(slowest, time.monotonic() - start)
    thread.join()
    assert result["response"].status_code == 400 and "context" in result["response"].json()["error"]["message"]
    assert slowest < result["seconds"] / 2, (slowest, result["seconds"])


# -- a request that fails inside an engine step ---------------------------------------------------

class PoisonQwen(QwenForCausalLM):
    """Fails every model call whose input holds POISON: a request that breaks the step it is in."""

    def forward(self, input_ids, *args, **kwargs):
        if (input_ids == POISON).any():
            raise RuntimeError("poisoned input")
        return super().forward(input_ids, *args, **kwargs)


@pytest.fixture(scope="module")
def poison_model():
    m = tiny_model(vocab_size=VOCAB, max_position_embeddings=2048)
    m.__class__ = PoisonQwen
    m.eos_token_ids = [258, 256]
    return m


@pytest.mark.parametrize("steps_before", [0, 3])
def test_a_failing_request_fails_alone_in_the_engine(poison_model, steps_before):
    engine = Engine(poison_model, EngineSettings(block_size=8, num_blocks=64))
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    good = engine.add_request([1, 2, 3, 4], greedy)
    outputs = [out for _ in range(steps_before) for out in engine.step()]
    bad = engine.add_request([1, POISON, 3], greedy)
    while engine.has_unfinished():
        outputs += engine.step()
    failed = [o for o in outputs if o.request_id == bad]
    assert len(failed) == 1 and failed[0].finished and isinstance(failed[0].error, RuntimeError)
    tokens = [t for o in outputs if o.request_id == good for t in o.token_ids]
    assert tokens == qwenkit.generate(poison_model, [1, 2, 3, 4], 12)
    assert engine.blocks.num_used_blocks == 0


def test_a_failing_request_does_not_fail_its_concurrent_neighbour(poison_model, tokenizer):  # noqa: F811
    s = Server(poison_model, tokenizer, EngineSettings(block_size=8, num_blocks=64))
    try:
        good, bad = asyncio.run(_good_and_bad(s.url))
        assert isinstance(bad, openai.InternalServerError) and "poisoned input" in str(bad)
        assert good == tokenizer.decode(qwenkit.generate(poison_model, [1, 2, 3, 4], 24), skip_special_tokens=True)
        assert s.wait_idle()["qwenkit_kv_blocks_used"] == 0
    finally:
        s.close()


async def _good_and_bad(url: str):
    """A streamed request, and while it runs a poisoned one: (the first's text, the second's error)."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    try:
        stream = await client.completions.create(model="tiny", prompt=[1, 2, 3, 4], max_tokens=24, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        text, bad = [], None
        async for chunk in stream:
            text.append(chunk.choices[0].text)
            if bad is None:  # the first chunk is out: the good request is running
                try:
                    await client.completions.create(model="tiny", prompt=[1, POISON, 3], max_tokens=4)
                except openai.APIError as e:
                    bad = e
        return "".join(text), bad
    finally:
        await client.close()
