"""A Sequence: one request's tokens, how many of them have K/V in the cache, and its block table.

Plain Python, shared by the block manager, the scheduler and the runner. `token_ids` holds the
prompt followed by the generated tokens; the K/V of the first `num_computed_tokens` of them sit
in the blocks of `block_table`, in order (a hybrid model's recurrent state after them, in its
`state_slot`); `adapter` is the LoRA adapter its rows use (None for
the base model); its `*_time` stamps (time.monotonic) feed /metrics.
Its base, `TokenSequence`, is the tokens and settings alone: what the sampler reads, and all
that `qwenkit.generate` keeps for its one sequence.
"""

from __future__ import annotations

import itertools
import time
from enum import Enum

from .sampling_params import SamplingParams

_ids = itertools.count()


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class TokenSequence:
    def __init__(self, prompt_ids: list[int], params: SamplingParams):
        self.seq_id = next(_ids)
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


class Sequence(TokenSequence):
    def __init__(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                 arrival_time: float | None = None):
        super().__init__(prompt_ids, params)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.status = Status.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at admission
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0  # leading blocks registered in the prefix cache
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.adapter = None  # the LoRA adapter (model.multi_lora.Adapter) its rows use; None: the base model
        self.state_slot: int | None = None  # a hybrid model's recurrent-state slot while it runs
        # (first position, the target's final hidden states (n, H) from there): what the runner
        # computed since an MTP proposer last read them; None: not kept (no MTP speculation)
        self.hidden: list[tuple[int, object]] | None = None

    @property
    def cache_salt(self) -> int | None:
        """What the prefix cache keys this sequence's K/V by beside its tokens: K/V computed under
        an adapter is that adapter's only."""
        return None if self.adapter is None else self.adapter.id

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, tokens={len(self)}, computed={self.num_computed_tokens}, "
                f"blocks={self.block_table}, {self.status.value})")

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def block_tokens(self, index: int, block_size: int) -> list[int]:
        return self.token_ids[index * block_size:(index + 1) * block_size]
