"""The default model (Qwen2.5-Coder-0.5B-Instruct, GGUF) end to end: reference logits, a known
answer, bf16 against fp32, the CLI, and the memory of loading."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import qwenkit
from tiny import rel_diff

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France? Answer in one word."
PROMPTS = [
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [{"role": "user", "content": "用一句话解释什么是递归。"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "List three prime numbers."}],
]


@pytest.fixture(scope="module")
def tok(default_model_path):
    return qwenkit.load_tokenizer(default_model_path)


@pytest.fixture(scope="module")
def fp32(default_model_path):
    return qwenkit.load_model(default_model_path, dtype=torch.float32)


@pytest.fixture(scope="module")
def bf16(default_model_path):
    return qwenkit.load_model(default_model_path, dtype=torch.bfloat16)


def _chat_ids(tok, messages):
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def test_logits_match_transformers_on_the_same_dequantized_weights(default_model_path, tok, fp32):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        default_model_path.parent, gguf_file=default_model_path.name, dtype=torch.float32).eval()
    ids = torch.tensor([_chat_ids(tok, PROMPTS[0])])
    with torch.inference_mode():
        expected = ref(ids).logits
        got = fp32(ids)
    del ref
    diff = rel_diff(got, expected)
    print(f"relative max logit difference against transformers: {diff:.2e} over {ids.shape[1]} tokens")
    assert diff < 1e-4


def test_greedy_answer_is_paris(tok, bf16):
    new = qwenkit.generate(bf16, _chat_ids(tok, [{"role": "user", "content": QUESTION}]), 8)
    assert new[-1] in bf16.eos_token_ids
    assert tok.decode(new, skip_special_tokens=True).strip() == "Paris"


def test_bf16_greedy_tokens_equal_fp32(tok, fp32, bf16):
    """The first 16 greedy tokens agree; where they part, the fp32 top-2 margin shows why."""
    for messages in PROMPTS:
        ids = _chat_ids(tok, messages)
        a = qwenkit.generate(fp32, ids, 16)
        b = qwenkit.generate(bf16, ids, 16)
        if a != b:
            k = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
            with torch.inference_mode():
                top = fp32(torch.tensor([ids + a[:k]]))[0, -1].topk(2).values
            margin = float(top[0] - top[1])
            pytest.fail(f"bf16 and fp32 part at token {k} of {messages[-1]['content']!r}; fp32 top-2 margin {margin:.3f}")


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "qwenkit.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_chat_answers_one_turn(default_model_path):
    proc = _cli("chat", "--model", str(default_model_path), "--message", QUESTION, "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "Paris"


def test_cli_generate_streams_a_raw_completion(default_model_path):
    proc = _cli("generate", "--model", str(default_model_path), "--prompt", "def fibonacci(n):",
                "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("def fibonacci(n):") and len(proc.stdout) > len("def fibonacci(n):") + 5


def test_cli_info_json_of_the_default_model(default_model_path):
    proc = _cli("info", str(default_model_path), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert (info["num_layers"], info["num_attention_heads"], info["num_key_value_heads"], info["head_dim"]) == (24, 14, 2, 64)
    assert info["kv_cache_bytes_per_token"] == 2 * 24 * 2 * 64 * 2
    assert info["max_position_embeddings"] == 32768


def _load_in_subprocess(path, load_args: str, size_expr: str) -> tuple[int, int]:
    """(peak RSS, `size_expr` evaluated on the loaded model `m`) of a fresh process that only loads.
    VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec from the (large) test process."""
    code = ("import re, torch, qwenkit; "
            f"m = qwenkit.load_model({str(path)!r}, {load_args}); "
            "hwm = int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())[1]) * 1024; "
            f"print(hwm, {size_expr})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    peak, size = map(int, proc.stdout.split())
    return peak, size


def test_loading_bf16_peak_rss_under_goal(default_model_path):
    peak, weights = _load_in_subprocess(default_model_path, "dtype=torch.bfloat16",
                                        "sum(p.numel() * p.element_size() for p in m.parameters())")
    print(f"peak RSS {peak / 1e9:.2f} GB for {weights / 1e9:.2f} GB of bf16 weights")
    assert peak < 2.5e9


def test_loading_int8_never_holds_the_fp32_model(default_model_path):
    """load_model(quantize="int8") swaps each layer as it loads: the peak stays below the bytes of
    the full fp32 model, which loading then quantizing would hold whole (plus the int8 copies)."""
    peak, fp32_bytes = _load_in_subprocess(
        default_model_path, "dtype=torch.float32, quantize='int8'",
        "4 * (sum(p.numel() for p in m.parameters()) + sum(b.numel() for k, b in m.named_buffers() "
        "if k.endswith('.weight')))")
    print(f"int8 load: peak RSS {peak / 1e9:.2f} GB; the fp32 model is {fp32_bytes / 1e9:.2f} GB")
    assert peak < fp32_bytes


def test_loading_int4_reads_the_head_and_embedding_from_the_file_by_blocks(default_model_path):
    """The LM head and the embedding (545 MB each in fp32) are quantized straight from the GGUF a
    block of rows at a time and the file's pages are let go as each tensor is read, so an int4 load
    peaks near the quantized model plus torch itself (1.82 GB before, of which 1.09 GB the two
    fp32 tables), well under 60% of the fp32 model."""
    peak, fp32_bytes = _load_in_subprocess(
        default_model_path, "dtype=torch.float32, quantize='int4'",
        "4 * __import__('qwenkit.analysis').analysis.parameter_counts(m.config)['total']")
    print(f"int4 load: peak RSS {peak / 1e9:.2f} GB; the fp32 model is {fp32_bytes / 1e9:.2f} GB")
    assert peak < 0.6 * fp32_bytes


def test_cli_chat_quantized_int8_keeps_the_answer(default_model_path):
    proc = _cli("chat", "--model", str(default_model_path), "--message", QUESTION, "--max-new-tokens", "8",
                "--dtype", "fp32", "--quantize", "int8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "Paris"
