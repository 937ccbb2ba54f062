"""Bytes read and FLOPs per token of a model, for the fraction-of-bound figures."""

from __future__ import annotations

from itertools import chain


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: everything but the embedding table, of which a
    lookup reads one row, plus that table again when the LM head is tied to it."""
    embed = model.model.embed_tokens

    def size(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())

    total = size(chain(model.parameters(), model.buffers())) - size(chain(embed.parameters(), embed.buffers()))
    if getattr(model.lm_head, "weight", None) is embed.weight:
        total += size([embed.weight])
    return total


def flops_per_token(model, context: int) -> int:
    """Matmul FLOPs per token at a given attention context (LM head included)."""
    from ..analysis import flops_per_token as of_config

    return int(of_config(model.config, context))
