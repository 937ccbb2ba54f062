"""/metrics in Prometheus text format, from the engine's counters and gauges."""

from __future__ import annotations

# (metric name, engine key, type, help)
METRICS = [
    ("qwenkit_requests_total", "requests", "counter", "Requests accepted by the engine"),
    ("qwenkit_requests_finished_total", "finished", "counter", "Requests finished (stopped, length or aborted)"),
    ("qwenkit_requests_aborted_total", "aborted", "counter", "Requests aborted (client gone or cancelled)"),
    ("qwenkit_prompt_tokens_total", "prompt_tokens", "counter", "Prompt tokens of accepted requests"),
    ("qwenkit_generation_tokens_total", "generation_tokens", "counter", "Tokens generated"),
    ("qwenkit_engine_steps_total", "steps", "counter", "Engine steps (batched model calls)"),
    ("qwenkit_preemptions_total", "preemptions", "counter", "Sequences preempted for lack of KV blocks"),
    ("qwenkit_requests_waiting", "waiting", "gauge", "Requests queued for admission"),
    ("qwenkit_requests_running", "running", "gauge", "Requests in the running batch"),
    ("qwenkit_kv_blocks_total", "kv_blocks_total", "gauge", "KV cache blocks"),
    ("qwenkit_kv_blocks_used", "kv_blocks_used", "gauge", "KV cache blocks held by requests"),
    ("qwenkit_kv_blocks_free", "kv_blocks_free", "gauge", "KV cache blocks free (cached prefixes included)"),
    ("qwenkit_prefix_cache_queries_total", "prefix_cache_queried_tokens", "counter",
     "Prompt tokens looked up in the prefix cache"),
    ("qwenkit_prefix_cache_hits_total", "prefix_cache_hit_tokens", "counter", "Prompt tokens found in the prefix cache"),
]


def render(values: dict[str, float]) -> str:
    lines = []
    for name, key, kind, help_ in METRICS:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {values.get(key, 0)}"]
    queried = values.get("prefix_cache_queried_tokens", 0)
    rate = values.get("prefix_cache_hit_tokens", 0) / queried if queried else 0.0
    lines += ["# HELP qwenkit_prefix_cache_hit_rate Share of looked-up prompt tokens found in the prefix cache",
              "# TYPE qwenkit_prefix_cache_hit_rate gauge", f"qwenkit_prefix_cache_hit_rate {rate:.6f}"]
    return "\n".join(lines) + "\n"


def parse(text: str) -> dict[str, float]:
    """Sample name -> value (for tests and benchmarks)."""
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}
