"""Qwen tokenizers (byte-level BPE on Rust `tokenizers`), chat templates and output parsing."""

from .load import load_tokenizer
from .stream import StreamDecoder
from .tokenizer import Tokenizer

__all__ = ["load_tokenizer", "Tokenizer", "StreamDecoder"]
