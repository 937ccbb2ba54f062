"""Speculative decoding in the engine: each request that asks for it (`SamplingParams.speculative`)
gets its own prompt-lookup proposer; the scheduler asks here for a decoding sequence's guesses.

A step then runs the sequence's last token and its k guesses as k + 1 one-token rows of the
decode call, beside the other requests' rows (runner.py): row i reads the paged cache through the
sequence's block table up to its own position, so it sees the K/V the rows before it wrote in the
same call, layer by layer - each row is the one-token step at that position, as a batched decode
row is. `speculative.verify.accept` then keeps what the target would have produced itself
(greedy: its own picks; sampling: rejection sampling), the scheduler keeps those tokens and returns
the blocks only rejected guesses reached.

Guesses stop short of max_tokens and the context, so a step never computes a token the request
could not keep.
"""

from __future__ import annotations

from ..speculative.proposers import NgramProposer
from .sequence import Sequence


class Speculation:
    def __init__(self, max_model_len: int):
        self.max_model_len = max_model_len
        self.proposers: dict[int, NgramProposer] = {}  # seq_id -> its prompt-lookup index

    def propose(self, seq: Sequence, most: int) -> list[int]:
        """Up to `most` guessed tokens after seq's (none when it did not ask for speculation)."""
        spec = seq.params.speculative
        if spec is None:
            return []
        room = min(seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - len(seq)) - 1
        k = min(spec.num_speculative_tokens, most, room)
        if k < 1:
            return []
        proposer = self.proposers.get(seq.seq_id)
        if proposer is None:
            proposer = self.proposers[seq.seq_id] = NgramProposer(spec.prompt_lookup_max, spec.prompt_lookup_min)
        return proposer.propose(seq, k).tokens

    def release(self, seq: Sequence) -> None:
        self.proposers.pop(seq.seq_id, None)

