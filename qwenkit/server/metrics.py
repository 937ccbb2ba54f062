"""/metrics in Prometheus text format, from the engine's counters, gauges and request histograms.

Two sets of names: vLLM's (`vllm:...`, labelled `model_name` and `engine`, with vLLM's units and
bucket bounds), so dashboards and alerts written for a vLLM server read ours unchanged, and
qwenkit's own (`qwenkit_...`, unlabelled), kept for what already reads them. The text is written
here rather than with prometheus_client, which the server does not need.

`parse`, `histogram` and `quantile` read the text back (tests, `qwenkit bench serve`).
"""

from __future__ import annotations

import math
import re

from ..engine.stats import FINISH_REASONS

# (metric name, engine key, type, help)
METRICS = [
    ("qwenkit_requests_total", "requests", "counter", "Requests accepted by the engine"),
    ("qwenkit_requests_finished_total", "finished", "counter", "Requests finished (stopped, length or aborted)"),
    ("qwenkit_requests_aborted_total", "aborted", "counter", "Requests aborted (client gone or cancelled)"),
    ("qwenkit_prompt_tokens_total", "prompt_tokens", "counter", "Prompt tokens of requests whose prefill finished"),
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

VLLM_METRICS = [
    ("vllm:num_requests_running", "running", "gauge", "Number of requests in model execution batches."),
    ("vllm:num_requests_waiting", "waiting", "gauge", "Number of requests waiting to be processed."),
    ("vllm:kv_cache_usage_perc", "kv_cache_usage", "gauge", "KV-cache usage. 1 means 100 percent usage."),
    ("vllm:prompt_tokens_total", "prompt_tokens", "counter", "Number of prefill tokens processed."),
    ("vllm:generation_tokens_total", "generation_tokens", "counter", "Number of generation tokens processed."),
    ("vllm:prefix_cache_queries_total", "prefix_cache_queried_tokens", "counter",
     "Prefix cache queries, in terms of number of queried tokens."),
    ("vllm:prefix_cache_hits_total", "prefix_cache_hit_tokens", "counter",
     "Prefix cache hits, in terms of number of cached tokens."),
    ("vllm:num_preemptions_total", "preemptions", "counter", "Cumulative number of preemption from the engine."),
    ("vllm:spec_decode_num_drafts_total", "spec_drafts", "counter", "Number of spec decoding drafts."),
    ("vllm:spec_decode_num_draft_tokens_total", "spec_draft_tokens", "counter", "Number of draft tokens."),
    ("vllm:spec_decode_num_accepted_tokens_total", "spec_accepted_tokens", "counter", "Number of accepted tokens."),
]

# (metric name, engine histogram, help)
VLLM_HISTOGRAMS = [
    ("vllm:time_to_first_token_seconds", "time_to_first_token", "Histogram of time to first token in seconds."),
    ("vllm:inter_token_latency_seconds", "inter_token_latency", "Histogram of inter-token latency in seconds."),
    ("vllm:time_per_output_token_seconds", "inter_token_latency",
     "Histogram of time per output token in seconds (vLLM's older name for inter_token_latency)."),
    ("vllm:e2e_request_latency_seconds", "e2e_request_latency", "Histogram of e2e request latency in seconds."),
    ("vllm:request_queue_time_seconds", "request_queue_time", "Histogram of time spent in WAITING phase for request."),
    ("vllm:request_prefill_time_seconds", "request_prefill_time",
     "Histogram of time spent in PREFILL phase for request."),
    ("vllm:request_decode_time_seconds", "request_decode_time", "Histogram of time spent in DECODE phase for request."),
    ("vllm:request_inference_time_seconds", "request_inference_time",
     "Histogram of time spent in RUNNING phase for request."),
    ("vllm:request_prompt_tokens", "request_prompt_tokens", "Number of prefill tokens processed."),
    ("vllm:request_generation_tokens", "request_generation_tokens", "Number of generation tokens processed."),
]

_LE = re.compile(r'le="([^"]*)"')


def render(values: dict[str, float], histograms: dict, model_name: str) -> str:
    """The exposition text; `histograms` maps engine names to (bounds, cumulative counts, sum)."""
    lines = []
    for name, key, kind, help_ in METRICS:
        lines += _header(name, kind, help_) + [f"{name} {values.get(key, 0)}"]
    queried = values.get("prefix_cache_queried_tokens", 0)
    rate = values.get("prefix_cache_hit_tokens", 0) / queried if queried else 0.0
    lines += _header("qwenkit_prefix_cache_hit_rate", "gauge",
                     "Share of looked-up prompt tokens found in the prefix cache") + [f"qwenkit_prefix_cache_hit_rate {rate:.6f}"]
    labels = f'model_name="{_escape(model_name)}",engine="0"'
    total = values.get("kv_blocks_total", 0)
    values = {**values, "kv_cache_usage": values.get("kv_blocks_used", 0) / total if total else 0.0}
    for name, key, kind, help_ in VLLM_METRICS:
        lines += _header(name, kind, help_) + [f"{name}{{{labels}}} {values.get(key, 0)}"]
    lines += _header("vllm:request_success_total", "counter", "Count of successfully processed requests.")
    lines += [f'vllm:request_success_total{{{labels},finished_reason="{r}"}} {values.get(f"finished_{r}", 0)}'
              for r in FINISH_REASONS]
    lines += _spec_decode_lines(values, labels)
    for name, key, help_ in VLLM_HISTOGRAMS:
        lines += _header(name, "histogram", help_) + _histogram_lines(name, labels, *histograms[key])
    return "\n".join(lines) + "\n"


def _spec_decode_lines(values: dict[str, float], labels: str) -> list[str]:
    """Kept guesses by their place in the draft (vLLM's per-position counter) and the acceptance rate."""
    name = "vllm:spec_decode_num_accepted_tokens_per_pos_total"
    lines = _header(name, "counter", "Accepted tokens per draft position.")
    positions = sorted(int(k.rsplit("_", 1)[1]) for k in values if k.startswith("spec_accepted_pos_"))
    lines += [f'{name}{{{labels},position="{i}"}} {values[f"spec_accepted_pos_{i}"]}' for i in positions]
    drafted = values.get("spec_draft_tokens", 0)
    rate = values.get("spec_accepted_tokens", 0) / drafted if drafted else 0.0
    return lines + _header("qwenkit_spec_decode_acceptance_rate", "gauge",
                           "Share of speculative draft tokens the target kept") + [
        f"qwenkit_spec_decode_acceptance_rate {rate:.6f}"]


def _header(name: str, kind: str, help_: str) -> list[str]:
    return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]


