"""How many KV blocks the engine gets: from `num_blocks`, a byte budget, or a share of free memory."""

from __future__ import annotations

from pathlib import Path

import torch

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
    useful = settings.max_num_seqs * -(-max_model_len // settings.block_size)
    return max(1, min(budget // per_block, useful))
