"""`qwenkit bench serve`: the HTTP server under 1, 4 and 16 concurrent streaming clients, beside
transformers answering the same requests one by one, in the same run.

Every request asks for exactly `--max-tokens` tokens (ignore_eos), so the work is identical for
both. Reported: aggregate output tokens/s and median / p90 time to first token per level, as the
clients saw it, and beside it what the server's /metrics histograms recorded over the level (time
to first token, inter-token latency, queue time, end-to-end latency).
--model, --dtype and --device apply to both sides; --quantize to qwenkit's server only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time

QUESTIONS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain the difference between a list and a tuple in Python.",
    "Write a SQL query that returns the ten most recent orders.",
    "How does binary search work? Give the complexity.",
    "Write a JavaScript function that debounces another function.",
    "What is a race condition? Give a short example.",
    "Write a bash one-liner that counts lines in all .py files.",
    "Explain what a hash map is and when to use one.",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(model: str, port: int, kv_memory: str, dtype: str, device: str,
                  quantize: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qwenkit.cli", "serve", "--model", model, "--port", str(port),
           "--kv-cache-memory", kv_memory, "--dtype", dtype, "--device", device, "--log-level", "warning"]
    if quantize:
        cmd += ["--quantize", quantize]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import httpx

    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-500:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError("server was not ready in 600 s")


async def _one(client, url: str, model: str, question: str, max_tokens: int) -> tuple[float, int]:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0, ttft, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", url, json=body, timeout=None) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"server answered {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft or time.perf_counter() - t0, tokens


async def _level(port: int, clients: int, requests: int, max_tokens: int) -> dict:
    import httpx

    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    model = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
    before = _scrape(port)
    queue = [QUESTIONS[i % len(QUESTIONS)] for i in range(requests)]
    results = []

    async def worker(client):
        while queue:
            results.append(await _one(client, url, model, queue.pop(), max_tokens))

    async with httpx.AsyncClient() as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - t0
    ttfts = sorted(t for t, _ in results)
    return {"clients": clients, "requests": requests, "output_tok_s": sum(n for _, n in results) / wall,
            "ttft_median_s": statistics.median(ttfts), "ttft_p90_s": ttfts[max(0, math.ceil(0.9 * len(ttfts)) - 1)],
            **_server_side(before, _scrape(port))}


def _scrape(port: int) -> dict[str, float]:
    import httpx

    from ..server import metrics

    return metrics.parse(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text)


def _server_side(before: dict[str, float], after: dict[str, float]) -> dict:
    """What the server's histograms recorded between two scrapes: means, and the time to first
    token's median / p90 as Prometheus' histogram_quantile estimates them from the buckets."""
    from ..server import metrics

    out = {}
    for key, name in (("ttft", "time_to_first_token"), ("itl", "inter_token_latency"),
                      ("queue", "request_queue_time"), ("e2e", "e2e_request_latency")):
        buckets, total = metrics.histogram(after, f"vllm:{name}_seconds", since=before)
        count = buckets[-1][1] if buckets else 0
        out[f"server_{key}_mean_s"] = total / count if count else None
        if key == "ttft" and count:
            out["server_ttft_median_s"], out["server_ttft_p90_s"] = (metrics.quantile(buckets, q) for q in (0.5, 0.9))
        if key == "e2e":
            out["server_requests"] = int(count)
    return out


def _transformers_baseline(path: str, requests: int, max_tokens: int, dtype: str, device: str) -> dict:
    code = f"""
import json, time, torch, transformers
from pathlib import Path
p = Path({path!r}); kw = {{"gguf_file": p.name}} if p.suffix == ".gguf" else {{}}
root = p.parent if p.suffix == ".gguf" else p
tok = transformers.AutoTokenizer.from_pretrained(root, **kw)
model = transformers.AutoModelForCausalLM.from_pretrained(root, dtype=torch.{dtype}, **kw).to({device!r}).eval()
qs = {QUESTIONS!r}; n = 0; t0 = time.perf_counter()
for i in range({requests}):
    ids = tok.apply_chat_template([{{"role": "user", "content": qs[i % len(qs)]}}], add_generation_prompt=True, return_tensors="pt")
    ids = (ids["input_ids"] if hasattr(ids, "keys") else ids).to({device!r})
    out = model.generate(ids, max_new_tokens={max_tokens}, min_new_tokens={max_tokens}, do_sample=False)
    n += out.shape[1] - ids.shape[1]
print("RESULT", json.dumps({{"output_tok_s": n / (time.perf_counter() - t0), "requests": {requests}}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


def main(argv: list[str], prog: str = "qwenkit bench serve") -> int:
    from ..commands.common import add_model_args, model_options
    from ..dtypes import resolve_dtype
    from ..loader import resolve_path

    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    add_model_args(p)
    p.add_argument("--levels", default="1,4,16", help="concurrent clients per level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--kv-cache-memory", default="2GiB")
    p.add_argument("--baseline-requests", type=int, default=4, help="transformers requests (one by one)")
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args(argv)
    path = str(resolve_path(args.model))
    device, dtype = model_options(args)
    # one dtype for both sides: "auto" as a plain dtype (its weight plan would quantize qwenkit's side)
    dtype = str(resolve_dtype(dtype, device)).removeprefix("torch.")
    port = _free_port()
    server = _start_server(path, port, args.kv_cache_memory, dtype, device, args.quantize)
    try:
        levels = [asyncio.run(_level(port, c, max(c, 2 * c), args.max_tokens)) for c in map(int, args.levels.split(","))]
    finally:
        server.terminate()
        server.wait(timeout=60)
    baseline = _transformers_baseline(path, args.baseline_requests, args.max_tokens, dtype, device)
    result = {"model": args.model, "dtype": dtype, "device": device, "quantize": args.quantize,
              "max_tokens": args.max_tokens, "qwenkit": levels, "transformers_sequential": baseline}
    _print(result)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_serve.json.tmp"), "w") as f:
        json.dump(result, f, indent=2)
    os.replace(os.path.join(args.out, "bench_serve.json.tmp"), os.path.join(args.out, "bench_serve.json"))
    return 0


def _print(result: dict) -> None:
    base = result["transformers_sequential"].get("output_tok_s")
    print(f"qwenkit serve, {result['dtype']}" + (f" + {result['quantize']}" if result.get("quantize") else ""))
    print("| clients | output tok/s | TTFT median s | TTFT p90 s | server: TTFT median s | ITL mean ms | queue mean s "
          "| x transformers (one by one) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["qwenkit"]:
        ratio = f"{r['output_tok_s'] / base:.2f}x" if base else "-"
        server = [_fmt(r.get("server_ttft_median_s")), _fmt(r.get("server_itl_mean_s"), 1000, ".1f"),
                  _fmt(r.get("server_queue_mean_s"))]
        print(f"| {r['clients']} | {r['output_tok_s']:.1f} | {r['ttft_median_s']:.2f} | {r['ttft_p90_s']:.2f} | "
              f"{' | '.join(server)} | {ratio} |")
    print(f"transformers {result['dtype']}, requests one by one: {result['transformers_sequential']}")


def _fmt(value, scale: float = 1, spec: str = ".2f") -> str:
    return "-" if value is None else format(value * scale, spec)
