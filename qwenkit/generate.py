"""Single-sequence generation with a KV cache: one prefill, then one token per step.

`generate` returns the new token ids (ending with the stop token when one was produced);
`generate_stream` yields them as they come, for the CLI. Temperature 0 is greedy.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .errors import RequestError


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> int:
    """One token id from logits (V,) in float32."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate_stream(model, input_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None,
                    stop_token_ids: list[int] | None = None, seed: int | None = None) -> Iterator[int]:
    if not input_ids:
        raise RequestError("input_ids is empty: generation needs at least one prompt token")
    total = len(input_ids) + max_new_tokens
    limit = model.config.context_length
    if total > limit:
        raise RequestError(f"prompt ({len(input_ids)} tokens) + max_new_tokens ({max_new_tokens}) "
                           f"exceeds the model's context of {limit} tokens")
    stops = set(model.eos_token_ids) | set(stop_token_ids or ())
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = model.new_cache(1, total)
    ids = torch.tensor([input_ids], device=model.device)
    for _ in range(max_new_tokens):
        logits = model(ids, cache=cache, logits_to_keep=1)[0, -1]  # (V,)
        token = sample_next(logits.float().cpu(), temperature, top_k, top_p, generator)
        yield token
        if token in stops:
            return
        ids = torch.tensor([[token]], device=model.device)


def generate(model, input_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None,
             stop_token_ids: list[int] | None = None, seed: int | None = None) -> list[int]:
    """The new token ids for a prompt (list of ints). Stops at the model's EOS ids or stop_token_ids."""
    return list(generate_stream(model, input_ids, max_new_tokens, temperature, top_k, top_p,
                                stop_token_ids, seed))
