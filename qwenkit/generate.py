"""Single-sequence generation with a KV cache: one prefill, then one token per step.

`generate` returns the new token ids (ending with the stop token when one was produced);
`generate_stream` yields them as they come, for the CLI. Temperature 0 is greedy. Tokens are
picked by the engine's `Sampler` under the matching `SamplingParams`, so a request gets the same
tokens (and the same RequestErrors) here as from the engine. `speculative=` ("ngram",
"draft:PATH", "mtp" or a proposer; see `qwenkit.speculative`) decodes several tokens a call after
the first, on every model kind (hybrids included): greedy output is the same tokens, sampled
output the same distribution.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .backends import decode_step
from .engine.sampler import Sampler
from .engine.sampling_params import SamplingParams
from .engine.sequence import TokenSequence
from .errors import RequestError
from .speculative import proposer_for, speculative_tokens


@torch.inference_mode()
def generate_stream(model, input_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None,
                    stop_token_ids: list[int] | None = None, seed: int | None = None, speculative=None,
                    spec_stats=None) -> Iterator[int]:
    """The new token ids one by one (see `generate`); `spec_stats` (a `SpecStats`) gets the
    speculative counts."""
    if not input_ids:
        raise RequestError("input_ids is empty: generation needs at least one prompt token")
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k or 0,
                            top_p=1.0 if top_p is None else top_p, seed=seed, stop_token_ids=stop_token_ids)
    total = len(input_ids) + max_new_tokens
    limit = model.config.context_length
    if total > limit:
        raise RequestError(f"prompt ({len(input_ids)} tokens) + max_new_tokens ({max_new_tokens}) "
                           f"exceeds the model's context of {limit} tokens")
    stops = set(model.eos_token_ids) | set(params.stop_token_ids)
    seq, sampler = TokenSequence(input_ids, params), Sampler()
    proposer = proposer_for(speculative, model) if speculative is not None else None
    cache = model.new_cache(1, total)
    decode = decode_step(model)
    logits, hidden = _prefill(model, input_ids, cache, proposer is not None and proposer.needs_hidden)
    for i in range(max_new_tokens):
        if i:
            logits = decode(torch.tensor([[token]], device=model.device), cache=cache, logits_to_keep=1)
        token = sampler(logits[0, -1][None], [seq])[0].token_id
        seq.token_ids.append(token)
        yield token
        if token in stops:
            return
        if proposer is not None:  # after the prefill's token: proposals need a last token to follow
            yield from speculative_tokens(model, seq, sampler, cache, proposer, stops, max_new_tokens, spec_stats,
                                          hidden)
            return


def _prefill(model, input_ids: list[int], cache, with_hidden: bool):
    """(logits (1, 1, V) after the prompt, its final hidden states (P, H) when asked, else None):
    through the model, or the backend's step for a one-token prompt."""
    ids = torch.tensor([input_ids], device=model.device)
    if with_hidden:  # an MTP head reads the hidden state at every prompt position
        logits, hidden = model(ids, cache=cache, logits_to_keep=1, return_hidden=True)
        return logits, hidden[0]
    step = model if len(input_ids) > 1 else decode_step(model)
    return step(ids, cache=cache, logits_to_keep=1), None


def generate(model, input_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None,
             stop_token_ids: list[int] | None = None, seed: int | None = None, speculative=None) -> list[int]:
    """The new token ids for a prompt (list of ints). Stops at the model's EOS ids or stop_token_ids.
    speculative: None (plain decoding), "ngram" (prompt lookup), "draft:PATH" (a smaller model
    with the same tokenizer), "mtp" (the checkpoint's own multi-token-prediction head: Qwen3-Next,
    Qwen3.5) or a `qwenkit.speculative.Proposer`."""
    return list(generate_stream(model, input_ids, max_new_tokens, temperature, top_k, top_p,
                                stop_token_ids, seed, speculative))
