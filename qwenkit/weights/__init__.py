"""Checkpoint readers: one interface over Hugging Face safetensors directories and GGUF files.

`open_checkpoint(path)` returns a `Checkpoint` whose `config` is a config.json-style dict with
Hugging Face field names and whose `tensors()` yields `(hf_name, tensor, file)` one tensor at a
time, so a loader never holds a second copy of the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..errors import CheckpointError

TensorStream = Iterator[tuple[str, torch.Tensor, str]]


@dataclass
class Checkpoint:
    config: dict  # config.json-style, Hugging Face field names
    source: str  # the file or directory, for messages
    eos_token_ids: list[int]
    read_tensors: Callable[[], TensorStream] = field(repr=False, compare=False)
    # How the matrices are stored: "float32", "bfloat16", "float16", or "quantized" (a GGUF's
    # 4-8 bit blocks); `--dtype auto` keeps the weights at most this precise.
    stored: str = "float32"

    def tensors(self) -> TensorStream:
        """(HF tensor name, tensor, file it came from), one at a time."""
        return self.read_tensors()


def open_checkpoint(path: str | Path) -> Checkpoint:
    """A Hugging Face checkpoint directory or a .gguf file."""
    # Imported here so the readers can import Checkpoint from this package without a cycle.
    from . import gguf, safetensors

    path = Path(path).expanduser()
    if path.is_dir():
        return safetensors.open_safetensors_dir(path)
    if path.is_file():
        if path.suffix == ".gguf" or gguf.has_gguf_magic(path):
            return gguf.open_gguf(path)
        raise CheckpointError(f"{path}: not a checkpoint directory or a .gguf file")
    raise CheckpointError(f"{path}: no such file or directory")


__all__ = ["Checkpoint", "CheckpointError", "open_checkpoint"]
