"""The multi-token-prediction (MTP) head of Qwen3-Next and Qwen3.5 checkpoints, as a proposer.

Published checkpoints carry it beside the model under `mtp.*`, which loading keeps aside as
`model.mtp_weights`: `mtp.fc.weight` (H, 2H), `mtp.pre_fc_norm_embedding.weight`,
`mtp.pre_fc_norm_hidden.weight`, one full-attention decoder layer of the model's own kind
`mtp.layers.0.*` (gated attention, q/k norms, partial rotary; the sparse or dense MLP the model's
layer 0 has) and `mtp.norm.weight`, every norm zero-centred as the model's. The head shares the
model's embedding, rotary table and LM head.

At position i it reads the target's hidden state h_i and the embedding of token i+1, and
predicts token i+2:

    x = fc([pre_fc_norm_embedding(embed(t_{i+1})) | pre_fc_norm_hidden(h_i)])
    y_i = norm(layer(x at rotary position i)),  logits = lm_head(y_i)

with its own K/V cache (slot i for position i). For more guesses it runs on, one position further
each step, on its guess and its own y in place of h. The semantics are vLLM's: the head in
vllm/model_executor/models/qwen3_next_mtp.py and qwen3_5_mtp.py (embedding first in the concat,
both normed, fc, the decoder layer, mtp.norm, the shared lm_head); its inputs in
vllm/v1/spec_decode/eagle.py (the target's token ids shifted left by one and the next token
appended, positions and hidden states unshifted; chained steps at positions + 1 on the head's own
output); h is what the target model's forward returns there, its hidden states after the final
norm (Qwen3NextModel.forward ends in `self.norm`), which is `return_hidden` here.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import RequestError
from ..model.cache import KVCache
from ..model.layers import make_norm
from ..model.masks import slot_masks
from ..model.qwen import DecoderLayer
from ..model.weight_map import load_tensors
from .proposers import Proposal, chain

GROW = 1024  # positions the head's K/V cache grows by when full


class MTPHead(nn.Module):
    """fc, the two input norms, one decoder layer and the output norm (parameter names as the
    checkpoint's without the `mtp.` prefix)."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg.replace(num_hidden_layers=1, layer_types=("full_attention",))
        H = cfg.hidden_size
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.pre_fc_norm_embedding = make_norm(cfg, H)
        self.pre_fc_norm_hidden = make_norm(cfg, H)
        self.layers = nn.ModuleList([DecoderLayer(self.config, 0)])
        self.norm = make_norm(cfg, H)

    def forward(self, embeds, hidden, cos, sin, mask, cache) -> torch.Tensor:
        """embeds of the next tokens, hidden states (B, T, H) -> the head's normed output (B, T, H)."""
        x = torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], dim=-1)  # (B, T, 2H)
        return self.norm(self.layers[0](self.fc(x), cos, sin, mask, cache))


def load_head(model) -> MTPHead:
    """The model's MTP head from `model.mtp_weights`, in its dtype on its device; RequestError
    naming the checkpoint when it has none (or one in another layout)."""
    weights, source = model.mtp_weights, model.source or "the model"
    if "mtp.fc.weight" not in weights:
        what = "no multi-token-prediction (mtp.*) weights" if not weights else \
            f"MTP weights in a layout the MTP proposer does not read ({next(iter(weights))}, no mtp.fc.weight)"
        raise RequestError(f"speculative mtp: {source} has {what}")
    layers = {name.split(".")[2] for name in weights if name.startswith("mtp.layers.")}
    if layers != {"0"}:
        raise RequestError(f"speculative mtp: {source} has an MTP head of {len(layers)} layers; one is supported")
    with torch.device("meta"):
        head = MTPHead(model.config)
    head = head.to(dtype=model.dtype).to_empty(device=model.device)
    load_tensors(head, ((name.removeprefix("mtp."), t, source) for name, t in weights.items()), source)
    return head.eval()


class MTPProposer:
    """Guesses from the target's own MTP head: per call it first runs the head over the positions
    the target computed since the last call (their hidden states, `hidden`), then chains k guesses.
    The chained guesses' K/V are taken back at the next call, which writes the true ones."""

    needs_hidden = True

    def __init__(self, model, head: MTPHead | None = None):
        """`head`: the model's head when already loaded (the engine shares one among requests)."""
        self.model, self.head = model, head if head is not None else load_head(model)
        self.cache: KVCache | None = None
        self.last: torch.Tensor | None = None
        self.seen_from = 0  # positions before it never reached the head (a prefix-cache hit): masked out

    @torch.inference_mode()
    def propose(self, seq, k: int, generator=None, hidden=None) -> Proposal:
        tokens = seq.token_ids
        start = len(tokens) - 1 - hidden.shape[0]  # the position of hidden[0]
        if start == 0 or self.cache is None:  # a new sequence: its prompt's states from position `start`
            self._start_at(start, len(tokens) + GROW)
        if start > self.cache.length:
            raise ValueError(f"the MTP head holds {self.cache.length} positions; states from {start} came")
        self.cache.trim(self.cache.length - start)  # the last call's chained guesses
        y = self._run(tokens[start + 1:], hidden[None])  # (1, n, H): position i reads t_{i+1}, h_i
        if k < 1:
            return Proposal([])
        self.last = y[:, -1:]  # (1, 1, H): the head's output the next guess reads
        return chain(self._logits(self.last), seq, k, generator, self.model.config.vocab_size, self._advance)

    def _start_at(self, start: int, size: int) -> None:
        """A new cache whose first `start` positions the target computed before (an engine's prefix
        hit) but never showed the head: zeros, masked out, so its guesses read what it has seen."""
        self.cache = KVCache(self.head.config, 1, size, self.model.dtype, self.model.device)
        self.cache.k[..., :start, :] = 0  # never attended; zero so that no NaN of empty memory enters a sum
        self.cache.v[..., :start, :] = 0
        self.cache.length = self.seen_from = start

    def _advance(self, token: int) -> torch.Tensor:
        """The head one position on, reading `token` and its own last output -> the next logits."""
        self.last = self._run([token], self.last)
        return self._logits(self.last)

    def _run(self, ids: list[int], hidden: torch.Tensor) -> torch.Tensor:
        """The head over len(ids) positions after those cached -> its output (1, T, H)."""
        T = len(ids)
        self._make_room(T)
        embeds = self.model.model.embed_tokens(torch.tensor([ids], device=self.model.device))  # (1, T, H)
        positions, masks = self.cache.begin(None, T)
        mask = masks[0]
        if self.seen_from:
            S = self.cache.length + T
            mask = slot_masks(positions, S, [None], torch.arange(S, device=positions.device)[None] >= self.seen_from)[0]
        cos, sin = self.model.rope.cos_sin(positions, embeds.dtype)
        y = self.head(embeds, hidden, cos, sin, mask, self.cache)
        self.cache.end(T)
        return y

    def _logits(self, y: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(y).float()[0, -1].cpu()  # (V,)

    def _make_room(self, T: int) -> None:
        """Grow the head's cache (a copy into a larger one) when T more positions do not fit."""
        old = self.cache
        if old.length + T <= old.max_len:
            return
        self.cache = KVCache(self.head.config, 1, old.length + T + GROW, self.model.dtype, self.model.device)
        self.cache.k[..., :old.length, :] = old.k[..., :old.length, :]
        self.cache.v[..., :old.length, :] = old.v[..., :old.length, :]
        self.cache.length = old.length
