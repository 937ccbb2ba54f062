"""How many KV blocks the engine gets: from `num_blocks`, a byte budget, or a share of free memory.

The budget (`kv_cache_memory`, or `kv_cache_fraction` of free memory) also pays for the LoRA
adapter slots (`max_loras` of rank up to `max_lora_rank`): the KV cache gets what they leave.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from ..model.multi_lora import nbytes_for
from .kv_cache import PagedKVCache
from .runner import attention_layout
from .settings import EngineSettings


def free_memory(device: torch.device) -> int:
    """Bytes free on a CUDA device, or available RAM (Linux MemAvailable) for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30  # no way to ask: assume a modest 4 GiB


def plan_num_blocks(model, settings: EngineSettings, max_model_len: int) -> int:
    """Blocks that fit the budget, but no more than `max_num_seqs` full contexts need."""
    if settings.num_blocks is not None:
        return settings.num_blocks
    n_kv, head_dim = attention_layout(model)
    per_block = PagedKVCache.bytes_per_block(model.config.num_hidden_layers, settings.block_size,
                                             n_kv, head_dim, model.dtype)
    budget = settings.kv_cache_memory or int(settings.kv_cache_fraction * free_memory(model.device))
    adapters = adapter_bytes(model, settings)
    if adapters + per_block > budget:
        raise ConfigError(f"{settings.max_loras} LoRA adapter slots of rank {settings.max_lora_rank} take "
                          f"{adapters / 2**20:.0f} MiB, leaving no room for the KV cache in the budget of "
                          f"{budget / 2**20:.0f} MiB")
    budget -= adapters
    useful = settings.max_num_seqs * -(-max_model_len // settings.block_size)
    return max(1, min(budget // per_block, useful))


def adapter_bytes(model, settings: EngineSettings) -> int:
    """What the LoRA adapter slots reserve: `max_loras` adapters of rank `max_lora_rank` on every projection."""
    return settings.max_loras * nbytes_for(model, settings.max_lora_rank) if settings.max_loras else 0
