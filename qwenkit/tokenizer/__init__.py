"""Qwen tokenizers (byte-level BPE on Rust `tokenizers`), chat templates and reply parsing."""

from .load import load_tokenizer
from .output import OutputDelta, OutputStream, ParsedOutput, parse_output
from .reasoning import split_reasoning
from .stream import StreamDecoder
from .tokenizer import Tokenizer
from .tools import parse_tool_calls

__all__ = ["load_tokenizer", "Tokenizer", "StreamDecoder", "parse_output", "OutputStream", "OutputDelta",
           "ParsedOutput", "parse_tool_calls", "split_reasoning"]
