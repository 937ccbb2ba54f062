"""The GGUF header (metadata and tensor table), parsed straight from the mapped file.

Parsed here rather than with `gguf.GGUFReader`: the reader builds numpy views for every one of
the ~300k tokenizer strings and takes about 16 s on a 0.5B model, this parser well under a
second. Every length is checked against the end of the file before it is trusted.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import CheckpointError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: fastest-varying first, the reverse of numpy's
    qtype: GGMLQuantizationType
    offset: int  # absolute, in bytes
    nbytes: int

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.dims))


@dataclass(frozen=True)
class GGUFHeader:
    metadata: dict
    tensors: list[TensorInfo]


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6


def read_header(path: Path) -> GGUFHeader:
    size = path.stat().st_size
    if size < 24:
        raise CheckpointError(f"{path}: not a GGUF file (only {size} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != MAGIC:
            raise CheckpointError(f"{path}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
        try:
            return _parse(_Cursor(buf, path))
        except (struct.error, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: truncated or corrupt GGUF header ({e})") from None


def _parse(cur: "_Cursor") -> GGUFHeader:
    version, n_tensors, n_kv = cur.take("<4xIQQ")
    if version & 0xFFFF == 0:
        raise CheckpointError(f"{cur.path}: big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise CheckpointError(f"{cur.path}: GGUF version {version} is not supported (2 and 3 are)")
    cur.need(n_kv * 12 + n_tensors * 24)  # the smallest possible entries, before trusting counts
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.take("<I")[0])
    infos = [cur.tensor_info() for _ in range(n_tensors)]
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    if alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(f"{cur.path}: bad general.alignment {alignment}")
    start = -(-cur.pos // alignment) * alignment
    return GGUFHeader(metadata, [_tensor(cur, alignment, start, *info) for info in infos])


def _tensor(cur: "_Cursor", alignment: int, start: int, name: str, dims: tuple, raw_type: int, rel: int) -> TensorInfo:
    where = f"{cur.path}: tensor {name!r}"
    try:
        qtype = GGMLQuantizationType(raw_type)
    except ValueError:
        raise CheckpointError(f"{where} has unknown quant type {raw_type}") from None
    block, type_size = GGML_QUANT_SIZES[qtype]
    if not dims or dims[0] % block or rel % alignment:
        raise CheckpointError(f"{where} has a corrupt shape {list(dims)} or offset {rel} for {qtype.name}")
    nbytes = int(np.prod(dims, dtype=np.int64)) // block * type_size
    if start + rel + nbytes > len(cur.buf):
        raise CheckpointError(f"{where}: file is truncated (data ends at {start + rel + nbytes}, file has {len(cur.buf)} bytes)")
    return TensorInfo(name, dims, qtype, start + rel, nbytes)


class _Cursor:
    """Reads little-endian GGUF values from a byte buffer, checking every length against its end."""

    def __init__(self, buf, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise struct.error(f"needs {n} bytes at offset {self.pos}, file has {len(self.buf)}")

    def take(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        (n,) = self.take("<Q")
        self.need(n)
        self.pos += n
        return str(self.buf[self.pos - n : self.pos], "utf-8")

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            return self.array()
        if kind not in _SCALARS:
            raise struct.error(f"unknown value type {kind} at offset {self.pos}")
        (v,) = self.take(_SCALARS[kind])
        # A decimal written as float32 (1e-6) reads back as its float32 neighbour; its
        # shortest float32 spelling recovers the value the converter wrote.
        return float(str(np.float32(v))) if kind == _FLOAT32 else v

    def array(self) -> list:
        kind, n = self.take("<IQ")
        if kind == _STRING:
            self.need(n * 8)
            return [self.string() for _ in range(n)]
        if kind == _ARRAY:
            return [self.array() for _ in range(n)]
        if kind not in _SCALARS:
            raise struct.error(f"unknown array type {kind} at offset {self.pos}")
        dtype = np.dtype(_SCALARS[kind])
        self.need(n * dtype.itemsize)
        values = np.frombuffer(self.buf, dtype, n, self.pos).tolist()
        self.pos += n * dtype.itemsize
        return values

    def tensor_info(self) -> tuple:
        name = self.string()
        (n_dims,) = self.take("<I")
        dims = self.take(f"<{n_dims}Q")
        raw_type, rel = self.take("<IQ")
        return name, tuple(dims), raw_type, rel
