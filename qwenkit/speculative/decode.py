"""The speculative loop: propose, verify in one target call, keep what the target would have made,
trim the cache back over the rest; and back off while proposals do not pay for themselves.
Before each call the loop tells the cache how many of its tokens may be taken back
(`Cache.expect_trim`): a hybrid model's recurrent layers then keep their state after each.

How many to propose is `Lookahead`'s choice (lookahead.py, shared with the batching engine): a
verify call of 1 + k tokens costs about (1 + alpha * k) one-token steps, alpha measured here as
the loop goes (`Lookahead.timed`). A seeded request keeps alpha fixed: k then depends on the
tokens alone, so the seed fixes them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from ..backends import cpu_kernels, decode_step, verify_step
from .lookahead import Lookahead
from .verify import accept, num_kept

MAX_PROPOSALS = min(8, cpu_kernels.MAX_ROWS - 1)  # the verify step takes up to MAX_ROWS tokens


@dataclass
class SpecStats:
    """Counts over a generation: verify calls with proposals, tokens proposed and kept, plain steps."""
    verify_calls: int = 0
    proposed: int = 0
    accepted: int = 0
    plain_steps: int = 0

    def add(self, proposed: int, kept: int) -> None:
        if proposed:
            self.verify_calls += 1
            self.proposed += proposed
            self.accepted += kept
        else:
            self.plain_steps += 1

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted(self) -> float:
        """Proposals kept per verify call (the call's own token not counted)."""
        return self.accepted / self.verify_calls if self.verify_calls else 0.0


def speculative_tokens(model, seq, sampler, cache, proposer, stops: set[int], max_tokens: int,
                       stats: SpecStats | None = None, hidden: torch.Tensor | None = None) -> Iterator[int]:
    """Tokens after seq.token_ids (whose last token is not yet in `cache`), appended to seq as
    they are kept, until a stop token or seq holds max_tokens outputs. `hidden` (P, H): the
    target's final hidden states at the positions the cache holds, for a proposer that reads
    them (`needs_hidden`); each later call hands it those of the positions it kept."""
    target = _target(model, proposer.needs_hidden)
    stats = stats if stats is not None else SpecStats()
    look = Lookahead(MAX_PROPOSALS)
    timed = seq.params.seed is None  # timings would make a seeded request's draws vary
    generator = None if seq.params.greedy else sampler.generator_for(seq)
    while seq.num_output_tokens < max_tokens:
        room = min(max_tokens - seq.num_output_tokens, cache.max_len - cache.length) - 1
        start = time.perf_counter()
        proposal = proposer.propose(seq, min(look.k(), room), generator, hidden)
        ids = torch.tensor([seq.token_ids[-1:] + proposal.tokens], device=model.device)  # (1, T)
        cache.expect_trim(len(proposal.tokens))  # a recurrent state keeps its per-token states
        logits, hidden = target(ids, cache, bool(proposal.tokens))  # (T or 1, V), (T, H) or None
        new = accept(logits, proposal, seq, sampler, stops, max_tokens)
        kept = num_kept(new, proposal.tokens)
        look.saw(len(proposal.tokens), kept)
        if timed:
            look.timed(ids.shape[1], time.perf_counter() - start)
        stats.add(len(proposal.tokens), kept)
        cache.trim(ids.shape[1] - len(new))  # keeps the last token and the kept proposals
        hidden = None if hidden is None else hidden[:len(new)]
        yield from new
        if new[-1] in stops:
            return


def _target(model, with_hidden: bool):
    """The target's call for (ids (1, T), cache, verify) -> (logits (T, V), or (1, V) for a plain
    step; the final hidden states (T, H) or None). The backends' steps return logits alone; a
    proposer that reads hidden states runs the model's forward, which is what a hybrid model (the
    only kind with an MTP head) runs anyway."""
    step, verify = decode_step(model), verify_step(model)

    def call(ids, cache, verifying: bool):
        if with_hidden:
            logits, h = model(ids, cache=cache, logits_to_keep=0 if verifying else 1, return_hidden=True)
            return logits[0], h[0]
        if verifying:
            return verify(ids, cache=cache)[0], None
        return step(ids, cache=cache, logits_to_keep=1)[0], None
    return call
