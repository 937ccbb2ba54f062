"""Byte-level BPE backends (Rust `tokenizers`) built from a vocabulary and merges.

Every Qwen tokenizer is the same machine: NFC normalisation, Qwen's pre-tokenisation regex,
GPT-2's byte-to-unicode alphabet, then BPE. Only where the vocabulary comes from differs
(tokenizer.json, vocab.json + merges.txt, a tiktoken rank file, GGUF metadata).
"""

from functools import cache

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from ..errors import TokenizerError

# Qwen2/2.5/3 split: unlike GPT-2/Llama-3 it takes digits one at a time (`\p{N}`, not `\p{N}{1,3}`).
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the spelling of BPE tokens)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


@cache
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def spell_bytes(raw: bytes) -> str:
    """Bytes as a byte-level BPE token string."""
    table = byte_to_unicode()
    return "".join(table[b] for b in raw)


def token_bytes(token: str) -> bytes:
    """The bytes a byte-level token string stands for (inverse of `spell_bytes`)."""
    table = unicode_to_byte()
    return bytes(table[c] for c in token)


def build_backend(vocab: dict[str, int], merges: list[tuple[str, str]],
                  added: list[tuple[str, int, bool]]) -> Backend:
    """A Qwen byte-level BPE tokenizer; `added` is (content, id, special) in any order."""
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    add_tokens(backend, added)
    return backend


def add_tokens(backend: Backend, added: list[tuple[str, int, bool]]) -> None:
    """Register added tokens, checking each lands on the id the checkpoint gives it.

    `tokenizers` assigns an added token the id it has in the vocabulary, else the next free id,
    so adding in id order reproduces a contiguous table; anything else is a broken file.
    """
    for content, token_id, special in sorted(added, key=lambda t: t[1]):
        token = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False)
        (backend.add_special_tokens if special else backend.add_tokens)([token])
        got = backend.token_to_id(content)
        if got != token_id:
            raise TokenizerError(f"added token {content!r} should have id {token_id}, got {got}")
