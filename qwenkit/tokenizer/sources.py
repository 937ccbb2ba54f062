"""Backends from each file format a Qwen vocabulary ships in.

Each `from_*` returns a `tokenizers.Tokenizer` with every added token at its checkpoint id.
"""

import base64
import json
from pathlib import Path

from tokenizers import Tokenizer as Backend

from ..errors import TokenizerError
from .bpe import byte_to_unicode, build_backend, spell_bytes

# Qwen2.5's added tokens after the 151,643 BPE tokens: (content, special). The first 14 are
# control tokens; the rest are matched whole but kept by `decode(skip_special_tokens=True)`.
QWEN25_ADDED = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
]
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4
_GGUF_PRE = {"qwen2"}  # llama.cpp's name for Qwen's split regex


def from_tokenizer_json(path: Path) -> Backend:
    try:
        return Backend.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception on any malformed file
        raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from e


def qwen25_added(first_id: int) -> list[tuple[str, int, bool]]:
    return [(content, first_id + k, special) for k, (content, special) in enumerate(QWEN25_ADDED)]


def from_vocab_merges(vocab_path: Path, merges_path: Path,
                      added: list[tuple[str, int, bool]] | None) -> Backend:
    """GPT-2 style `vocab.json` + `merges.txt`; `added` defaults to Qwen2.5's table."""
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{vocab_path.parent}: cannot read vocab.json/merges.txt ({e})") from e
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    if any(len(m) != 2 for m in merges):
        raise TokenizerError(f"{merges_path}: every merge must be two tokens separated by a space")
    return build_backend(vocab, merges, added if added is not None else qwen25_added(len(vocab)))


def from_tiktoken(path: Path, added: list[tuple[str, int, bool]] | None = None) -> Backend:
    """A tiktoken rank file (`qwen.tiktoken`): one `base64(token bytes) rank` per line."""
    ranks = read_tiktoken_ranks(path)
    vocab = {spell_bytes(raw): rank for raw, rank in ranks.items()}
    merges = merges_from_ranks(ranks)
    return build_backend(vocab, merges, added if added is not None else qwen25_added(len(ranks)))


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    try:
        for n, line in enumerate(path.read_text(encoding="ascii").splitlines(), 1):
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: not a tiktoken rank file ({e})") from e
    return ranks


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to tiktoken's rule (merge the adjacent pair whose join ranks lowest).

    Every split of a token into two ranked halves becomes a merge, ordered by the rank of the
    token they make, so the BPE model always applies the lowest-ranked join first.
    """
    found = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                found.append((rank, ranks[left], ranks[right], left, right))
    found.sort()
    return [(spell_bytes(left), spell_bytes(right)) for *_, left, right in found]


def from_gguf_metadata(meta: dict, path: Path) -> Backend:
    """llama.cpp's tokenizer keys: tokens (already byte-level spelled), token_type, merges."""
    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
    if model != "gpt2" or pre not in _GGUF_PRE:
        raise TokenizerError(f"{path}: tokenizer {model!r}/{pre!r} is not a Qwen byte-level BPE "
                             f"(want 'gpt2'/{sorted(_GGUF_PRE)})")
    tokens = meta.get("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens or ())
    merges = meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None or len(types) != len(tokens):
        raise TokenizerError(f"{path}: GGUF tokenizer metadata lacks tokens, token_type or merges")
    vocab = {t: i for i, t in enumerate(tokens)}
    alphabet = set(byte_to_unicode().values())
    added = [(t, i, kind == _GGUF_CONTROL) for i, (t, kind) in enumerate(zip(tokens, types))
             # A control token spelled outside the byte alphabet is a converter mislabel.
             if kind == _GGUF_USER_DEFINED or (kind == _GGUF_CONTROL and set(t) <= alphabet)]
    pairs = [tuple(m.split(" ")) for m in merges]
    return build_backend(vocab, pairs, added)
