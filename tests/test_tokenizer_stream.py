"""The streaming detokenizer: pieces join to `decode`, and no piece ends in half a character."""

import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwenkit.tokenizer import load_tokenizer
from test_tokenizer_support import corpus, default_gguf

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_gguf())


def _stream(tok, ids, skip=False):
    stream = tok.stream(skip_special_tokens=skip)
    return [stream.push(i) for i in ids] + [stream.flush()]


def test_cjk_and_emoji_split_across_tokens(tok):
    for text in ["龘靐齉", "鱻麤 and 中文", "👩‍👩‍👧‍👦🏳️‍🌈🇯🇵", "𝔘𝔫𝔦"]:
        ids = tok.encode(text)
        # Byte-level BPE cuts these characters inside their UTF-8 bytes ...
        assert any("\ufffd" in tok.decode([i]) for i in ids), text
        pieces = _stream(tok, ids)
        # ... but the stream never shows a broken character, and joins to the text.
        assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_corpus_streams_to_decode(tok):
    for text in corpus():
        ids = tok.encode(text)
        assert "".join(_stream(tok, ids)) == tok.decode(ids)
        assert "".join(_stream(tok, ids, skip=True)) == tok.decode(ids, skip_special_tokens=True)


@SETTINGS
@given(ids=st.lists(st.integers(0, 151935), max_size=40))
def test_any_id_sequence_streams_to_decode(tok, ids):
    # Random ids make invalid UTF-8 too; the stream replaces it exactly as decode does.
    assert "".join(_stream(tok, ids)) == tok.decode(ids)
    assert "".join(_stream(tok, ids, skip=True)) == tok.decode(ids, skip_special_tokens=True)


@SETTINGS
@given(text=st.text(max_size=60))
def test_any_text_round_trips_through_the_stream(tok, text):
    ids = tok.encode(text, allow_special=False)
    assert "".join(_stream(tok, ids)) == unicodedata.normalize("NFC", text)
