"""The thinking budget: once a request's reasoning reaches `thinking_budget` tokens the engine writes
Qwen's early-stop sentence and `</think>`, and the answer follows. Checked on every request of a
batch (reasoning tokens <= budget + the closing, content never empty), through `LLM.generate` and
through the server (per request, and `--reasoning-budget` per server), streamed and whole alike.
The model is tiny and random, behind a thinking template that opens `<think>` in the prompt."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import qwenkit
from qwenkit.engine import EngineSettings
from qwenkit.engine.llm import LLM
from qwenkit.engine.sampling_params import SamplingParams
from qwenkit.engine.structured import CLOSE_THINKING
from test_engine import tiny_model
from test_server import VOCAB, Server, write_tokenizer

pytest.importorskip("llguidance")
MESSAGES = [{"role": "user", "content": "Think about it"}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """Qwen3's template, opening the thought in the generation prompt (as Qwen3 thinking models do)."""
    root = write_tokenizer(tmp_path_factory.mktemp("tok"))
    config = json.loads((root / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace("'<|im_start|>assistant\\n'",
                                                              "'<|im_start|>assistant\\n<think>\\n'")
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    tok = qwenkit.load_tokenizer(root)
    assert tok.apply_chat_template(MESSAGES, tokenize=True)[-2] == tok.special_tokens["<think>"]
    return tok


@pytest.fixture(scope="module")
def model():
    m = tiny_model(vocab_size=VOCAB, max_position_embeddings=2048, seed=3)
    m.eos_token_ids = [258, 256]
    return m


def test_every_request_keeps_to_its_budget_and_answers(model, tokenizer):
    llm = LLM(model, tokenizer, num_blocks=800, block_size=8)
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=True)
    close, n_close = tokenizer.special_tokens["</think>"], len(tokenizer.encode(CLOSE_THINKING))
    budgets = [0, 1, 3, 8, 20, 40, 2, 5]
    params = [SamplingParams(max_tokens=170, temperature=1.0, seed=i, thinking_budget=b) for i, b in enumerate(budgets)]
    for budget, out in zip(budgets, llm.generate([prompt] * len(budgets), params)):
        assert close in out.token_ids, out.text  # the thought was closed (by the model or for it)
        thought = out.token_ids[:out.token_ids.index(close)]
        assert len(thought) <= budget + n_close
        answer = tokenizer.decode(out.token_ids[out.token_ids.index(close) + 1:], skip_special_tokens=True)
        assert answer.strip(), out.text


def test_a_budget_leaves_room_to_answer_within_max_tokens(model, tokenizer):
    llm = LLM(model, tokenizer, num_blocks=800, block_size=8)
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=True)
    n_close = len(tokenizer.encode(CLOSE_THINKING))
    out = llm.generate(prompt, SamplingParams(max_tokens=n_close + 3, temperature=1.0, seed=1, thinking_budget=500))[0]
    close = tokenizer.special_tokens["</think>"]
    assert close in out.token_ids and out.token_ids.index(close) < len(out.token_ids) - 1
    with pytest.raises(qwenkit.errors.RequestError, match="max_tokens"):
        llm.generate(prompt, SamplingParams(max_tokens=n_close, thinking_budget=5))


@pytest.fixture(scope="module")
def server(model, tokenizer):
    s = Server(model, tokenizer, EngineSettings(block_size=8, num_blocks=800), reasoning_budget=12)
    yield s
    s.close()


def split(server, stream: bool, **kw) -> tuple[str, str]:
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=150, temperature=1.0, **kw)
    if not stream:
        m = server.client.chat.completions.create(**kw).choices[0].message
        return getattr(m, "reasoning_content", None) or "", m.content or ""
    chunks = [c.choices[0].delta for c in server.client.chat.completions.create(**kw, stream=True) if c.choices]
    return ("".join(getattr(d, "reasoning_content", None) or "" for d in chunks),
            "".join(d.content or "" for d in chunks))


def test_server_splits_the_same_streamed_and_whole(server, tokenizer):
    sentence = CLOSE_THINKING.split("</think>")[0].strip()
    for seed in range(2):
        for extra in ({"thinking_budget": 5}, {}):  # the request's budget, then the server's (12)
            whole = split(server, False, seed=seed, extra_body=extra)
            assert split(server, True, seed=seed, extra_body=extra) == whole
            reasoning, content = whole
            assert content.strip(), whole
            if reasoning.endswith(sentence):  # closed for the model: the thought stopped at the budget
                thought = reasoning[:-len(sentence)]
                for marker in tokenizer.special_tokens:  # one token each; any other char is at most a byte
                    thought = thought.replace(marker, "x")
                assert len(thought) <= (5 if extra else 12) + 2, reasoning


def test_reasoning_budget_flag_is_checked_before_loading():
    r = subprocess.run([sys.executable, "-m", "qwenkit.cli", "serve", "--model", "missing-model", "--reasoning-budget",
                        "-2"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--reasoning-budget -2: must be >= 0" in r.stderr and "Traceback" not in r.stderr
