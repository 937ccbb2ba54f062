"""EngineSettings: how the serving engine is sized (blocks, batch, chunking), apart from the model config."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ConfigError
from .sampling_params import SpeculativeParams

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


@dataclass(frozen=True)
class EngineSettings:
    block_size: int = 16  # token slots per KV block
    kv_cache_memory: int | None = None  # bytes for K/V; None: kv_cache_fraction of free memory
    kv_cache_fraction: float = 0.3
    num_blocks: int | None = None  # exact block count (tests); overrides the memory budget
    max_num_seqs: int = 64  # running sequences per step
    max_prefill_tokens: int = 512  # prompt tokens computed per step; longer prompts go in chunks
    max_model_len: int | None = None  # prompt + output tokens; None: the model's context length
    enable_prefix_caching: bool = True
    max_loras: int = 0  # LoRA adapters loaded at once (each reserves its memory); 0: none
    max_lora_rank: int = 16  # the largest adapter rank, what each adapter slot reserves for
    max_queued_requests: int | None = None  # AsyncEngine: requests waiting beyond this are refused; None: no bound
    request_timeout: float | None = None  # AsyncEngine: seconds from arrival before a request is ended; None: never
    # Each request's tokens independent of what it is batched with (docs/serving.md): prompts in
    # chunks of their own, decode rows batched only where the kernels are row-invariant, no
    # prefix cache (a cached block may have been computed in other chunks than this request's).
    deterministic: bool = False
    speculative: SpeculativeParams | None = None  # for requests that ask for none (and can take it); None: off
    # Hybrid models' prefix cache: their recurrent state is kept aside (a snapshot) each time a
    # sequence's computed tokens reach a multiple of `state_snapshot_interval` (prompt chunks end
    # there), in up to `max_state_snapshots` slots (None: max_num_seqs), least recently used evicted.
    state_snapshot_interval: int = 256
    max_state_snapshots: int | None = None

    @property
    def num_state_snapshots(self) -> int:
        """Snapshot slots a hybrid model's engine keeps (0 without a prefix cache)."""
        if not self.enable_prefix_caching or self.deterministic:
            return 0
        return self.max_num_seqs if self.max_state_snapshots is None else self.max_state_snapshots

    def __post_init__(self):
        checks = [(self.block_size >= 1, "block_size must be >= 1"),
                  (self.max_num_seqs >= 1, "max_num_seqs must be >= 1"),
                  (self.max_prefill_tokens >= 1, "max_prefill_tokens must be >= 1"),
                  (0 < self.kv_cache_fraction <= 1, "kv_cache_fraction must be in (0, 1]"),
                  (self.num_blocks is None or self.num_blocks >= 1, "num_blocks must be >= 1"),
                  (self.kv_cache_memory is None or self.kv_cache_memory > 0, "kv_cache_memory must be > 0"),
                  (self.max_loras >= 0, "max_loras must be >= 0"), (self.max_lora_rank >= 1, "max_lora_rank must be >= 1"),
                  (self.max_queued_requests is None or self.max_queued_requests >= 0,
                   "max_queued_requests must be >= 0"),
                  (self.request_timeout is None or self.request_timeout > 0, "request_timeout must be > 0"),
                  (self.state_snapshot_interval >= 1, "state_snapshot_interval must be >= 1"),
                  (self.max_state_snapshots is None or self.max_state_snapshots >= 0, "max_state_snapshots must be >= 0")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"EngineSettings: {message}")


def parse_size(text: str) -> int:
    """'4GiB', '512MB', '1.5g', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"not a memory size: {text!r} (try 4GiB, 512MB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
