"""The sampler: next tokens for a batch of sequences from their logits, each with its own settings.

Order of operations: logprobs are taken from the model's own distribution (raw logits); then
repetition / presence / frequency penalties and logit bias; then a guided row (structured output,
thinking budget: `structured.Guide`) loses the tokens its grammar forbids, or takes the token its
guide forces; then greedy rows take the argmax and the others go through temperature, top-k,
min-p and top-p, and draw from what is left. A guided row changes no other row's tokens. A request
with a seed draws from its own generator, so its tokens do not depend on what it is batched with;
one without draws from the sampler's generator (torch's global one unless the sampler has a seed).
It serves both the engine (a batch of `Sequence`s) and `qwenkit.generate` (one `TokenSequence`).
See `SamplingParams` for Qwen's recommended settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import RequestError
from .sampling_params import SamplingParams
from .sequence import TokenSequence
from .structured import Guide, Guidance, allowed_tokens


@dataclass
class Sample:
    token_id: int
    logprob: float | None = None  # of the chosen token, when the request asked for logprobs
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), best first


class Sampler:
    def __init__(self, seed: int | None = None, guidance: Guidance | None = None, batch_invariant: bool = False):
        # None: torch's global generator, so unseeded requests differ run to run (torch.manual_seed fixes them)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.request_generators: dict[int, torch.Generator] = {}
        self.guidance = guidance  # grammars and thinking budgets; None: requests may not ask for them
        self.guides: dict[int, Guide] = {}
        # Draw each row alone: the shared top-k width (the batch's largest top_k) changes the
        # softmax's summation length, and with it the last bits of a row's probabilities.
        self.batch_invariant = batch_invariant

    def release(self, seq: TokenSequence) -> None:
        self.request_generators.pop(seq.seq_id, None)
        self.guides.pop(seq.seq_id, None)

    def __call__(self, logits: torch.Tensor, seqs: list[TokenSequence]) -> list[Sample]:
        """logits (B, V) for the B sequences, on any device; returns one Sample per sequence.
        The work stays on the logits' device (one transfer of the token ids) unless a row needs
        penalties, a logit bias or a grammar, which are applied on the host."""
        logits = logits.float()
        if any(_on_host(s.params) for s in seqs):
            logits = logits.cpu()
        raw = logits
        logits = logits.clone()
        for i, seq in enumerate(seqs):
            apply_penalties(logits[i], seq)
        forced = self._guide(logits, seqs)
        tokens = logits.argmax(-1)  # (B,)
        random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        # forced rows draw too, so the shared generator advances as without them
        groups = [[i] for i in random_rows] if self.batch_invariant else [random_rows] * bool(random_rows)
        for rows in groups:
            tokens[rows] = self._draw(logits[rows], [seqs[i] for i in rows])
        for i, token in forced.items():
            tokens[i] = token
        ids = tokens.tolist()  # the one device-to-host transfer of a plain step
        return [self.describe(raw[i], ids[i], seq.params) for i, seq in enumerate(seqs)]

    def _guide(self, logits: torch.Tensor, seqs: list[TokenSequence]) -> dict[int, int]:
        """Apply each guided row's constraint to logits (B, V) in place; {row: forced token}."""
        forced, masked = {}, []
        for i, seq in enumerate(seqs):
            guide = self._guide_of(seq)
            if guide is None:
                continue
            token = guide.forced_token()
            if token is not None:
                forced[i] = token
            elif guide.masked:
                masked.append((i, guide))
            elif guide.banned():
                logits[i, guide.banned()] = float("-inf")
        if masked:
            bits = torch.zeros(len(masked), (logits.shape[-1] + 31) // 32, dtype=torch.int32)  # (R, W)
            for k, (_, guide) in enumerate(masked):
                guide.fill(bits[k])
            banned = ~allowed_tokens(bits, logits.shape[-1])  # (R, V)
            for k, (i, _) in enumerate(masked):  # in place, row by row: no copy of the batch's logits
                logits[i].masked_fill_(banned[k], float("-inf"))
        return forced

    def _guide_of(self, seq: TokenSequence) -> Guide | None:
        if seq.params.structured is None and seq.params.thinking_budget is None:
            return None
        guide = self.guides.get(seq.seq_id)
        if guide is None:
            if self.guidance is None:
                raise RequestError("structured outputs and thinking budgets need the engine (with a tokenizer)")
            guide = self.guides[seq.seq_id] = self.guidance.guide(seq)
        guide.sync(seq)
        return guide

    def _draw(self, logits: torch.Tensor, seqs: list[TokenSequence]) -> torch.Tensor:
        """Random tokens (R,) from logits (R, V) after temperature, top-k, min-p and top-p."""
        probs, order = candidates(logits, [s.params for s in seqs])
        # One uniform draw per token, inverted through the row's CDF: a seeded request's tokens
        # depend on its own generator only, not on the batch's width K.
        cdf = probs.cumsum(-1)  # (R, K)
        u = torch.cat([torch.rand(1, generator=self.generator_for(seq)) for seq in seqs]).to(cdf.device)  # (R,)
        picks = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=cdf.shape[-1] - 1)
        return order.gather(1, picks).squeeze(1)

    def generator_for(self, seq: TokenSequence) -> torch.Generator | None:
        """The generator a sequence's random draws come from (its own when it has a seed)."""
        if seq.params.seed is None:
            return self.generator
        if seq.seq_id not in self.request_generators:
            self.request_generators[seq.seq_id] = torch.Generator().manual_seed(seq.params.seed)
        return self.request_generators[seq.seq_id]

    @staticmethod
    def describe(raw: torch.Tensor, token: int, params: SamplingParams) -> Sample:
        """The Sample of `token` chosen from raw logits (V,): with its logprobs when params ask."""
        if params.logprobs is None:
            return Sample(token)
        logprobs = raw.log_softmax(-1)  # (V,)
        top = logprobs.topk(params.logprobs) if params.logprobs else None
        pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        return Sample(token, float(logprobs[token]), pairs)


