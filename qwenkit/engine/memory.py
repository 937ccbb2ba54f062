"""How many KV blocks the engine gets: from `num_blocks`, a byte budget, or a share of free memory.

The budget (`kv_cache_memory`, or `kv_cache_fraction` of free memory) also pays for the LoRA
adapter slots (`max_loras` of rank up to `max_lora_rank`) and, for a hybrid model, the
recurrent-state slots (`state_slots`: `max_num_seqs` and the prefix cache's snapshots): the KV
cache gets what they leave.

An explicit budget is checked against the memory free on the device before anything is
allocated: a cache larger than what is free is refused with a ConfigError naming the setting,
instead of growing until the kernel kills the process. On Linux, "free" is MemAvailable, capped
by the cgroup's limit (a container's `--memory`), which MemAvailable does not see.

On a GPU the free memory (`torch.cuda.mem_get_info`, after the weights are loaded) first loses
what the engine's own calls will hold (`activation_reserve`: a prefill chunk's activations, the
logits of a full batch, the captured decode graphs), so the share given to K/V cannot starve them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from ..model.multi_lora import nbytes_for
from .kv_cache import PagedKVCache
from .runner import attention_layout
from .state_cache import bytes_per_slot
from .settings import EngineSettings

_CGROUP = Path("/sys/fs/cgroup")


def free_memory(device: torch.device | str) -> int:
    """Bytes free on a CUDA device, or available RAM (Linux MemAvailable, within the cgroup's limit)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = _meminfo_available()
    room = _cgroup_room()
    if available is None and room is None:
        return 4 * 2**30  # no way to ask: assume a modest 4 GiB
    return min(x for x in (available, room) if x is not None)


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """cgroup v2: memory.max less memory.current; None without a limit."""
    try:
        limit = (_CGROUP / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((_CGROUP / "memory.current").read_text()))
    except (OSError, ValueError):
        return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def check_fits(nbytes: int, device: torch.device | str, what: str) -> None:
    """ConfigError naming `what` unless `nbytes` more fit in the memory free on `device` now."""
    free = free_memory(device)
    if nbytes > free:
        raise ConfigError(f"{what}: {format_bytes(nbytes)} of KV cache is more than the "
                          f"{format_bytes(free)} free on {torch.device(device).type}")


def activation_reserve(model, settings: EngineSettings) -> int:
    """Bytes the engine's calls hold beside the weights and the K/V: the widest call's hidden
    states (a prefill chunk or a full decode batch, twice over for the graphs' pool) and float32
    logits of `max_num_seqs` rows (the sampler's working copies included)."""
    cfg = model.config
    tokens = max(settings.max_prefill_tokens, settings.max_num_seqs)
    per_token = (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * model.dtype.itemsize
    return 2 * tokens * per_token + 4 * settings.max_num_seqs * cfg.vocab_size * 4


def free_for_kv(model, settings: EngineSettings) -> int:
    """Free memory the KV budget is a share of: on a GPU, less the engine's activations."""
    free = free_memory(model.device)
    if model.device.type == "cuda":
        free = max(0, free - activation_reserve(model, settings))
    return free


def plan_num_blocks(model, settings: EngineSettings, max_model_len: int) -> int:
    """Blocks that fit the budget, but no more than `max_num_seqs` full contexts need."""
    n_kv, head_dim = attention_layout(model)
    per_block = PagedKVCache.bytes_per_block(len(model.config.attention_layers), settings.block_size,
                                             n_kv, head_dim, model.dtype)
    states = state_bytes(model, settings)
    if settings.num_blocks is not None:
        check_fits(settings.num_blocks * per_block + states, model.device,
                   f"num_blocks (--num-kv-blocks) {settings.num_blocks}")
        return settings.num_blocks
    if settings.kv_cache_memory is not None:
        check_fits(settings.kv_cache_memory, model.device, "kv_cache_memory (--kv-cache-memory)")
    budget = settings.kv_cache_memory or int(settings.kv_cache_fraction * free_for_kv(model, settings))
    adapters = adapter_bytes(model, settings)
    if adapters + states + per_block > budget:
        raise ConfigError(f"{settings.max_loras} LoRA adapter slots of rank {settings.max_lora_rank} "
                          f"({adapters / 2**20:.0f} MiB) and {state_slots(model, settings)} "
                          f"recurrent-state slots ({states / 2**20:.0f} MiB) leave no room for the KV cache "
                          f"in the budget of {budget / 2**20:.0f} MiB (fewer: --max-loras, --max-num-seqs, "
                          f"--max-state-snapshots; more: --kv-cache-memory)")
    budget -= adapters + states
    useful = settings.max_num_seqs * -(-max_model_len // settings.block_size)
    return max(1, min(budget // per_block, useful))


def adapter_bytes(model, settings: EngineSettings) -> int:
    """What the LoRA adapter slots reserve: `max_loras` adapters of rank `max_lora_rank` on every projection."""
    return settings.max_loras * nbytes_for(model, settings.max_lora_rank) if settings.max_loras else 0


def state_slots(model, settings: EngineSettings) -> int:
    """A hybrid model's recurrent-state slots: one per running sequence (`max_num_seqs`) and the
    prefix cache's snapshots; none for other models."""
    return settings.max_num_seqs + settings.num_state_snapshots if model.config.is_hybrid else 0


def state_bytes(model, settings: EngineSettings) -> int:
    """What a hybrid model's recurrent-state slots take."""
    return state_slots(model, settings) * bytes_per_slot(model.config, model.dtype)
