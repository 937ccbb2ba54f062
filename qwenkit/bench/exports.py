"""The benchmark's one set of weights in each peer's own format, made once and cached under
`$QWENKIT_HOME/bench/`: an HF-format directory (vLLM) and a bf16 GGUF (llama.cpp in bf16), both
from the model qwenkit loads, so every peer multiplies the same numbers. Written atomically."""

from __future__ import annotations

import gc
import os
from pathlib import Path


def _bench_home() -> Path:
    from ..paths import qwenkit_home

    return qwenkit_home() / "bench"


def hf_dir_for(path: str) -> Path:
    """An HF-format directory holding `path`'s weights (the path itself when it is one)."""
    p = Path(path)
    if p.is_dir():
        return p
    out = _bench_home() / f"{p.stem}-hf"
    if (out / "config.json").is_file():
        return out
    import torch

    import qwenkit
    from ..train.export import export_hf

    model = qwenkit.load_model(p, dtype=torch.float32)  # dequantized once, exactly the other peers' weights
    export_hf(model, out)  # atomic: a temporary directory, then a rename
    del model
    gc.collect()
    return out


def bf16_gguf_for(path: str) -> Path:
    """A copy of the GGUF file `path` with every matrix in BF16 (vectors, such as norms and biases,
    in F32, as llama.cpp's converter writes them) and the same metadata: the file's own weights,
    dequantized and rounded to bf16 as torch rounds them (to nearest, ties to even)."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize, quantize
    from tqdm import tqdm

    p = Path(path)
    if p.suffix != ".gguf":
        raise ValueError(f"a bf16 GGUF is made from a .gguf file, not {p.name!r}")
    out = _bench_home() / f"{p.stem}-bf16.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(p)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue  # the writer adds these itself
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
        for t in tqdm(reader.tensors, desc="bf16 GGUF for llama.cpp", unit=" tensors", leave=False):
            values = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            if values.ndim >= 2:
                writer.add_tensor(t.name, quantize(values, gguf.GGMLQuantizationType.BF16),
                                  raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                writer.add_tensor(t.name, values)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def random_checkpoint(shape: str, dtype: str = "bfloat16", seed: int = 0) -> Path:
    """`qwenkit bench --model random:SHAPE`: an HF-format directory of random weights (normal,
    std 0.02, seed 0) in the shape of preset SHAPE (e.g. qwen2.5-7b) or of a config.json file,
    for sizes whose real weights are not at hand; every peer then loads the same numbers."""
    import json

    from ..config import QwenConfig
    from ..dtypes import resolve_dtype
    from ..loader import build_model
    from ..presets import get_preset
    from ..train.export import export_hf

    src = Path(shape)
    cfg = QwenConfig.from_dict(json.loads(src.read_text())) if src.is_file() else get_preset(shape)
    name = src.parent.name if src.is_file() else shape
    out = _bench_home() / f"random-{name}-{dtype}-seed{seed}-hf"
    if (out / "config.json").is_file():
        return out
    model = build_model(cfg, resolve_dtype(dtype)).init_weights(seed=seed)
    export_hf(model, out)
    del model
    gc.collect()
    return out
