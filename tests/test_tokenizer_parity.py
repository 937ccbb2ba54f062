"""Exact ids and text against the reference tokenizers on a multilingual corpus.

References: transformers on Qwen3's official tokenizer.json and on the default model's GGUF,
tiktoken on Qwen's rank file. Every corpus string is also checked in NFD form.
"""

import shutil
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwenkit.tokenizer import load_tokenizer
from test_tokenizer_support import QWEN3_FILES, QWEN_TIKTOKEN, corpus, default_gguf, pypi_data

transformers = pytest.importorskip("transformers")

TEXTS = corpus() + [unicodedata.normalize("NFD", s) for s in corpus()]


def _check_same(ours, ref, texts=TEXTS, normalize=lambda s: s):
    for text in texts:
        ids = ours.encode(text)
        assert ids == ref.encode(normalize(text), add_special_tokens=False), text
        assert ours.decode(ids) == ref.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text


@pytest.fixture(scope="module")
def qwen3_dir():
    return pypi_data(*QWEN3_FILES)


@pytest.fixture(scope="module")
def qwen3(qwen3_dir):
    return load_tokenizer(qwen3_dir)


@pytest.fixture(scope="module")
def gguf_tok():
    return load_tokenizer(default_gguf())


def test_corpus_is_broad():
    import json

    from test_tokenizer_support import DATA

    data = json.loads((DATA / "corpus.json").read_text(encoding="utf-8"))
    assert len(data["strings"]) >= 150 and len(data["languages"]) >= 29


def test_tokenizer_json_matches_transformers(qwen3, qwen3_dir):
    ref = transformers.AutoTokenizer.from_pretrained(qwen3_dir)
    _check_same(qwen3, ref)
    assert qwen3.special_tokens == {t.content: i for i, t in ref.added_tokens_decoder.items()}
    assert qwen3.eos_token_ids == [ref.eos_token_id]


def test_vocab_and_merges_match_tokenizer_json(qwen3, qwen3_dir, tmp_path):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(qwen3_dir / name, tmp_path / name)
    from_files = load_tokenizer(tmp_path)
    assert from_files.special_tokens == qwen3.special_tokens
    assert from_files.control_token_ids == qwen3.control_token_ids
    for text in TEXTS:
        assert from_files.encode(text) == qwen3.encode(text), text


def test_tiktoken_rank_file_matches_tiktoken(gguf_tok):
    tiktoken = pytest.importorskip("tiktoken")
    from qwenkit.tokenizer.bpe import QWEN_PRETOKENIZE_REGEX
    from qwenkit.tokenizer.sources import read_tiktoken_ranks

    path = pypi_data(*QWEN_TIKTOKEN)
    ref = tiktoken.Encoding("qwen", pat_str=QWEN_PRETOKENIZE_REGEX,
                            mergeable_ranks=read_tiktoken_ranks(path), special_tokens={})
    ours = load_tokenizer(path)
    for text in TEXTS:
        ids = ours.encode(text, allow_special=False)
        # tiktoken has no normaliser; Qwen's tokenizers normalise to NFC first.
        assert ids == ref.encode(unicodedata.normalize("NFC", text), disallowed_special=()), text
        # The rank file is Qwen2.5's vocabulary: same ids as the GGUF, specials included.
        assert ours.encode(text) == gguf_tok.encode(text), text
    gguf_added = {t: i for t, i in gguf_tok.special_tokens.items() if i < ours.vocab_size}
    assert ours.special_tokens == gguf_added


@pytest.mark.slow
def test_gguf_matches_transformers_gguf(gguf_tok):
    path = default_gguf()
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # transformers' GGUF loader builds a GPT-2 pipeline without Qwen's NFC normaliser, so it
    # gets NFC text; the official tokenizer.json (with NFC) is checked in the next test.
    _check_same(gguf_tok, ref, normalize=lambda s: unicodedata.normalize("NFC", s))
    assert gguf_tok.vocab_size == len(ref)


def test_gguf_matches_official_tokenizer_json(gguf_tok, qwen3):
    # Qwen3 kept Qwen2.5's vocabulary and added <tool_response>, <think> and their closers.
    qwen3_only = ("<think>", "</think>", "<tool_response>", "</tool_response>")
    for text in TEXTS:
        if not any(t in text for t in qwen3_only):
            assert gguf_tok.encode(text) == qwen3.encode(text), text


@pytest.fixture(scope="module")
def engines():
    pytest.importorskip("tiktoken")
    fast, slow = load_tokenizer(default_gguf()), load_tokenizer(default_gguf(), engine="tokenizers")
    assert fast._fast is not None and slow._fast is None
    return fast, slow


def test_tiktoken_engine_matches_tokenizers_engine(engines):
    fast, slow = engines
    for allow in (True, False):
        assert fast.encode_batch(TEXTS, allow_special=allow) == slow.encode_batch(TEXTS, allow_special=allow)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=80) | st.lists(
    st.sampled_from(["<|im_end|>", "<think>", " ", "\n", "\r\n", "\t", "a", "é", "e\u0301", "中", "🙂", "123", "'s"]),
    max_size=20).map("".join))
def test_engines_agree_on_any_text(engines, text):
    fast, slow = engines
    assert fast.encode(text) == slow.encode(text)
    assert fast.encode(text, allow_special=False) == slow.encode(text, allow_special=False)