def candidates(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """What a draw picks from: (probs, order), each (R, K), for penalized logits (R, V) after
    temperature, top-k, min-p and top-p: token order[r, i] has weight probs[r, i] (unnormalized;
    zero where filtered out), best first - or every token in token order when no row cuts any.
    Speculative decoding reads the same distribution."""
    dev, V = logits.device, logits.shape[-1]
    temps = torch.tensor([p.temperature for p in params], device=dev)[:, None]
    scaled = logits / temps  # (R, V)
    if all((p.top_k <= 0 or p.top_k >= V) and p.top_p >= 1 and p.min_p <= 0 for p in params):
        # nothing is cut: the whole distribution in token order (a sort of V costs more than the step)
        return scaled.softmax(-1), torch.arange(V, device=dev).expand(len(params), V)
    top_k = [min(p.top_k, V) if p.top_k > 0 else V for p in params]
    # A first look at the best SHORTLIST: enough when every row's filters cut inside it.
    width = max(top_k) if max(top_k) < V else min(V, max(SHORTLIST, *(k for k in top_k if k < V), 1))
    probs, order = _filtered(scaled, width, top_k, params)
    past = torch.tensor([k > width for k in top_k], device=dev)  # rows whose top-k reaches past it
    if width < V and bool(((probs[:, -1] > 0) & past).any()):
        probs, order = _filtered(scaled, V, top_k, params)  # some row keeps tokens past it: all of V
    return probs, order


SHORTLIST = 1024  # candidates looked at first for rows without top-k


def _filtered(scaled: torch.Tensor, width: int, top_k: list[int], params: list[SamplingParams]):
    """(probs, order) of the best `width` tokens of each row, each prob its share of what top-k
    keeps of the whole row (so a shortlist gives the numbers all of V would), then min-p, top-p."""
    dev, V = scaled.device, scaled.shape[-1]
    values, order = scaled.topk(width, dim=-1)  # (R, K), sorted best first
    rank = torch.arange(width, device=dev)[None]
    k = torch.tensor(top_k, device=dev)[:, None]  # (R, 1)
    values = values.masked_fill(rank >= k, float("-inf"))
    # normalizer: a row's top-k tokens (all inside the shortlist), or all of its V tokens
    total = torch.where(k < V, values.logsumexp(-1, keepdim=True), scaled.logsumexp(-1, keepdim=True))
    probs = (values - total).exp()  # (R, K)
    min_p = torch.tensor([p.min_p for p in params], device=dev)[:, None]
    probs = probs.masked_fill(probs < min_p * probs[:, :1], 0.0)
    top_p = torch.tensor([p.top_p for p in params], device=dev)[:, None]
    # keep the smallest prefix whose mass reaches top_p; the best token always stays, also
    # when top_p is so small (1e-300) that it is 0 in float32 and every token would be cut
    mass_before = probs.cumsum(-1) - probs
    return probs.masked_fill((mass_before >= top_p) & (rank > 0), 0.0), order


def _on_host(p: SamplingParams) -> bool:
    """Whether a row's sampling needs the host: penalties, logit bias, a grammar or thinking budget."""
    return (p.repetition_penalty != 1.0 or bool(p.presence_penalty or p.frequency_penalty or p.logit_bias)
            or p.structured is not None or p.thinking_budget is not None)


def apply_penalties(logits: torch.Tensor, seq: TokenSequence) -> None:
    """Repetition, presence and frequency penalties and logit bias, in place on logits (V,)."""
    p = seq.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long)
        chosen = logits[seen]
        logits[seen] = torch.where(chosen > 0, chosen / p.repetition_penalty, chosen * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
        counts = torch.bincount(torch.tensor(seq.output_ids), minlength=logits.shape[-1]).float()
        counts = counts[:logits.shape[-1]]
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
        logits[ids] += torch.tensor(list(p.logit_bias.values()))
