"""GGUF files of the qwen2, qwen2moe, qwen3 and qwen3moe architectures, and of the hybrid qwen3next,
qwen35 and qwen35moe (`gguf_hybrid.py`), read as HF checkpoints.

The header comes from `gguf_header.py`; the `gguf` package supplies the type tables and the
dequantization kernels.
Tensors are dequantized to float32 one at a time, renamed to the Hugging Face names and shapes.
"""

from __future__ import annotations

import functools
import math
import mmap
import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from ..errors import CheckpointError
from . import Checkpoint, TensorStream, gguf_hybrid
from .gguf_header import MAGIC, GGUFHeader, TensorInfo, read_header  # noqa: F401 (re-exported)

MODEL_TYPES = {"qwen2": "qwen2", "qwen2moe": "qwen2_moe", "qwen3": "qwen3", "qwen3moe": "qwen3_moe",
               **gguf_hybrid.ARCHS}
# Tokens llama.cpp treats as end of generation besides the file's eos id.
END_TOKENS = (b"<|im_end|>", b"<|endoftext|>")

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# Stacked experts keep GGUF's [E, out, in] layout and carry no ".weight" suffix.
EXPERT_NAMES = {
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


# ---- public ------------------------------------------------------------------------------------
def has_gguf_magic(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def gguf_metadata(path: str | Path) -> dict:
    """Every key/value of a GGUF file as plain Python values (strings decoded, arrays as lists)."""
    return read_header(Path(path)).metadata


def open_gguf(path: str | Path) -> Checkpoint:
    path = Path(path)
    header = read_header(path)
    config = config_from_gguf(header, path)
    arch = header.metadata["general.architecture"]
    restore = None
    names = {t.name: hf_name(t.name, path) for t in header.tensors} if arch not in gguf_hybrid.ARCHS else \
        {t.name: gguf_hybrid.hf_name(t.name, config["num_hidden_layers"], lambda n: hf_name(n, path))
         for t in header.tensors}
    if arch in gguf_hybrid.ARCHS:
        restore = lambda name, tensor: gguf_hybrid.restore(name, tensor, arch, config)  # noqa: E731
    for t in header.tensors:
        _check_dequantizable(t, path)
    return Checkpoint(
        config=config,
        source=str(path),
        eos_token_ids=eos_token_ids(header.metadata),
        read_tensors=lambda: _stream(path, header.tensors, names, restore),
        stored=_stored(header.tensors),
    )


def _stored(tensors: list[TensorInfo]) -> str:
    """How the file keeps its matrices (norms and biases are F32 in every file)."""
    kinds = {t.qtype.name for t in tensors if len(t.dims) > 1}
    if kinds <= {"F32"}:
        return "float32"
    if kinds <= {"F32", "F16", "BF16"}:
        return "bfloat16" if "BF16" in kinds else "float16"
    return "quantized"


def hf_name(gguf_name: str, path: Path | str = "") -> str:
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m:
        layer, part, suffix = m.groups()
        if part in EXPERT_NAMES and suffix == "weight":
            return f"model.layers.{layer}.{EXPERT_NAMES[part]}"
        if part in LAYER_NAMES:
            return f"model.layers.{layer}.{LAYER_NAMES[part]}.{suffix}"
    raise CheckpointError(f"{path}: tensor {gguf_name!r} has no Hugging Face name in qwenkit's mapping")


def dequantize_tensor(info: TensorInfo, data: np.ndarray) -> torch.Tensor:
    """float32 tensor in numpy/HF order from the raw bytes of one GGUF tensor."""
    values = dequantize(data, info.qtype)  # (n_elements,) for 1-D input
    if not values.flags.writeable:  # F32 comes back as a view of the read-only map
        values = values.copy()
    return torch.from_numpy(values.astype(np.float32, copy=False).reshape(info.numpy_shape))


# ---- config ------------------------------------------------------------------------------------
def config_from_gguf(header: GGUFHeader, path: Path) -> dict:
    meta = header.metadata
    arch = meta.get("general.architecture")
    if arch not in MODEL_TYPES:
        raise CheckpointError(f"{path}: unsupported GGUF architecture {arch!r}; qwenkit reads {', '.join(MODEL_TYPES)}")
    shapes = {t.name: t.dims for t in header.tensors}

    def get(key, default=None, required=False):
        if required and f"{arch}.{key}" not in meta:
            raise CheckpointError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return meta.get(f"{arch}.{key}", default)

    heads = get("attention.head_count", required=True)
    config = {
        "model_type": MODEL_TYPES[arch],
        "hidden_act": "silu",
        "num_hidden_layers": get("block_count", required=True),
        "hidden_size": get("embedding_length", required=True),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length") or _head_dim(shapes, heads),
        "max_position_embeddings": get("context_length"),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": get("rope.freq_base", 10000.0),
        "rope_scaling": _rope_scaling(get),
        "vocab_size": _vocab_size(meta, shapes),
        # llama.cpp and transformers: no output.weight means the head reuses the embedding.
        "tie_word_embeddings": "output.weight" not in shapes,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        **_bias_fields(arch, shapes),
        **(_moe_fields(arch, get, shapes) if arch.endswith("moe") and arch not in gguf_hybrid.ARCHS else {}),
        **(gguf_hybrid.config_fields(arch, meta, shapes) if arch in gguf_hybrid.ARCHS else {}),
    }
    return {k: v for k, v in config.items() if v is not None}


def _rope_scaling(get) -> dict | None:
    kind = get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling = {"rope_type": kind, "factor": get("rope.scaling.factor")}
    original = get("rope.scaling.original_context_length")
    if original:
        scaling["original_max_position_embeddings"] = original
    return scaling


def _head_dim(shapes: dict, heads: int) -> int | None:
    """Without attention.key_length, q_proj's width over the head count (GGUF [hidden, heads*D])."""
    q = shapes.get("blk.0.attn_q.weight")
    return q[1] // heads if q else None


def _vocab_size(meta: dict, shapes: dict) -> int | None:
    if "token_embd.weight" in shapes:
        return shapes["token_embd.weight"][1]  # GGUF [hidden, vocab]
    tokens = meta.get("tokenizer.ggml.tokens")
    return len(tokens) if tokens else None


def _bias_fields(arch: str, shapes: dict) -> dict:
    has_bias = "blk.0.attn_q.bias" in shapes
    if arch == "qwen2moe":
        return {"qkv_bias": has_bias}
    if arch.startswith("qwen3"):
        return {"attention_bias": has_bias}
    return {}


def _moe_fields(arch: str, get, shapes: dict) -> dict:
    def width(name):  # GGUF [hidden, ffn(, experts)]: dim 1 is the expert's hidden width
        return shapes[name][1] if name in shapes else None

    fields = {
        "num_experts": get("expert_count", required=True),
        "num_experts_per_tok": get("expert_used_count", required=True),
        "moe_intermediate_size": get("expert_feed_forward_length") or width("blk.0.ffn_gate_exps.weight"),
        # llama.cpp renormalises the top-k routing weights for qwen3moe and not for qwen2moe.
        "norm_topk_prob": bool(get("expert_weights_norm", arch == "qwen3moe")),
        # GGUF has no per-layer MoE switch: llama.cpp builds every layer sparse.
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }
    if arch == "qwen2moe":
        shared = get("expert_shared_feed_forward_length") or width("blk.0.ffn_gate_shexp.weight")
        fields["shared_expert_intermediate_size"] = shared
    return fields


def eos_token_ids(meta: dict) -> list[int]:
    """The file's eos id, then its eot id and the ids of <|im_end|> and <|endoftext|>."""
    ids = [meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")]
    tokens = meta.get("tokenizer.ggml.tokens") or []
    wanted = {t.decode() for t in END_TOKENS}
    # Special tokens sit at the end of Qwen's vocabulary; scanning from there finds them fast.
    for i in range(len(tokens) - 1, -1, -1):
        if tokens[i] in wanted:
            ids.append(i)
            wanted.discard(tokens[i])
            if not wanted:
                break
    return list(dict.fromkeys(i for i in ids if i is not None))


# ---- tensors -----------------------------------------------------------------------------------
def _check_dequantizable(info: TensorInfo, path: Path) -> None:
    if not _can_dequantize(info.qtype):
        raise CheckpointError(f"{path}: tensor {info.name!r} has quant type {info.qtype.name}, which qwenkit cannot dequantize")


@functools.cache
def _can_dequantize(qtype: GGMLQuantizationType) -> bool:
    # Probing one zero block asks the gguf package itself which kernels it has.
    try:
        dequantize(np.zeros(GGML_QUANT_SIZES[qtype][1], dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


class LazyRows:
    """A large 2-D GGUF tensor dequantized on demand, a block of rows at a time.

    The loader calls `copy_into(dest)` (or a quantizer reads `rows(start, stop)`), so a float32
    copy of the whole matrix (545 MB for the 151,936-row embedding of a 0.5B model) never exists
    beside the destination; `materialize()` gives the full tensor.
    """

    BLOCK_ROWS = 8192

    def __init__(self, info: TensorInfo, raw: np.ndarray):
        self.info, self.raw = info, raw
        self.shape = torch.Size(info.numpy_shape)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as float32 (quant blocks never straddle rows)."""
        block = self.raw.reshape(self.shape[0], -1)[start:stop]
        values = dequantize(block, self.info.qtype).reshape(block.shape[0], self.shape[1])
        return torch.from_numpy(np.ascontiguousarray(values))

    def copy_into(self, dest: torch.Tensor) -> None:
        for start in range(0, self.shape[0], self.BLOCK_ROWS):
            dest[start : start + self.BLOCK_ROWS].copy_(self.rows(start, start + self.BLOCK_ROWS))

    def materialize(self) -> torch.Tensor:
        return dequantize_tensor(self.info, self.raw)


LAZY_MIN_ELEMENTS = 1 << 24


def _stream(path: Path, tensors: list[TensorInfo], names: dict[str, str], restore=None) -> TensorStream:
    """`restore(gguf name, tensor)`: the checkpoint's values of a tensor the converter changed."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for info in tensors:
        raw = data[info.offset : info.offset + info.nbytes]
        if len(info.dims) == 2 and math.prod(info.dims) >= LAZY_MIN_ELEMENTS and (
                restore is None or not info.name.startswith("blk.")):
            yield names[info.name], LazyRows(info, raw), str(path)
        else:
            tensor = dequantize_tensor(info, raw)
            if restore is not None:
                tensor = restore(info.name, tensor)
            if info.name.endswith("ffn_gate_inp_shexp.weight"):
                tensor = tensor.reshape(1, -1)  # GGUF stores the shared-expert gate as a vector; HF as [1, H]
            yield names[info.name], tensor, str(path)
        _drop_pages(data, info.offset, info.nbytes)  # the loader is done with this tensor


def _drop_pages(data: np.memmap, start: int, length: int) -> None:
    """Unmap the pages of bytes [start, start + length) of the file (best effort). They stay in
    the page cache, and a later read maps them again; without this every page of the file read
    while loading counts in the process's RSS until the load ends (491 MB for the default model)."""
    mm = getattr(data, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    lo = start // mmap.PAGESIZE * mmap.PAGESIZE
    hi = min(-(-(start + length) // mmap.PAGESIZE) * mmap.PAGESIZE, len(mm))
    try:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    except (OSError, ValueError):
        pass