def _histogram_lines(name: str, labels: str, bounds, cumulative: list[int], total: float) -> list[str]:
    les = [repr(float(b)) for b in bounds] + ["+Inf"]
    return ([f'{name}_bucket{{{labels},le="{le}"}} {n}' for le, n in zip(les, cumulative)]
            + [f"{name}_count{{{labels}}} {cumulative[-1]}", f"{name}_sum{{{labels}}} {float(total)!r}"])


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


# -- reading it back --------------------------------------------------------------------------

def parse(text: str) -> dict[str, float]:
    """Sample (name with its labels) -> value."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def histogram(samples: dict[str, float], name: str, since: dict[str, float] | None = None):
    """One histogram of `parse`'s output as ([(le, cumulative count)], sum), less what it held in `since`."""
    since = since or {}

    def pick(suffix):
        return [(k, v - since.get(k, 0.0)) for k, v in samples.items() if k.split("{")[0] == name + suffix]
    buckets = sorted((float(_LE.search(k).group(1)), v) for k, v in pick("_bucket"))
    return buckets, sum(v for _, v in pick("_sum"))


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Prometheus' histogram_quantile: linear inside the bucket where rank q falls (nan if empty)."""
    count = buckets[-1][1] if buckets else 0
    if not count:
        return math.nan
    rank, lower, below = q * count, 0.0, 0.0
    for le, cumulative in buckets:
        if cumulative >= rank and cumulative > below:
            if math.isinf(le):
                return lower  # beyond the last finite bound: all that is known is "at least this"
            return lower + (le - lower) * (rank - below) / (cumulative - below)
        lower, below = le, cumulative
    return lower
