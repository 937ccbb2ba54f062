"""How many tokens to propose next: back off while proposals do not pay for themselves (plain
Python; `generate`'s loop and the batching engine both ask one `Lookahead` per sequence).

Cost model: a call of R one-token rows costs 1 + alpha * (R - 1) one-row steps. In `generate`
the rows are the last token and its k proposals (a verify call); in the engine they are a decode
call's rows, other sequences' included, each proposal one row more. alpha is what an extra row
costs: ~0.25-0.3 for the default model's int8 fused step on a 2-core AVX-512 host (docs/
performance.md: 1 token 14.1 ms, 5 tokens 27.5 ms, 9 tokens 44.9 ms, 16 tokens 74.2 ms), near 0
where decode is far from compute-bound (a GPU). `ROW_COST` is that measured default.

Acceptance: each proposal is kept with probability a (given the ones before it were), a moving
average over about the last 8 proposals tried; k proposals then yield E(k) = (1 - a^(k+1)) /
(1 - a) tokens of this sequence. Beside `others` rows of other sequences (a token each) the call
makes (others + E(k)) tokens at cost 1 + alpha * (others + k); `k()` picks the k that maximizes
their ratio (at batch 1, E(k) / (1 + alpha * k)): zero, a plain step, when none beats it, and
then still one proposal every PROBE_EVERY plain steps, so that a stretch where guessing pays
again is noticed. The larger the batch, the more a row costs against what the call already
yields, so speculation backs off sooner (it pays at batch 1, less or not at all in a full batch).

k depends on what the caller feeds it: a seeded request must be fed tokens alone (kept counts,
no timings and no batch size), so that the same seed draws the same numbers whatever it runs
beside.
"""

from __future__ import annotations

PROBE_EVERY = 8  # plain steps between single-proposal probes while backed off
ROW_COST = 0.3  # alpha: an extra one-token row's cost in one-row steps (see above)


class Lookahead:
    """How many tokens to propose next, from the acceptance (and step costs) seen so far."""

    def __init__(self, most: int, alpha: float = ROW_COST, rate: float = 0.7):
        self.most, self.alpha, self.rate = most, alpha, rate
        self.one_step: float | None = None  # seconds of a plain step (moving average), when timed
        self.since_probe = 0

    def gain(self, k: int, others: int = 0) -> float:
        """Expected tokens per one-row step of a call with k proposals beside `others` plain rows."""
        a = min(self.rate, 0.999)
        return (others + (1 - a ** (k + 1)) / (1 - a)) / (1 + self.alpha * (others + k))

    def k(self, others: int = 0) -> int:
        """Proposals for the next call (0: a plain step), beside `others` rows of other sequences."""
        best = max(range(self.most + 1), key=lambda k: self.gain(k, others))
        if best == 0:
            self.since_probe += 1
            if self.since_probe >= PROBE_EVERY:
                self.since_probe = 0
                return min(1, self.most)
        return best

    def saw(self, proposed: int, kept: int) -> None:
        """One call's outcome: `proposed` tokens offered, `kept` of them kept. Each proposal up to
        the first rejected one was tried (those after it tell nothing)."""
        for i in range(min(kept + 1, proposed)):
            self.rate += 0.125 * ((i < kept) - self.rate)

    def timed(self, T: int, seconds: float) -> None:
        """A call of T rows took `seconds`: alpha follows what rows cost here (never for a seeded request)."""
        if T == 1:
            self.one_step = seconds if self.one_step is None else 0.8 * self.one_step + 0.2 * seconds
        elif self.one_step:
            alpha = max(seconds / self.one_step - 1, 0.0) / (T - 1)
            self.alpha = 0.8 * self.alpha + 0.2 * alpha
