"""Proposers: a few guessed next tokens for a sequence, from the text so far, a draft model or the
target's own MTP head (`mtp.py`).

A proposer keeps whatever state it needs between calls (an n-gram index, a draft model's KV
cache) and reads the sequence's tokens each call, so rejected guesses need no notice: the next
call sees the tokens that were kept. `Proposal.probs` is the distribution each guess was drawn
from (rejection sampling needs it), None for guesses picked deterministically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..engine.sampler import apply_penalties, candidates
from ..engine.sequence import TokenSequence
from ..errors import RequestError
from ..model.cache import StateRollbackError


@dataclass
class Proposal:
    tokens: list[int]
    probs: torch.Tensor | None = None  # (len(tokens), V): what token i was drawn from; None: chosen outright


class Proposer(Protocol):
    needs_hidden: bool  # whether propose reads the target's hidden states (an MTP head does)

    def propose(self, seq: TokenSequence, k: int, generator: torch.Generator | None,
                hidden: torch.Tensor | None = None) -> Proposal:
        """At most k guessed tokens to follow seq.token_ids (fewer, or none, when it has no guess).
        `hidden` (n, H), for a proposer that needs it: the target's final hidden states at the n
        positions just before the sequence's last token that the target computed since the
        previous call (at the first call, all the prompt's), else None."""


class NgramProposer:
    """Prompt lookup: find the latest earlier place where the sequence's last n tokens (n from
    max_n down to min_n) occur, and propose what followed there. Costs no model call; pays off
    where the output repeats its input (code edits, quoting, extraction)."""

    needs_hidden = False

    def __init__(self, max_n: int = 4, min_n: int = 2):
        self.max_n, self.min_n = max_n, min_n
        self.where: dict[int, list[int]] = {}  # token -> positions it was seen at, ascending
        self.seen: list[int] = []  # the tokens indexed

    def propose(self, seq: TokenSequence, k: int, generator=None, hidden=None) -> Proposal:
        tokens = seq.token_ids
        self._index(tokens)
        last = len(tokens) - 1
        for n in range(min(self.max_n, last), self.min_n - 1, -1):
            tail = tokens[last - n + 1:]
            for at in reversed(self.where.get(tokens[last], ())):
                if at < last and at >= n - 1 and tokens[at - n + 1:at + 1] == tail:
                    return Proposal(tokens[at + 1:at + 1 + k])
        return Proposal([])

    def _index(self, tokens: list[int]) -> None:
        if tokens[:len(self.seen)] != self.seen:  # another sequence (a chat's next turn): start over
            self.where, self.seen = {}, []
        for i in range(len(self.seen), len(tokens)):
            self.where.setdefault(tokens[i], []).append(i)
        self.seen = list(tokens)


class DraftProposer:
    """A smaller model of the same tokenizer guesses k tokens, one decode step each, greedy or
    sampled under the request's own settings; its cache keeps what it has read and is trimmed back
    to the tokens the target kept (a hybrid draft's cache keeps its recurrent states for the
    guesses, `expect_trim`, and starts over when a sequence departs further back). Its vocabulary
    may be padded to another size than the target's (151,936 vs 152,064 rows): ids the tokenizer
    knows are the same in both, and its distributions are cut or zero-padded to the target's width."""

    needs_hidden = False

    def __init__(self, draft, target_vocab: int):
        from ..backends import decode_step

        self.draft, self.target_vocab = draft, target_vocab
        self.step = decode_step(draft)
        self.cache = None
        self.cached: list[int] = []  # the tokens whose K/V the draft cache holds

    def propose(self, seq: TokenSequence, k: int, generator=None, hidden=None) -> Proposal:
        if k < 1:
            return Proposal([])
        logits = self._catch_up(seq.token_ids, k)
        return chain(logits, seq, k, generator, self.target_vocab, lambda token: self._feed([token]))

    def _catch_up(self, tokens: list[int], k: int) -> torch.Tensor:
        """Logits (V,) after `tokens`: trim the cache to the prefix it shares with them (at least
        one token left to feed), then feed the rest."""
        same = 0
        for a, b in zip(self.cached, tokens[:-1]):
            if a != b:
                break
            same += 1
        same = self._rewind(same)
        self.cached = self.cached[:same]
        self.cache.expect_trim(k)  # the guesses fed below are taken back at the next call
        if len(tokens) + k > self.cache.max_len:
            raise RequestError(f"the draft model's context of {self.cache.max_len} tokens is too short")
        return self._feed(tokens[same:])

    def _rewind(self, same: int) -> int:
        """Trim the cache to its first `same` tokens; returns how many it keeps (0: a new cache)."""
        if self.cache is not None:
            try:
                self.cache.trim(len(self.cached) - same)
                return same
            except StateRollbackError:  # a recurrent draft keeps states for its last few tokens only
                pass
        self.cache = self.draft.new_cache(1, self.draft.config.context_length)
        return 0

    def _feed(self, tokens: list[int]) -> torch.Tensor:
        # A token past the draft's rows (the target's padding, drawn by chance) reads as id 0: the
        # guesses after it are worse, never wrong, as verification decides what is kept.
        rows = self.draft.config.vocab_size
        ids = torch.tensor([[t if t < rows else 0 for t in tokens]], device=self.draft.device)
        run = self.step if len(tokens) == 1 else self.draft
        self.cached.extend(tokens)
        return run(ids, cache=self.cache, logits_to_keep=1)[0, -1].float().cpu()  # (V,)


def chain(logits: torch.Tensor, seq: TokenSequence, k: int, generator, vocab: int, advance) -> Proposal:
    """k guesses, each drawn from `logits` (V,) greedy or under the request's own settings
    (penalties over the sequence with the guesses so far), then `advance(token)` -> the next logits."""
    guess = TokenSequence(seq.token_ids[:seq.num_prompt_tokens], seq.params)
    guess.token_ids = list(seq.token_ids)
    tokens, probs = [], []
    for i in range(k):
        token, q = _pick(logits, guess, generator, vocab)
        tokens.append(token)
        probs.append(q)
        guess.token_ids.append(token)
        if i + 1 < k:
            logits = advance(token)
    return Proposal(tokens, None if seq.params.greedy else torch.stack(probs))


def _pick(logits, seq: TokenSequence, generator, vocab: int) -> tuple[int, torch.Tensor | None]:
    logits = logits[:vocab].clone()  # rows past the target's are padding: never proposed
    apply_penalties(logits, seq)
    if seq.params.greedy:
        return int(logits.argmax()), None
    probs, order = candidates(logits[None], [seq.params])
    q = torch.zeros(vocab).scatter_(0, order[0], probs[0] / probs[0].sum())  # (V_target,)
    return int(torch.multinomial(q, 1, generator=generator)), q


def proposer_for(spec, model) -> Proposer:
    """The proposer `speculative=` names: "ngram", "draft:PATH" (a checkpoint whose tokenizer
    agrees with the target's), "mtp" (the model's own multi-token-prediction head), or a Proposer
    as is."""
    if not isinstance(spec, str):
        return spec
    if spec == "ngram":
        return NgramProposer()
    if spec.startswith("draft:") and len(spec) > len("draft:"):
        return _draft_proposer(spec.removeprefix("draft:"), model)
    if spec == "mtp":
        from .mtp import MTPProposer  # mtp.py imports this module

        return MTPProposer(model)
    raise RequestError(f"speculative={spec!r}: expected 'ngram', 'draft:PATH' or 'mtp'")


def _draft_proposer(path: str, model) -> DraftProposer:
    from ..loader import load_model
    from ..tokenizer import load_tokenizer

    try:
        draft_tok = load_tokenizer(path)
    except Exception as e:  # noqa: BLE001 - any failure to read it is one error naming the path
        raise RequestError(f"speculative draft {path}: cannot read its tokenizer ({e})") from None
    target_vocab = load_tokenizer(model.source).backend.get_vocab(with_added_tokens=True)
    if draft_tok.backend.get_vocab(with_added_tokens=True) != target_vocab:
        raise RequestError(f"speculative draft {path}: its tokenizer differs from the target model's "
                           "(a draft must share the target's vocabulary)")
    draft = load_model(path, device=model.device)
    return DraftProposer(draft, model.config.vocab_size)
