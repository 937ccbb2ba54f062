"""Which proposed tokens the target keeps, given its logits for the last token and each proposal.

Row i of the verify call's logits is the target's next-token distribution after proposals
[0, i) (penalties read the sequence with them appended). Greedy: proposal i stands when it is
the sampler's own pick; the first that is not is replaced by that pick, so the output is the
plain decode's, token for token. Sampling (Leviathan et al. / Chen et al.): proposal d, drawn from
q, stands with probability min(1, p(d) / q(d)); the first rejected one is replaced by a draw from
the residual max(0, p - q) normalized. With q one-hot (prompt lookup) the residual is p without d.
Every kept token then follows p exactly. After k kept proposals, row k gives one more token free.
"""

from __future__ import annotations

import torch

from ..engine.sampler import Sampler, apply_penalties, candidates
from ..engine.sequence import TokenSequence


def accept(logits: torch.Tensor, proposal, seq: TokenSequence, sampler: Sampler, stops: set[int],
           max_tokens: int) -> list[int]:
    """Append to seq.token_ids the tokens kept from logits (T, V) (T = len(proposal.tokens) + 1),
    through the first replaced one, a stop token or the max_tokens-th output; returns them."""
    new = []
    for i in range(logits.shape[0]):
        row = logits[i].float().cpu()
        if i < len(proposal.tokens):
            q = None if proposal.probs is None else proposal.probs[i]
            token, kept = check(row, proposal.tokens[i], q, seq, sampler)
        else:
            token, kept = sampler(row[None], [seq])[0].token_id, False
        seq.token_ids.append(token)
        new.append(token)
        if not kept or token in stops or seq.num_output_tokens >= max_tokens:
            break
    return new


def check(row: torch.Tensor, proposed: int, q: torch.Tensor | None, seq: TokenSequence,
          sampler: Sampler) -> tuple[int, bool]:
    """(the token at this position, whether it is the proposal) for the target's logits row (V,)."""
    if seq.params.greedy:
        token = sampler(row[None], [seq])[0].token_id
        return token, token == proposed
    p = distribution(row, seq)
    generator = sampler.generator_for(seq)
    q_d = 1.0 if q is None else float(q[proposed])
    if float(torch.rand(1, generator=generator)) * q_d < float(p[proposed]):
        return proposed, True
    residual = p.clone()
    if q is None:
        residual[proposed] = 0.0
    else:
        residual = (residual - q[:p.shape[0]]).clamp_(min=0.0)
    if not float(residual.sum()) > 0.0:  # only where p and q agree to rounding: p itself is then right
        residual = p
    return int(torch.multinomial(residual, 1, generator=generator)), False


def distribution(row: torch.Tensor, seq: TokenSequence) -> torch.Tensor:
    """The target's next-token probabilities (V,) as the sampler draws them: penalties, then
    temperature, top-k, min-p, top-p."""
    row = row.clone()
    apply_penalties(row, seq)
    probs, order = candidates(row[None], [seq.params])  # (1, K) each
    return torch.zeros(row.shape[0]).scatter_(0, order[0], probs[0] / probs[0].sum())


def num_kept(new: list[int], proposed: list[int]) -> int:
    """How many proposals the target kept: the common prefix of its tokens and the proposals (a
    replaced proposal never equals the token put in its place)."""
    n = 0
    while n < len(new) and n < len(proposed) and new[n] == proposed[n]:
        n += 1
    return n
