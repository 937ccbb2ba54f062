"""`qwenkit serve`'s lifecycle, as an orchestrator and real clients see it: a real server process
on a tiny checkpoint, streams on loopback, real signals. Draining lets streams finish and exits 0
with every KV block back; a second signal (or --shutdown-timeout) ends streams with an error
event and [DONE]; a full queue is a 429 with Retry-After; --request-timeout ends a request with a
clear error; /health and /ready; a KV budget beyond free memory is refused before allocating."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from test_server import VOCAB, write_tokenizer
from test_server_cli import free_port
from tiny import make_checkpoint

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
parser = pytest.importorskip("prometheus_client.parser")
pytest.importorskip("uvicorn")
pytest.importorskip("transformers")

LONG = 2000  # tokens: seconds of decoding for the tiny model, so a stream is still running when signalled
HUGE = 60000  # tokens: more than the tiny model decodes in a request timeout of 6 s on any host seen (~4,000 tok/s)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", vocab_size=VOCAB, hidden_size=32,
                           intermediate_size=64, num_hidden_layers=2, eos_token_id=258,
                           max_position_embeddings=65536)
    return write_tokenizer(path)


class Served:
    """`python -m qwenkit.cli serve` as a subprocess; its output collected by a thread."""

    def __init__(self, model, *flags: str, session: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "qwenkit.cli", "serve", "--model", str(model), "--port", str(self.port),
               "--dtype", "float32", "--threads", "1", *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=session)
        self.session = session
        self.lines: list[str] = []
        self.listening = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if "listening on" in line:
                self.listening.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, limit_s: float = 180) -> None:
        deadline = time.time() + limit_s
        while not self.status("/ready") == 200:
            assert self.proc.poll() is None and time.time() < deadline, "server exited or hung:\n" + self.output
            time.sleep(0.05)

    def status(self, path: str) -> int | None:
        try:
            return httpx.get(self.url + path, timeout=60).status_code
        except httpx.TransportError:
            return None

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {s.name: s.value for f in parser.text_string_to_metric_families(text) for s in f.samples
                if s.name.startswith("vllm:") and "le" not in s.labels and "finished_reason" not in s.labels}

    def wait_metric(self, name: str, value: float, limit_s: float = 30) -> None:
        deadline = time.time() + limit_s
        while self.metrics()[name] != value:
            assert time.time() < deadline, f"{name} stayed {self.metrics()[name]}, not {value}"
            time.sleep(0.05)

    def stop(self, limit_s: float) -> int:
        """The exit code of a process that must end within limit_s."""
        try:
            return self.proc.wait(limit_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"still running {limit_s} s later:\n{self.output}") from None

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.session:  # spawned ranks too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture
def serve(ckpt):
    started = []

    def start(*flags, model=ckpt, session=False):
        started.append(Served(model, *flags, session=session))
        return started[-1]
    yield start
    for s in started:
        s.close()


def test_ctrl_c_to_every_rank_of_a_tensor_parallel_server_drains_and_exits_0(serve):
    """A terminal's Ctrl-C (or torchrun) signals every rank: the workers wait for rank 0's drain."""
    server = serve("--tensor-parallel-size", "2", "--shutdown-timeout", "120", "--num-kv-blocks", "256",
                   session=True)
    server.wait_ready()
    stream = Stream(LONG // 8)

    async def scenario():
        async with httpx.AsyncClient() as client:
            task = asyncio.create_task(stream.run(client, server.url))
            await stream.first.wait()
            os.killpg(server.proc.pid, signal.SIGINT)  # the whole process group, workers included
            await task
    asyncio.run(scenario())
    assert server.stop(120) == 0
    assert stream.done and stream.error is None and stream.completion_tokens == LONG // 8
    deadline = time.time() + 30
    with pytest.raises(ProcessLookupError):  # the worker rank is gone too: nothing left in the group
        while time.time() < deadline:
            os.killpg(server.proc.pid, 0)
            time.sleep(0.1)
    assert "1 requests finished (0 aborted); KV blocks in use 0 of 256" in server.output


class Stream:
    """One streamed completion read as raw server-sent events."""

    def __init__(self, max_tokens: int, drop_after: int | None = None):
        self.max_tokens, self.drop_after = max_tokens, drop_after
        self.events: list = []  # parsed JSON chunks, then "[DONE]"
        self.first = asyncio.Event()
        self.times: list[float] = []

    async def run(self, client, url: str) -> "Stream":
        body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": self.max_tokens, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            self.status = r.status_code
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    self.events.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
                    self.times.append(time.monotonic())
                    self.first.set()
                    if self.drop_after is not None and len(self.events) >= self.drop_after:
                        return self  # leaving the block closes the connection mid-stream
        return self

    @property
    def finish_reason(self):
        return next((c["finish_reason"] for e in self.events if isinstance(e, dict)
                     for c in e.get("choices", []) if c.get("finish_reason")), None)

    @property
    def error(self) -> dict | None:
        return next((e["error"] for e in self.events if isinstance(e, dict) and "error" in e), None)

    @property
    def done(self) -> bool:
        return self.events[-1:] == ["[DONE]"]

    @property
    def completion_tokens(self) -> int | None:
        return next((e["usage"]["completion_tokens"] for e in self.events if isinstance(e, dict) and e.get("usage")),
                    None)


def test_sigterm_drains_streams_then_exits_0_with_every_block_back(serve):
    server = serve("--max-num-seqs", "32", "--shutdown-timeout", "120", "--kv-cache-memory", "8MiB")
    server.wait_ready()
    short = [Stream(8) for _ in range(16)]
    dropped = [Stream(LONG, drop_after=3) for _ in range(8)]
    long = [Stream(LONG // 4) for _ in range(8)]

    async def scenario():
        async with httpx.AsyncClient() as client:
            tasks = [asyncio.create_task(s.run(client, server.url)) for s in short + dropped + long]
            await asyncio.gather(*tasks[:24])
            await asyncio.gather(*(s.first.wait() for s in long))
            await asyncio.to_thread(server.wait_metric, "vllm:num_requests_running", 8)  # the dropped ones aborted
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            while server.status("/ready") != 503:
                await asyncio.sleep(0.02)
            refused = await client.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "hi"})
            assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
            assert server.status("/health") == 200
            assert server.metrics()["vllm:kv_cache_usage_perc"] > 0  # /metrics answers while draining
            await asyncio.gather(*tasks[24:])
            return signalled

    signalled = asyncio.run(scenario())
    assert server.stop(120) == 0
    assert all(s.status == 200 and s.done and s.finish_reason == "length" and s.completion_tokens == 8
               for s in short)
    assert all(s.done and s.error is None and s.finish_reason == "length" and s.completion_tokens == LONG // 4
               for s in long)
    assert any(s.times[-2] > signalled for s in long)  # streamed on after the signal: drained, not cut
    assert all(len(s.events) == 3 and not s.done for s in dropped)
    assert "32 requests finished (8 aborted); KV blocks in use 0 of" in server.output
    assert "engine thread stopped" in server.output


def test_second_signal_ends_streams_with_an_error_event_and_exits_at_once(serve):
    server = serve("--shutdown-timeout", "120", "--kv-cache-memory", "8MiB")
    server.wait_ready()
    streams = [Stream(4 * LONG) for _ in range(4)]

    async def scenario():
        async with httpx.AsyncClient() as client:
            tasks = [asyncio.create_task(s.run(client, server.url)) for s in streams]
            await asyncio.gather(*(s.first.wait() for s in streams))
            server.proc.send_signal(signal.SIGTERM)
            while server.status("/ready") != 503:
                await asyncio.sleep(0.02)
            server.proc.send_signal(signal.SIGTERM)
            return time.monotonic(), await asyncio.gather(*tasks)

    second, _ = asyncio.run(scenario())
    assert server.stop(30) == 0 and time.monotonic() - second < 30
    for s in streams:
        assert s.done and s.finish_reason is None and "stopped (SIGTERM)" in s.error["message"]
        assert s.completion_tokens < 4 * LONG
    assert "4 requests finished (4 aborted); KV blocks in use 0 of" in server.output


def test_queue_bound_request_timeout_and_shutdown_timeout(serve):
    server = serve("--max-num-seqs", "1", "--max-queued-requests", "2", "--request-timeout", "6",
                   "--shutdown-timeout", "1", "--kv-cache-memory", "64MiB")
    server.wait_ready()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    running, queued = Stream(HUGE), [Stream(8) for _ in range(2)]

    async def fill_the_queue():
        async with httpx.AsyncClient() as http:
            task = asyncio.create_task(running.run(http, server.url))
            await running.first.wait()
            waiting = [asyncio.create_task(s.run(http, server.url)) for s in queued]
            await asyncio.to_thread(server.wait_metric, "vllm:num_requests_waiting", 2)
            over = await http.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "hi"})
            assert over.status_code == 429 and int(over.headers["retry-after"]) >= 1
            assert "--max-queued-requests" in over.json()["error"]["message"]
            with pytest.raises(openai.RateLimitError):
                await asyncio.to_thread(client.completions.create, model="tiny", prompt="hi", max_tokens=2)
            for t in waiting:
                t.cancel()  # these clients give up: their places free up
            await asyncio.gather(*waiting, return_exceptions=True)
            await task

    asyncio.run(fill_the_queue())
    assert running.done and "--request-timeout" in running.error["message"]
    server.wait_metric("vllm:kv_cache_usage_perc", 0)
    server.wait_metric("vllm:num_requests_waiting", 0)
    with pytest.raises(openai.APIStatusError) as e:  # not streamed: a 504 naming the limit
        client.completions.create(model="tiny", prompt="hi", max_tokens=HUGE, extra_body={"ignore_eos": True})
    assert e.value.status_code == 504 and "--request-timeout" in e.value.message

    cut = Stream(HUGE)

    async def shutdown_timeout():
        async with httpx.AsyncClient() as http:
            task = asyncio.create_task(cut.run(http, server.url))
            await cut.first.wait()
            server.proc.send_signal(signal.SIGINT)
            await task
    t0 = time.monotonic()
    asyncio.run(shutdown_timeout())
    assert server.stop(30) == 0 and time.monotonic() - t0 < 30
    assert cut.done and "--shutdown-timeout 1" in cut.error["message"]
    assert "KV blocks in use 0 of" in server.output


def test_ready_is_503_while_the_model_loads_and_health_is_200(serve, default_model_path):
    server = serve("--kv-cache-memory", "64MiB", "--dtype", "auto", model=default_model_path)
    assert server.listening.wait(180), server.output
    seen = set()
    while server.status("/ready") != 200:
        assert server.proc.poll() is None, server.output
        answers = [httpx.get(server.url + path, timeout=60) for path in ("/ready", "/v1/models", "/health")]
        assert answers[2].status_code == 200  # alive throughout (the load shares the CPU and the GIL: long timeouts)
        if answers[2].json()["state"] == "loading":  # still loading after the other two: they were asked while loading
            seen |= {answers[0].status_code, answers[1].status_code}
        time.sleep(0.02)
    assert seen == {503}  # seen while loading: not ready, and the API not yet open
    assert httpx.get(server.url + "/ready", timeout=60).json() == {"status": "ready"}
    server.proc.send_signal(signal.SIGTERM)
    assert server.stop(120) == 0


def test_kv_budget_beyond_free_memory_is_refused_in_one_line(ckpt):
    proc = subprocess.run([sys.executable, "-m", "qwenkit.cli", "serve", "--model", str(ckpt), "--port",
                           str(free_port()), "--kv-cache-memory", "1TB"], capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "--kv-cache-memory 1TB" in lines[0] and "free on cpu" in lines[0]


def test_engine_checks_the_budget_before_allocating():
    from qwenkit.engine import Engine, EngineSettings
    from qwenkit.errors import ConfigError
    from test_engine import tiny_model

    model = tiny_model()
    with pytest.raises(ConfigError, match=r"kv_cache_memory \(--kv-cache-memory\): 1024.0 TiB of KV cache .* free"):
        Engine(model, EngineSettings(kv_cache_memory=2**50))
    with pytest.raises(ConfigError, match=r"--num-kv-blocks\) 1000000000000: .* free on cpu"):
        Engine(model, EngineSettings(num_blocks=10**12))
