"""load_model: a checkpoint directory, a .gguf file or a known model id -> a ready QwenForCausalLM.

The model is built on the meta device (no memory), given uninitialised storage in the target
dtype once, and filled tensor by tensor from the checkpoint, so loading never holds a second
full copy of the weights. A multimodal checkpoint loads its language model: the vision tower is
skipped with a one-line notice; multi-token-prediction (MTP) weights are kept aside on the model
as `model.mtp_weights` (name -> tensor, as stored), for speculative decoding.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import backends
from .config import QwenConfig
from .dtypes import resolve_dtype
from .errors import ConfigError
from .backends.quant import QuantizeOnLoad, check_scheme
from .backends.quant import quantize as quantize_model
from .model.qwen import QwenForCausalLM
from .model.weight_map import load_tensors

log = logging.getLogger("qwenkit.loader")


def build_model(cfg: QwenConfig, dtype=torch.float32, device="cpu") -> QwenForCausalLM:
    """An uninitialised model with storage allocated (call `init_weights` or load a checkpoint)."""
    with torch.device("meta"):
        model = QwenForCausalLM(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty re-creates parameters, which unties them
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def load_model(path_or_id: str | Path | None = None, dtype: str | torch.dtype = "auto", device="cpu",
               progress: bool = False, adapter: str | Path | None = None,
               quantize: str | None = None) -> QwenForCausalLM:
    """Load a Qwen model from an HF-format directory, a .gguf file, or a model id.

    `dtype`: a torch.dtype or a name (`qwenkit.dtypes`); "auto" loads the fastest correct form for
    the device, the host and how the checkpoint stores its weights (`backends.auto_plan`: e.g. a
    quantized GGUF on a CPU as int8 weights under fp32 arithmetic).
    `adapter`: a LoRA adapter directory in PEFT's layout, merged into the weights.
    `quantize`: "int8", "int4" or "bf16" weight-only layers (`backends/quant.py`), each made as soon as
    its weights are loaded (with an adapter, after merging it).
    """
    from .weights import open_checkpoint

    if quantize:
        check_scheme(quantize)
    ckpt = open_checkpoint(resolve_path(path_or_id))
    try:
        cfg = QwenConfig.from_dict(ckpt.config)
    except ConfigError as e:
        where = Path(ckpt.source) / "config.json" if Path(ckpt.source).is_dir() else Path(ckpt.source)
        raise ConfigError(f"{where}: {e}") from None
    if ckpt.eos_token_ids:
        cfg = cfg.replace(eos_token_id=tuple(ckpt.eos_token_ids))
    if isinstance(dtype, str) and dtype == "auto":
        dtype, auto_scheme = backends.auto_plan(device, ckpt.stored)
        quantize = quantize or auto_scheme
    model = build_model(cfg, resolve_dtype(dtype, device), device)
    tensors = ckpt.tensors()
    if progress:
        from tqdm import tqdm

        tensors = tqdm(tensors, desc="loading weights", unit=" tensors", leave=False)
    on_load = QuantizeOnLoad(model, quantize) if quantize and adapter is None else None
    left = load_tensors(model, tensors, ckpt.source, on_filled=on_load, take=on_load.take if on_load else None)
    if left.vision_skipped:
        log.warning("qwenkit: %s: skipped the vision tower (%d tensors); loaded the language model only",
                    ckpt.source, left.vision_skipped)
    model.mtp_weights = left.mtp
    model.source = ckpt.source
    if adapter is not None:
        from .model.lora import apply_adapter

        apply_adapter(model, adapter, merge=True)
    if on_load is not None:
        on_load.finish()
    elif quantize:
        quantize_model(model, quantize)
    return backends.install(model.eval())


def resolve_path(path_or_id) -> Path:
    """A local path as is; anything else (a model id, or None for the default) through the hub cache."""
    if path_or_id is not None and Path(path_or_id).exists():
        return Path(path_or_id)
    from .weights.hub import resolve

    return resolve(None if path_or_id is None else str(path_or_id))
