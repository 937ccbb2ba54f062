"""Export a (trained) qwenkit model as a Hugging Face directory: config.json, model.safetensors with
transformers' tensor names, and the tokenizer files, so `transformers` (and qwenkit) load it.

This is weight_map.py in reverse: fused qkv_proj splits into q/k/v_proj, gate_up_proj into
gate_proj/up_proj, stacked experts into one tensor set per expert. LoRA adapters, if attached,
are merged for the export and unmerged again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import torch

from ..model.lora import lora_modules, merge_lora, unmerge_lora

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "generation_config.json", "special_tokens_map.json")


def hf_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers name, tensor) for every weight of the model (tied lm_head left out)."""
    cfg = model.config
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    for name, p in model.named_parameters(remove_duplicate=False):
        if ".lora." in name or (cfg.tie_word_embeddings and name == "lm_head.weight"):
            continue
        t = p.detach()
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        t = t.cpu()
        if ".qkv_proj." in name:
            for part, piece in zip("qkv", t.split((q, kv, kv), dim=0)):
                yield name.replace(".qkv_proj.", f".{part}_proj."), piece
        elif name.endswith("experts.gate_up_proj"):  # (E, 2I, H)
            for e in range(t.shape[0]):
                gate, up = t[e].chunk(2, dim=0)
                yield name.replace("gate_up_proj", f"{e}.gate_proj.weight"), gate
                yield name.replace("gate_up_proj", f"{e}.up_proj.weight"), up
        elif name.endswith("experts.down_proj"):  # (E, H, I)
            for e in range(t.shape[0]):
                yield name.replace("down_proj", f"{e}.down_proj.weight"), t[e]
        elif ".gate_up_proj." in name:
            gate, up = t.chunk(2, dim=0)
            yield name.replace(".gate_up_proj.", ".gate_proj."), gate
            yield name.replace(".gate_up_proj.", ".up_proj."), up
        else:
            yield name, t


def export_hf(model, out_dir: str | Path, tokenizer_dir: str | Path | None = None, rank: int = 0) -> Path:
    """Write an HF-format directory (atomically: a temporary directory, then a rename).
    Every rank calls it (FSDP gathers shards); rank 0 writes."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    merged = bool(lora_modules(model))
    if merged:
        merge_lora(model)
    try:
        tensors = {name: t.contiguous().clone() for name, t in hf_tensors(model)}
    finally:
        if merged:
            unmerge_lora(model)
    if rank != 0:
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_hf_dict()
    config["dtype"] = str(model.dtype).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
