"""Positions and attention masks: the one builder behind the model, the static cache and the engine.

A hybrid model's linear-attention (recurrent) layers take no attention mask: their entry in the
per-layer list is which of the call's tokens are real (bool (B, T)), or None when all are.

A query at slot q sees key slot j when j <= q, when j is a real token (not padding), and, in a
sliding-window layer of width w, when q - j < w. A query always sees its own slot, so rows of
padding stay finite instead of NaN. Windows are per layer, so masks come as a list per layer
(the same tensor repeated where layers share a window).
"""

from __future__ import annotations

import torch


def positions_of(attention_mask: torch.Tensor | None, past: int, T: int, device) -> torch.Tensor:
    """Positions (B|1, T) of T new tokens after `past` cached slots; with a 1/0 attention mask
    (B, past + T) positions count only real tokens (left padding gets 0)."""
    if attention_mask is None:
        return torch.arange(past, past + T, device=device)[None]  # (1, T)
    pos = attention_mask.long().cumsum(-1) - 1  # (B, S): pads before the first token get -1
    return pos[:, -T:].clamp(min=0)


def causal_masks(attention_mask: torch.Tensor | None, past: int, T: int, windows: list, device) -> list:
    """One mask per layer for T new tokens at slots [past, past + T) of rows whose slot validity
    is `attention_mask` (B, past + T) or all valid: None everywhere when plain causal attention
    over the call alone suffices, else bool (B|1, 1, T, S)."""
    padded = attention_mask is not None and not bool(attention_mask.all())
    if past == 0 and not padded and set(windows) == {None}:
        return [None] * len(windows)
    q_slot = torch.arange(past, past + T, device=device)[None]  # (1, T)
    valid = attention_mask[:, : past + T].bool() if padded else None
    return slot_masks(q_slot, past + T, windows, valid)


def slot_masks(q_slot: torch.Tensor, S: int, windows: list, valid: torch.Tensor | None = None) -> list:
    """Masks bool (B|1, 1, T, S), one per layer, for queries at slots q_slot (B|1, T) over key
    slots [0, S), keys limited to `valid` (B, S) when given."""
    dist = q_slot[:, :, None] - torch.arange(S, device=q_slot.device)  # (B|1, T, S)
    seen = dist >= 0
    if valid is not None:
        seen = seen & valid[:, None, :]
    own = dist == 0
    by_window = {w: ((seen if w is None else seen & (dist < w)) | own)[:, None] for w in set(windows)}
    return [by_window[w] for w in windows]


def layer_masks(attention_mask: torch.Tensor | None, past: int, T: int, windows: list, linear: list,
                device) -> list:
    """`causal_masks`, with each recurrent layer's (`linear[i]`) entry replaced by the call's
    real-token mask (B, T) or None."""
    masks = causal_masks(attention_mask, past, T, windows, device)
    if not any(linear):
        return masks
    real = None if attention_mask is None else attention_mask[:, -T:].bool()
    if real is not None and bool(real.all()):
        real = None
    return [real if lin else m for m, lin in zip(masks, linear)]
