"""Speculative decoding: propose a few tokens cheaply, check them all in one target forward, keep
the ones the target would have produced itself.

- `proposers.py`: where guesses come from, one small interface (`Proposer.propose(seq, k)`):
  prompt lookup (`NgramProposer`, no extra model) and a smaller draft model (`DraftProposer`);
  `mtp.py`: the checkpoint's own multi-token-prediction head (Qwen3-Next, Qwen3.5;
  `MTPProposer`), which also reads the target's hidden states (`needs_hidden`).
- `verify.py`: which proposals the target keeps: greedy keeps a proposal when it is the target's
  own pick (token-identical to plain decoding); sampling keeps it with probability
  min(1, p/q) and otherwise draws from the residual max(0, p - q), so the output follows the
  target's own distribution (temperature, top-k, top-p, min-p, penalties included).
- `decode.py`: the loop `generate` runs: propose, verify in one call (the backend's
  `verify_step`, each row computed as the one-token step computes it), roll the cache back over
  the rejected tokens (`Cache.expect_trim` before the call, `Cache.trim` after: a hybrid model's
  recurrent state included), and back off (fewer or no proposals) while they do not pay.

`speculative=` (in `generate`, `--speculative` on the command line) is "ngram", "draft:PATH" or
"mtp"; `proposer_for` turns it into a proposer.
"""

from .decode import SpecStats, speculative_tokens
from .mtp import MTPProposer
from .proposers import DraftProposer, NgramProposer, Proposal, Proposer, proposer_for

__all__ = ["DraftProposer", "MTPProposer", "NgramProposer", "Proposal", "Proposer", "SpecStats", "proposer_for",
           "speculative_tokens"]
