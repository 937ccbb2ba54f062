"""Hugging Face checkpoint directories: config.json plus model.safetensors or indexed shards.

Every weight file's header is checked when the directory is opened (length, JSON, and that the
file is as long as its header says), so a truncated download fails at once with the file's name
instead of part-way through loading. Tensors are then read lazily, one at a time.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError, ConfigError
from . import Checkpoint, TensorStream

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces


def open_safetensors_dir(directory: Path) -> Checkpoint:
    config = read_json(directory / "config.json", ConfigError, required=True)
    files = weight_files(directory)
    headers = [check_safetensors_file(f) for f in files]
    generation = read_json(directory / "generation_config.json", ConfigError, required=False) or {}
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    return Checkpoint(
        config=config,
        source=str(directory),
        eos_token_ids=as_id_list(eos),
        read_tensors=lambda: _stream(files),
        stored=_stored(headers),
    )


STORED = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _stored(headers: list[dict]) -> str:
    """The widest dtype among the files' matrices (F32 norms beside bf16 matrices: "bfloat16")."""
    kinds = {v["dtype"] for h in headers for k, v in h.items() if k != "__metadata__" and len(v["shape"]) > 1}
    for kind in ("F32", "F16", "BF16"):
        if kind in kinds:
            return STORED[kind]
    return "float32"


def read_json(path: Path, error: type[Exception], required: bool) -> dict | None:
    """A JSON object from `path`; None when optional and absent."""
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: file not found (a checkpoint directory needs a config.json)")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def as_id_list(value) -> list[int]:
    """eos_token_id is an int in some configs and a list in others."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint, in shard order."""
    index = directory / INDEX_NAME
    if index.is_file():
        return _indexed_shards(index)
    if (directory / SINGLE_NAME).is_file():
        return [directory / SINGLE_NAME]
    found = sorted(directory.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{directory}: no weights found (no {SINGLE_NAME}, {INDEX_NAME} or *.safetensors)")
    return found


def _indexed_shards(index: Path) -> list[Path]:
    weight_map = read_json(index, CheckpointError, required=True).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: has no 'weight_map'")
    shards = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{shard}: shard listed in {index.name} is missing")
    return shards


def check_safetensors_file(path: Path) -> dict:
    """The header of a safetensors file, after checking the file is whole."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{path}: corrupt safetensors file (header length {n} does not fit in {size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors file (header is not a JSON object)")
    end = 8 + n + _data_length(path, header)
    if end > size:
        raise CheckpointError(f"{path}: truncated safetensors file (header needs {end} bytes, file has {size})")
    return header


def _data_length(path: Path, header: dict) -> int:
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (KeyError, IndexError, TypeError, ValueError):
        raise CheckpointError(f"{path}: corrupt safetensors file (a header entry lacks data_offsets)") from None
    return max(ends, default=0)


def _stream(files: list[Path]) -> TensorStream:
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, _get(f, path, name), str(path)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None


def _get(f, path: Path, name: str):
    try:
        return f.get_tensor(name)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from None
