"""Incremental detokenisation: text out as tokens arrive, never half a UTF-8 character.

Byte-level BPE tokens are byte strings, so a character can straddle tokens (CJK, emoji). We
keep the bytes and let Python's incremental UTF-8 decoder hold back an unfinished character;
its `replace` handling matches the lossy decode of `tokenizers`, so the pieces join to exactly
`Tokenizer.decode(ids)`.
"""

import codecs
from collections.abc import Iterable


class StreamDecoder:
    """`push(id)` returns the text that became final; `flush()` returns the rest."""

    def __init__(self, id_bytes: list[bytes], skip_ids: frozenset[int] = frozenset()):
        self._id_bytes = id_bytes
        self._skip_ids = skip_ids
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if token_id in self._skip_ids or not 0 <= token_id < len(self._id_bytes):
            return ""  # as `decode` does: skipped and unknown ids add no text
        return self._utf8.decode(self._id_bytes[token_id])

    def push_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.push(i) for i in token_ids)

    def flush(self) -> str:
        """End of stream: an unfinished character becomes U+FFFD, as in `decode`."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
