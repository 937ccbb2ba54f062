"""The `Tokenizer`: encode/decode on a Rust `tokenizers` backend, plus chat templates.

Encoding runs on tiktoken when it is installed and gives the same ids (see fast.py).
Two backends share one vocabulary: the full one matches added tokens (`<|im_end|>`, `<think>`)
in text, the plain one has no added tokens, so untrusted text can never become a control token.
"""

import os
from functools import cached_property

from tokenizers import Tokenizer as Backend

from ..errors import TokenizerError
from . import chat
from .bpe import unicode_to_byte
from .fast import TiktokenEngine, tiktoken_engine
from .stream import StreamDecoder


class Tokenizer:
    """A Qwen tokenizer: `encode`, `decode`, `stream`, `apply_chat_template`."""

    def __init__(self, backend: Backend, *, chat_template: str | None = None,
                 eos_token_ids: list[int] = (), bos_token_id: int | None = None,
                 pad_token_id: int | None = None, template_vars: dict[str, str] | None = None,
                 source: str = "", template_is_builtin: bool = False):
        self._backend = backend
        self._plain = _without_added_tokens(backend)
        added = backend.get_added_tokens_decoder()
        # All added tokens (matched whole in text) and the subset flagged special (control tokens,
        # dropped by `decode(skip_special_tokens=True)`).
        self.special_tokens: dict[str, int] = {t.content: i for i, t in sorted(added.items())}
        self.control_token_ids = frozenset(i for i, t in added.items() if t.special)
        self.chat_template = chat_template or chat.CHATML_TEMPLATE
        # False for ChatML and for a built-in template: the checkpoint shipped none.
        self.has_own_chat_template = chat_template is not None and not template_is_builtin
        self.eos_token_ids = list(eos_token_ids)
        self.bos_token_id, self.pad_token_id = bos_token_id, pad_token_id
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.source = source
        self.engine = "auto"  # or "tokenizers": never use the tiktoken engine
        # bos_token/eos_token/... strings the template may read, as transformers passes them.
        self._template_vars = dict(template_vars or {})

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size})"

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def backend(self) -> Backend:
        """The underlying `tokenizers.Tokenizer` (for batch work and benchmarks)."""
        return self._backend

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids; with `allow_special=False` added-token strings are encoded as plain text."""
        if self._fast:
            return self._fast.encode(text, allow_special)
        backend = self._backend if allow_special else self._plain
        return backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], allow_special: bool = True) -> list[list[int]]:
        """`encode` over many texts, in parallel on all cores."""
        if self._fast:
            return self._fast.encode_batch(list(texts), allow_special)
        backend = self._backend if allow_special else self._plain
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]

    @cached_property
    def _fast(self) -> TiktokenEngine | None:
        """tiktoken, when installed and provably the same BPE (built on first use: ~1 s)."""
        if self.engine != "auto":
            return None
        return tiktoken_engine(self._backend, threads=os.cpu_count() or 1)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of the ids; ids outside the vocabulary add nothing, as in `tokenizers`."""
        try:
            return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        except (OverflowError, TypeError) as e:
            raise TokenizerError(f"token ids must be non-negative ints ({e})") from e

    def id_to_token(self, token_id: int) -> str | None:
        """The token's spelling in the vocabulary (byte-level alphabet, e.g. 'Ġhello')."""
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def stream(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """An incremental detokenizer whose pieces join to `decode(ids, skip_special_tokens)`."""
        return StreamDecoder(self._id_bytes, self.control_token_ids if skip_special_tokens else frozenset())

    @cached_property
    def _id_bytes(self) -> list[bytes]:
        table = unicode_to_byte()
        out = []
        for i in range(self.vocab_size):
            token = self._backend.id_to_token(i) or ""
            # Same rule as the ByteLevel decoder: a token outside the byte alphabet is its UTF-8.
            if all(c in table for c in token):
                out.append(bytes(table[c] for c in token))
            else:
                out.append(token.encode("utf-8"))
        return out

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, tools: list[dict] | None = None,
                            enable_thinking: bool | None = None, **kwargs) -> str | list[int]:
        """Render a conversation; with `tokenize=True`, ids in which strings from `messages`,
        `tools` and `kwargs` can never produce the template's control tokens."""
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        render = dict(template=self.chat_template, messages=messages, tools=tools,
                      add_generation_prompt=add_generation_prompt,
                      **{**self._template_vars, **kwargs})
        if not tokenize:
            return chat.render(**render)
        return chat.encode_chat(self, **render)

    def encode_chat(self, messages: list[dict], **kwargs) -> list[int]:
        """`apply_chat_template(messages, tokenize=True, ...)`: the injection-safe prompt ids."""
        return self.apply_chat_template(messages, tokenize=True, **kwargs)


def _without_added_tokens(backend: Backend) -> Backend:
    """The same pipeline with no added tokens, so they tokenise as their text.

    The model, normalizer and pre-tokenizer objects are shared (reference-counted on the Rust
    side), so this costs nothing, unlike a JSON round trip of a 150k-token vocabulary.
    """
    plain = Backend(backend.model)
    plain.normalizer = backend.normalizer
    plain.pre_tokenizer = backend.pre_tokenizer
    plain.decoder = backend.decoder
    return plain
