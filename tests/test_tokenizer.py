"""The Tokenizer API on the default model's GGUF: ids, specials, eos, streaming, templates."""

import pytest

from qwenkit.errors import QwenkitError, TokenizerError
from qwenkit.tokenizer import load_tokenizer
from test_tokenizer_support import default_gguf


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_gguf())


def test_gguf_specials_and_eos(tok):
    assert tok.special_tokens["<|endoftext|>"] == 151643
    assert tok.special_tokens["<|im_start|>"] == 151644
    assert tok.special_tokens["<|im_end|>"] == 151645
    assert tok.special_tokens["<|file_sep|>"] == 151664
    assert tok.eos_token_ids == [151645, 151643]
    assert tok.bos_token_id == tok.pad_token_id == 151643
    assert tok.vocab_size == 151936
    assert tok.token_to_id("<|im_end|>") == 151645 and tok.id_to_token(151645) == "<|im_end|>"


def test_encode_decode_roundtrip(tok):
    text = "def f(x):\n\treturn x * 12345  # 你好 🤷🏽‍♀️\r\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "a"]) == [ids, tok.encode("a")]


def test_special_strings_follow_allow_special(tok):
    text = "a<|im_end|>b"
    assert 151645 in tok.encode(text)
    plain = tok.encode(text, allow_special=False)
    assert not set(plain) & tok.control_token_ids
    assert tok.decode(plain) == text


def test_decode_of_bad_ids(tok):
    assert tok.decode([9707, 10**6, 9707]) == "HelloHello"  # unknown ids add nothing, as in tokenizers
    with pytest.raises(TokenizerError):
        tok.decode([-1])


def test_decode_skips_control_tokens(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_stream_pieces_join_to_decode(tok):
    text = "汉字と絵文字👩‍👩‍👧‍👦 and ñ"
    ids = tok.encode(text)
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_chat_template_from_gguf(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.startswith("<|im_start|>system\nYou are Qwen")
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True) == tok.encode(text)


def test_missing_files_are_errors(tmp_path):
    with pytest.raises(QwenkitError):  # an unknown id is the resolver's CheckpointError
        load_tokenizer(tmp_path / "nothing-here")
    with pytest.raises(TokenizerError):
        load_tokenizer(tmp_path)


def test_load_by_model_id(tok):
    hub = pytest.importorskip("qwenkit.weights.hub")
    by_id = load_tokenizer(hub.DEFAULT_MODEL)
    assert by_id.source == tok.source and by_id.encode("hi there") == tok.encode("hi there")
