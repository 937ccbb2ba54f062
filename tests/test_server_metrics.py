"""/metrics under vLLM's names, read with prometheus_client's own text parser from a real server
on loopback after real requests: histogram buckets cumulative with vLLM's bounds, one
observation per request (per token gap for inter-token latency), sums within what the clients
waited, token and prefix-cache counters exact, gauges back to 0 when idle."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from qwenkit.engine import EngineSettings
from qwenkit.server import metrics
from test_server import Server, model, tokenizer  # noqa: F401  (fixtures)

httpx = pytest.importorskip("httpx")
parser = pytest.importorskip("prometheus_client.parser")

MAX_TOKENS = 6
LABELS = {"model_name": "tiny", "engine": "0"}
# vLLM's bounds (vllm/v1/metrics/loggers.py), written out so a change on our side shows here
TTFT_BOUNDS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BOUNDS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
REQUEST_BOUNDS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                  480.0, 960.0, 1920.0, 7680.0]
PER_REQUEST = ["e2e_request_latency_seconds", "request_queue_time_seconds", "request_prefill_time_seconds",
               "request_decode_time_seconds", "request_inference_time_seconds", "request_prompt_tokens",
               "request_generation_tokens"]


@pytest.fixture
def fresh(model, tokenizer):  # noqa: F811
    s = Server(model, tokenizer, EngineSettings(block_size=8, num_blocks=600, max_prefill_tokens=256))
    yield s
    s.close()


def scrape(server) -> dict:
    text = httpx.get(server.url + "/metrics").text
    return {f.name: f for f in parser.text_string_to_metric_families(text)}


def value(families: dict, name: str, sample: str | None = None, **labels) -> float:
    [s] = [s for s in families[name].samples if s.name == (sample or name) and s.labels == {**LABELS, **labels}]
    return s.value


def histogram(families: dict, name: str) -> tuple[list[float], list[float], float, float]:
    """(bounds, cumulative counts, count, sum), checked to be a well-formed Prometheus histogram."""
    family = families[f"vllm:{name}"]
    assert family.type == "histogram" and all(s.labels.items() >= LABELS.items() for s in family.samples)
    buckets = [(float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket")]
    les, counts = [le for le, _ in buckets], [n for _, n in buckets]
    assert les == sorted(les) and les[-1] == float("inf") and counts == sorted(counts)  # cumulative
    count, total = (value(families, f"vllm:{name}", f"vllm:{name}_{k}") for k in ("count", "sum"))
    assert counts[-1] == count
    return les[:-1], counts, count, total


def complete(server, prompt: list[int]) -> float:
    """One request that generates exactly MAX_TOKENS tokens; the seconds the client waited."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == MAX_TOKENS
    return time.perf_counter() - t0


def test_vllm_metrics_after_real_requests(fresh):
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(0, 256, (24,), generator=g).tolist()  # three blocks of 8
    prompts = [shared + [1, 2, 3], shared + [4, 5, 6]]  # one after the other: the second finds 24 tokens cached
    prompts += [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 17, 33, 60)]
    waited = [complete(fresh, p) for p in prompts[:2]]
    with ThreadPoolExecutor(4) as pool:  # the rest at once, so some of them queue
        waited += list(pool.map(lambda p: complete(fresh, p), prompts[2:]))
    fresh.wait_idle()
    m = scrape(fresh)
    n, prompt_tokens = len(prompts), sum(map(len, prompts))

    assert histogram(m, "time_to_first_token_seconds")[0] == TTFT_BOUNDS
    assert histogram(m, "inter_token_latency_seconds")[0] == ITL_BOUNDS
    assert histogram(m, "e2e_request_latency_seconds")[0] == REQUEST_BOUNDS
    assert [histogram(m, name)[2] for name in ["time_to_first_token_seconds"] + PER_REQUEST] == [n] * 8
    _, itl, itl_count, itl_sum = histogram(m, "inter_token_latency_seconds")
    assert itl_count == n * (MAX_TOKENS - 1)  # one gap per token after the first
    assert histogram(m, "time_per_output_token_seconds")[1:] == (itl, itl_count, itl_sum)  # vLLM's older name

    ttft, e2e, queue, prefill, decode, inference = (histogram(m, name)[3] for name in (
        "time_to_first_token_seconds", *PER_REQUEST[:5]))
    assert 0 < ttft < e2e <= sum(waited)  # the server's clock runs inside each client's
    assert 0 <= queue and 0 < prefill and 0 < decode and 0 < itl_sum
    assert inference == pytest.approx(prefill + decode) and queue + inference <= e2e + 1e-9
    assert histogram(m, "request_prompt_tokens")[3] == prompt_tokens
    assert histogram(m, "request_generation_tokens")[3] == n * MAX_TOKENS

    assert value(m, "vllm:prompt_tokens", "vllm:prompt_tokens_total") == prompt_tokens
    assert value(m, "vllm:generation_tokens", "vllm:generation_tokens_total") == n * MAX_TOKENS
    assert value(m, "vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total") == prompt_tokens
    assert value(m, "vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total") == 24
    assert [value(m, "vllm:request_success", "vllm:request_success_total", finished_reason=r)
            for r in ("stop", "length", "abort")] == [0, n, 0]
    assert [value(m, f"vllm:{g}") for g in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")] \
        == [0, 0, 0]
    assert metrics.parse(httpx.get(fresh.url + "/metrics").text)["qwenkit_requests_finished_total"] == n


def test_gauges_while_a_stream_runs_and_after_it_is_dropped(fresh):
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 1000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", fresh.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()  # held: dropping the iterator would close the connection
        assert next(line for line in lines if line.startswith("data:"))
        m = scrape(fresh)
        assert value(m, "vllm:num_requests_running") == 1 and value(m, "vllm:kv_cache_usage_perc") > 0
        assert histogram(m, "time_to_first_token_seconds")[2] == 1
    fresh.wait_idle()
    m = scrape(fresh)
    assert value(m, "vllm:num_requests_running") == 0 and value(m, "vllm:kv_cache_usage_perc") == 0
    assert value(m, "vllm:request_success", "vllm:request_success_total", finished_reason="abort") == 1
    assert histogram(m, "e2e_request_latency_seconds")[2] == 0  # a dropped request is counted, not timed


def test_quantile_interpolates_inside_the_bucket_like_prometheus():
    text = "\n".join(f'h_bucket{{le="{le}"}} {n}' for le, n in (("0.1", 0), ("0.5", 4), ("1.0", 8), ("+Inf", 10)))
    buckets, _ = metrics.histogram(metrics.parse(text + "\nh_sum 5.0\n"), "h")
    assert metrics.quantile(buckets, 0.2) == pytest.approx(0.3)  # rank 2 of 4 in (0.1, 0.5]
    assert metrics.quantile(buckets, 0.6) == pytest.approx(0.75)
    assert metrics.quantile(buckets, 0.95) == 1.0  # in +Inf: the last finite bound
