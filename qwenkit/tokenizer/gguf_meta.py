"""Read the key/value metadata of a GGUF file, and nothing else.

`gguf.GGUFReader` maps every tensor and wraps each of the ~300k tokenizer strings in numpy
views, which takes ~15 s on a small CPU; the tokenizer only needs the header, which a plain
struct walk reads in well under a second.
"""

import mmap
import struct
from pathlib import Path

import numpy as np

from ..errors import TokenizerError

_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
# GGUF value type -> (struct format, size); little-endian, as every released file is.
_SCALARS = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
          10: "<u8", 11: "<i8", 12: "<f8"}


class _Cursor:
    """A read position in the mapped file."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str, size: int):
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q", 8)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        # Some converters wrote invalid UTF-8 into token strings; keep them readable.
        return str(raw, "utf-8", "replace")

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            return self.array()
        if kind not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {kind}")
        return self.unpack(*_SCALARS[kind])

    def array(self):
        kind, n = self.unpack("<I", 4), self.unpack("<Q", 8)
        if kind in _NUMPY:
            size = np.dtype(_NUMPY[kind]).itemsize
            out = np.frombuffer(self.buf, _NUMPY[kind], n, self.pos).tolist()
            self.pos += n * size
            return [bool(x) for x in out] if kind == 7 else out
        return [self.value(kind) for _ in range(n)]


def read_gguf_metadata(path: str | Path) -> dict:
    """All metadata key/values of a GGUF file (arrays as Python lists)."""
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf, path)
    except (OSError, ValueError, struct.error, IndexError) as e:
        raise TokenizerError(f"{path}: cannot read GGUF metadata ({e})") from e


def _parse(buf, path: Path) -> dict:
    if buf[:4] != _MAGIC:
        raise TokenizerError(f"{path}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
    cur = _Cursor(memoryview(buf))
    cur.pos = 4
    version = cur.unpack("<I", 4)
    if version not in (2, 3):
        raise TokenizerError(f"{path}: unsupported GGUF version {version}")
    cur.unpack("<Q", 8)  # tensor count: the tokenizer has no use for tensors
    n_kv = cur.unpack("<Q", 8)
    meta = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.unpack("<I", 4))
    cur.buf.release()
    return meta
