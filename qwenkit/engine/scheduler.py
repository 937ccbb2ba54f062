"""The scheduler: which sequences run in the next step and how many of their tokens (plain Python).

Continuous batching: every step, running sequences decode one token each, partly prefilled
prompts continue, and waiting requests are admitted while blocks, batch slots and the prefill
token budget last; long prompts are prefilled `max_prefill_tokens` at a time (with `deterministic`, in chunks that
depend on the sequence alone: see `chunk_size`; for a hybrid model's prefix cache, in chunks that
end on its state-snapshot grid, `align`). When a running
sequence needs a block and none is free, the newest running sequence is preempted: its blocks
are freed and it waits at the front of the queue to be recomputed (prompt and output so far).

Speculative decoding: a decoding sequence may carry a `draft` (guessed next tokens, from the
`propose` callback, told how many other sequences decode this step, as each guess is one more
row beside theirs) checked in the same step; they take slots while free blocks last (a draft
never preempts anyone) and at most `max_rows` one-token rows run a step in all. Afterwards the
sequence keeps what the runner kept (`postprocess` takes a list of tokens for such a chunk) and
the blocks only rejected guesses reached go back to the pool.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .block_manager import BlockManager
from .sequence import Sequence, Status


@dataclass
class Chunk:
    """Compute seq.token_ids[start:start + num_tokens] this step."""
    seq: Sequence
    start: int
    num_tokens: int
    draft: list[int] = field(default_factory=list)  # guessed tokens after it, verified in the same call

    @property
    def tokens(self) -> list[int]:
        return self.seq.token_ids[self.start:self.start + self.num_tokens]

    @property
    def block_table(self) -> list[int]:
        return self.seq.block_table

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's last token, so a new token is sampled."""
        return self.start + self.num_tokens == len(self.seq)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_prefill_tokens: int,
                 eos_token_ids=(), max_model_len: int | None = None, deterministic: bool = False,
                 propose: Callable[[Sequence, int, int], list[int]] | None = None, max_rows: int = 16,
                 align: int | None = None):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.deterministic = deterministic
        self.propose = propose  # (seq, at most n, other decode rows) -> guessed tokens; None: no speculation
        self.max_rows = max_rows  # one-token rows a step, drafts included, beyond which no guesses are made
        self.align = align  # prefill chunks end at multiples of it (where a hybrid's state is kept); None: anywhere
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Chunk]:
        budget = self.max_prefill_tokens
        chunks, preempted = self._schedule_running(budget)
        budget -= sum(c.num_tokens for c in chunks if c.num_tokens > 1)
        if not preempted:
            chunks += self._admit(budget)
        return chunks

    def _schedule_running(self, budget: int) -> tuple[list[Chunk], bool]:
        """Chunks for running sequences, oldest first; also whether any sequence was preempted."""
        chunks, preemptions, i = [], self.num_preemptions, 0
        spare_rows = self.max_rows - len(self.running)
        decoding = sum(s.num_uncomputed_tokens == 1 for s in self.running)  # rows of the decode call
        while i < len(self.running):
            seq = self.running[i]
            if seq.num_uncomputed_tokens == 1:
                if not self._make_room(seq):
                    break  # seq itself was the newest, so nothing follows it
                draft = self._draft(seq, spare_rows, len(self.running) - i - 1, decoding - 1)
                spare_rows -= len(draft)
                chunks.append(Chunk(seq, seq.num_computed_tokens, 1, draft))
            elif (n := self.chunk_size(seq, budget)) > 0:
                budget -= n
                chunks.append(Chunk(seq, seq.num_computed_tokens, n))
            i += 1
        return chunks, self.num_preemptions > preemptions

    def _make_room(self, seq: Sequence) -> bool:
        """Give seq a slot for its next token, preempting the newest sequences; False if seq itself went."""
        while not self.blocks.can_append(seq):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        self.blocks.append_slots(seq)
        return True

    def _draft(self, seq: Sequence, spare_rows: int, reserve: int, others: int) -> list[int]:
        """Guesses for seq's next tokens, with slots for them, while rows and free blocks last
        (`reserve` blocks stay free: a block for each sequence after it, so guesses never cost a
        preemption); `others`: the other sequences' rows in the decode call."""
        if self.propose is None or spare_rows < 1:
            return []
        draft = self.propose(seq, spare_rows, others)
        need = self.blocks.blocks_for(len(seq) + len(draft)) - len(seq.block_table)
        if not draft or need + reserve > self.blocks.num_free_blocks:
            return []
        self.blocks.append_slots(seq, len(draft))
        return draft

    def _admit(self, budget: int) -> list[Chunk]:
        chunks = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq) or self.chunk_size(seq, budget) == 0:
                break
            self.waiting.popleft()
            self.blocks.allocate(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = self.chunk_size(seq, budget)
            budget -= n
            chunks.append(Chunk(seq, seq.num_computed_tokens, n))
        return chunks

    def chunk_size(self, seq: Sequence, budget: int) -> int:
        """Tokens of seq to compute next (0: none this step). Normally as many as the budget takes.
        With `align`, a chunk stops at the next multiple of it. Deterministic: prompt chunks on a grid of `max_prefill_tokens` from position 0, never cut
        by the budget (a chunk that does not fit waits), and generated tokens recomputed after a
        preemption one at a time, as they were decoded - so each token's numbers are the same
        whatever else runs in the step."""
        start = seq.num_computed_tokens
        if not self.deterministic:
            n = min(seq.num_uncomputed_tokens, budget)
            return n if self.align is None else min(n, self.align - start % self.align)
        if start >= seq.num_prompt_tokens:
            return 1
        C = self.max_prefill_tokens
        n = min(seq.num_prompt_tokens - start, C - start % C)
        return n if n <= budget else 0

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def postprocess(self, chunks: list[Chunk], tokens: list) -> None:
        """Record a step: computed tokens, and the sampled token of each chunk that reached its end
        (None if it did not; for a chunk with a draft, the list of tokens kept)."""
        for chunk, token in zip(chunks, tokens):
            seq = chunk.seq
            if seq.is_finished:
                continue
            seq.num_computed_tokens = chunk.start + chunk.num_tokens
            reason = None
            for t in token if isinstance(token, list) else [] if token is None else [token]:
                seq.token_ids.append(t)
                reason = self._stop_reason(seq, t)
                if reason:
                    break
            if chunk.draft:  # the kept guesses' K/V is computed; the last token, as always, is not
                seq.num_computed_tokens = len(seq) - 1
                self.blocks.trim_slots(seq)
            self.blocks.register_computed(seq)
            if reason:
                self.finish(seq, reason)

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in p.stop_token_ids or (token in self.eos_token_ids and not p.ignore_eos):
            return "stop"
        if seq.num_output_tokens >= p.max_tokens:
            return "length"
        if self.max_model_len is not None and len(seq) >= self.max_model_len:
            return "length"
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (stopped, or aborted by its client) and return its blocks to the pool."""
        if seq.is_finished:
            return
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
            self.blocks.free_seq(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
