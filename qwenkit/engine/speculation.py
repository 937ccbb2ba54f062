"""Speculative decoding in the engine: each request that asks for it (`SamplingParams.speculative`)
gets its own proposer, prompt lookup or the model's MTP head (one head, loaded once, each request
with its own K/V cache of it); the scheduler asks here for a decoding sequence's guesses. An MTP
head reads the target's final hidden states, which the runner keeps on the sequence
(`Sequence.hidden`) for requests that use one.

A step then runs the sequence's last token and its k guesses as k + 1 one-token rows of the
decode call, beside the other requests' rows (runner.py): row i reads the paged cache through the
sequence's block table up to its own position, so it sees the K/V the rows before it wrote in the
same call, layer by layer - each row is the one-token step at that position, as a batched decode
row is. `speculative.verify.accept` then keeps what the target would have produced itself
(greedy: its own picks; sampling: rejection sampling), the scheduler keeps those tokens and returns
the blocks only rejected guesses reached.

Guesses stop short of max_tokens and the context, so a step never computes a token the request
could not keep.

Back-off: each speculating sequence has its own `Lookahead` (speculative/lookahead.py, the one
`generate` uses), told after every drafted step how many guesses were kept. It proposes as many
guesses as pay off beside the step's other decode rows, each guess one row more at the fixed
`ROW_COST` of a row (no timings: a step's time depends on its neighbours and on prefill chunks),
none while they do not pay, then one every PROBE_EVERY steps. `num_speculative_tokens` is the
most it proposes. A seeded request's k is reckoned as if alone (its acceptance only), so its
tokens do not depend on what it is batched with; others take the batch into account.
"""

from __future__ import annotations

import torch

from ..speculative.lookahead import Lookahead
from ..speculative.proposers import NgramProposer, Proposer
from .sequence import Sequence, TokenSequence


class Speculation:
    def __init__(self, max_model_len: int, model=None):
        self.max_model_len = max_model_len
        self.model = model  # the target, whose MTP head "mtp" requests guess with
        self.proposers: dict[int, Proposer] = {}  # seq_id -> its proposer
        self.lookahead: dict[int, Lookahead] = {}  # seq_id -> its back-off
        self._head = None

    def mtp_head(self):
        """The model's MTP head, loaded at the first request for it (RequestError naming the
        checkpoint when it has none)."""
        if self._head is None:
            from ..speculative.mtp import load_head

            self._head = load_head(self.model)
        return self._head

    def propose(self, seq: Sequence, most: int, others: int = 0) -> list[int]:
        """Up to `most` guessed tokens after seq's, beside `others` decode rows of other sequences
        this step (none when it did not ask for speculation or guessing does not pay now)."""
        spec = seq.params.speculative
        if spec is None:
            return []
        look = self.lookahead.get(seq.seq_id)
        if look is None:
            look = self.lookahead[seq.seq_id] = Lookahead(spec.num_speculative_tokens)
        k = look.k(0 if seq.params.seed is not None else others)
        room = min(seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - len(seq)) - 1
        k = min(k, most, room)
        if k < 1:
            return []
        proposer = self.proposers.get(seq.seq_id)
        if proposer is None:
            proposer = self.proposers[seq.seq_id] = self._new_proposer(spec)
        if not proposer.needs_hidden:
            return proposer.propose(seq, k).tokens
        hidden = take_hidden(seq)
        if hidden is None:
            return []
        # Greedy guesses whatever the request's temperature: verification keeps the target's own
        # distribution for any guess made without its randomness, and a seed then fixes the tokens.
        view = TokenSequence(seq.token_ids[:seq.num_prompt_tokens], seq.params.replace(temperature=0.0))
        view.token_ids = seq.token_ids
        return proposer.propose(view, k, None, hidden).tokens

    def saw(self, seq: Sequence, proposed: int, kept: int) -> None:
        """A drafted step's outcome for seq: `kept` of its `proposed` guesses were kept."""
        if seq.seq_id in self.lookahead:
            self.lookahead[seq.seq_id].saw(proposed, kept)

    def _new_proposer(self, spec) -> Proposer:
        if spec.method == "mtp":
            from ..speculative.mtp import MTPProposer

            return MTPProposer(self.model, self.mtp_head())
        return NgramProposer(spec.prompt_lookup_max, spec.prompt_lookup_min)

    def release(self, seq: Sequence) -> None:
        self.proposers.pop(seq.seq_id, None)
        self.lookahead.pop(seq.seq_id, None)


def take_hidden(seq: Sequence) -> torch.Tensor | None:
    """The hidden states (n, H) the runner kept for seq since the last call: the contiguous run of
    positions that ends before its last token (a preempted sequence's older ones are dropped);
    None when there is no such run."""
    parts, seq.hidden = seq.hidden, []
    run, end = [], len(seq) - 1
    for start, h in reversed(parts):
        if start + h.shape[0] != end:
            break
        run.append(h)
        end = start
    return torch.cat(run[::-1]) if run else None

