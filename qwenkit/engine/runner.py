"""The model runner: turns a step's chunks into batched model calls over the paged KV cache.

Each call takes B rows of T tokens, left-padded so every row's last real token is at T-1 (one
`logits_to_keep=1` then gives each row's next-token logits). Decode rows (one token) run as
one call; prefill chunks, which are longer, run as a second call in the same step, so a long
prompt does not pad every decode row to its length.

LoRA adapters apply per row: when any row of a call has one, the call runs the model's modules
inside `adapters.rows(...)` (model/multi_lora.py), whose hooks add each row's own update; the
fused decode step would skip them, so it runs only calls whose rows are all the base model's.

Where the backend has one (`backends.paged_step`: cuda-graphs), decode calls of base-model rows
run on its static-buffer step instead: rows padded to the next captured batch size, a CUDA graph
replayed per step. The pool then holds one block more than the block manager hands out: the
scratch block padding rows write to.

Hybrid models (Gated DeltaNet layers) run over a `PagedStateCache`: the rows' recurrent-state
slots beside the attention layers' blocks. Left padding enters a DeltaNet as zeros, which keep a
zero state at zero but decay a carried one, so a prefill call pads only rows that start their
sequence; rows that continue one run in calls of their own length (`unpadded`).

Deterministic runners give each prefill chunk a call of its own and put decode rows together
only as far as the installed kernels keep rows independent (`backends.batch_invariant_rows`;
with adapters, a row per call), so a row's numbers never depend on its neighbours'.

Speculative decoding (engine/speculation.py): a decode chunk with a draft runs as 1 + k one-token
rows of the decode call, its last token and each guess at its own position through the same
block table (each row sees the K/V the rows before it write in the same call); its result is
the list of Samples `speculative.verify.accept` keeps. On the fused C step those rows are what
the one-token step computes, exactly as any batched decode row is. On a hybrid model a drafted
chunk is one row of 1 + k tokens instead (`verify_rows`, in calls of chunks with as many
guesses): its DeltaNet layers hand their states after each token and the row's slot keeps the
one after the tokens kept (`PagedStateCache.trim_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends import batch_invariant_rows, decode_step, has_paged_step, paged_step
from ..model.masks import slot_masks
from ..speculative.proposers import Proposal
from ..speculative.verify import accept
from .kv_cache import PagedKVCache
from .state_cache import PagedStateCache
from .sampler import Sample, Sampler
from .scheduler import Chunk
from .sequence import Sequence


def attention_layout(model) -> tuple[int, int]:
    """(K/V heads, head dim) of the model's attention as built (after any tensor-parallel split)."""
    attn = model.model.layers[model.config.attention_layers[0]].self_attn
    return attn.n_kv, attn.head_dim


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, sampler: Sampler | None = None, adapters=None,
                 deterministic: bool = False, num_state_slots: int = 0):
        """`num_state_slots`: a hybrid model's recurrent-state slots (a running sequence's, and the
        prefix cache's snapshots)."""
        self.model = model
        self.device = model.device
        n_kv, head_dim = attention_layout(model)
        cfg = model.config
        scratch = 1 if has_paged_step(model) else 0  # block `num_blocks`: where padding rows write
        self.hybrid = cfg.is_hybrid
        if self.hybrid:
            self.cache = PagedStateCache(cfg, num_blocks, block_size, n_kv, head_dim, num_state_slots,
                                         model.dtype, model.device)
        else:
            self.cache = PagedKVCache(cfg.num_hidden_layers, num_blocks + scratch, block_size, n_kv, head_dim,
                                      model.dtype, model.device)
        self.linear = [cfg.is_linear_layer(i) for i in range(cfg.num_hidden_layers)]
        self.block_size = block_size
        self.windows = [cfg.window_of(i) for i in range(cfg.num_hidden_layers)]
        self.sampler = sampler or Sampler(batch_invariant=deterministic)
        self.eos_token_ids = frozenset(model.eos_token_ids)
        self.decode = decode_step(model)  # one-token calls: the installed backend's step, or the model
        max_blocks = min(num_blocks, -(-cfg.context_length // block_size))
        self.static = None if self.hybrid else paged_step(model, self.cache.k, self.cache.v, block_size, num_blocks,
                                                          max_blocks)
        self.adapters = adapters  # a model.multi_lora.AdapterSet, when the engine serves LoRA adapters
        # rows per call: decode rows, prefill chunks (None: all of them in one call)
        decode_rows = batch_invariant_rows(model) if adapters is None else 1
        self.call_rows = (decode_rows, 1) if deterministic else (None, None)
        # Set by tensor parallelism: called with each step's groups before they run, so the
        # other ranks run the same model calls on their shards.
        self.broadcast = None

    def copy_states(self, copies: list[tuple[int, int]]) -> None:
        """Copy recurrent-state slots (from, to), in order: the block manager's snapshot copies."""
        if copies:
            self.cache.copy_slots(copies)

    @torch.inference_mode()
    def step(self, chunks: list[Chunk]) -> list:
        """Run the chunks; per chunk a Sample if it reached its sequence's end, else None; for a
        chunk with a draft, the list of Samples of the tokens kept."""
        results: list = [None] * len(chunks)
        groups = self.groups(chunks)
        if self.broadcast is not None:
            self.broadcast([[chunks[i] for i in group] for group in groups])
        for group in groups:
            calls = [chunks[i] for i in group]
            if self.hybrid and calls[0].draft:
                for i, kept in zip(group, self.verify_rows(calls)):
                    results[i] = kept
                continue
            logits = self.forward([row for c in calls for row in rows_of(c)])  # (R, V)
            first = [0]
            for c in calls:
                first.append(first[-1] + 1 + len(c.draft))
            for k, i in enumerate(group):
                if chunks[i].draft:
                    results[i] = self.verify(logits[first[k]:first[k + 1]], chunks[i])
            sampling = [k for k, i in enumerate(group) if chunks[i].samples and not chunks[i].draft]
            if sampling:
                rows = torch.tensor([first[k] for k in sampling], device=logits.device)
                samples = self.sampler(logits.index_select(0, rows), [calls[k].seq for k in sampling])
                for k, sample in zip(sampling, samples):
                    results[group[k]] = sample
        return results

    def verify(self, logits: torch.Tensor, chunk: Chunk) -> list[Sample]:
        """The Samples kept from a drafted chunk's rows' logits (1 + k, V): the target's own
        tokens through the first replaced guess, a stop token or max_tokens."""
        seq, params = chunk.seq, chunk.seq.params
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        new = accept(logits, Proposal(list(chunk.draft)), seq, self.sampler, stops, params.max_tokens)
        del seq.token_ids[len(seq) - len(new):]  # accept appends them; the scheduler keeps them
        return [self.sampler.describe(logits[i].float().cpu(), t, params) for i, t in enumerate(new)]

    def verify_rows(self, chunks: list[Chunk]) -> list[list[Sample]]:
        """A hybrid model's drafted chunks, all with k guesses: each runs as one row of its last
        token and the guesses (a recurrent state cannot be read at several positions in one call),
        the DeltaNet layers hand the states after each token, and each row's slot keeps the state
        after the tokens it kept."""
        k = len(chunks[0].draft)
        rows = [DraftRow(c.seq, c.start, c.tokens + list(c.draft), 1 + k) for c in chunks]
        self.cache.expect_trim(k)
        try:
            logits, hidden = self.model(self.prepare(rows), cache=self.cache, logits_to_keep=k + 1,
                                        return_hidden=True)  # (B, 1 + k, V), (B, 1 + k, H)
        finally:
            self.cache.expect_trim(0)
        kept = [self.verify(logits[b], c) for b, c in enumerate(chunks)]
        self.cache.trim_rows([k + 1 - len(samples) for samples in kept])
        keep_hidden(rows, [hidden[b, :len(samples)] for b, samples in enumerate(kept)])
        return kept

    def groups(self, chunks: list[Chunk]) -> list[list[int]]:
        """Chunk indices per model call: decode rows together, then prefill chunks together (in
        calls of at most `call_rows` each)."""
        decodes = [i for i, c in enumerate(chunks) if c.num_tokens == 1]
        prefills = [i for i, c in enumerate(chunks) if c.num_tokens > 1]
        out = []
        for group, rows in zip((decodes, prefills), self.call_rows):
            rows = rows or max(len(group), 1)
            out += [group[i:i + rows] for i in range(0, len(group), rows)]
        if self.hybrid:
            out = [part for group in out for part in unpadded([chunks[i] for i in group], group)]
        return out

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk]) -> torch.Tensor:
        """Next-token logits (B, V) after each chunk's last token."""
        if self._static_fits(chunks):
            return self.static([c.tokens[0] for c in chunks], [c.start for c in chunks], [c.block_table for c in chunks])
        input_ids = self.prepare(chunks)
        if any(c.seq.hidden is not None for c in chunks):  # an MTP proposer reads the final hidden states
            logits, hidden = self.model(input_ids, cache=self.cache, logits_to_keep=1, return_hidden=True)
            T = input_ids.shape[1]
            keep_hidden(chunks, [hidden[b, T - c.num_tokens:] for b, c in enumerate(chunks)])
            return logits[:, -1]
        per_row = [c.seq.adapter for c in chunks]
        if any(a is not None for a in per_row):
            with self.adapters.rows(per_row):
                return self.model(input_ids, cache=self.cache, logits_to_keep=1)[:, -1]
        run = self.decode if input_ids.shape[1] == 1 else self.model
        return run(input_ids, cache=self.cache, logits_to_keep=1)[:, -1]

    def _static_fits(self, chunks: list[Chunk]) -> bool:
        """Whether the static step runs this call: one token a row, base-model rows, few enough rows."""
        return (self.static is not None and self.broadcast is None and self.static.padded(len(chunks)) is not None
                and all(c.num_tokens == 1 and c.seq.adapter is None for c in chunks))

    def prepare(self, chunks: list[Chunk]):
        dev, bs = self.device, self.block_size
        T = max(c.num_tokens for c in chunks)
        n = torch.tensor([c.num_tokens for c in chunks], device=dev)  # (B,)
        start = torch.tensor([c.start for c in chunks], device=dev)  # (B,)
        S = int((start + n).max())
        tables = _pad([c.block_table for c in chunks], -(-S // bs), dev)  # (B, blocks)
        j = torch.arange(S, device=dev)
        read_slots = tables[:, j // bs] * bs + j % bs  # (B, S)
        t = torch.arange(T, device=dev)
        real = t[None, :] >= (T - n)[:, None]  # (B, T) left padding is not real
        positions = (start[:, None] + t[None, :] - (T - n)[:, None]).clamp(min=0)  # (B, T)
        ids = _pad([c.tokens for c in chunks], T, dev, left=True)
        write_rows = real.flatten().nonzero().squeeze(1)  # (N,)
        write_slots = read_slots.gather(1, positions).flatten().index_select(0, write_rows)  # (N,)
        # causal over each row's own slots, in position order (padding queries see what precedes them)
        masks = slot_masks(positions, S, self.windows)
        if self.hybrid:  # a DeltaNet layer's mask: which of the call's tokens are real
            masks = [(None if bool(real.all()) else real) if lin else m for m, lin in zip(masks, self.linear)]
            self.cache.prepare_states([c.seq.state_slot for c in chunks], [c.start == 0 for c in chunks])
        self.cache.prepare(positions, masks, write_slots, write_rows, read_slots, tables)
        return ids


def unpadded(chunks: list[Chunk], indices: list[int]) -> list[list[int]]:
    """`indices` (of `chunks`, in order) split into calls where no row that carries a recurrent
    state is left-padded: the longest chunks with every chunk that starts its sequence, then the
    others by length; drafted chunks (verify rows of 1 + k tokens) by their number of guesses."""
    T = max(c.num_tokens for c in chunks)
    calls: dict = {T: []}
    for c, i in zip(chunks, indices):
        key = ("draft", len(c.draft)) if c.draft else T if c.start == 0 else c.num_tokens
        calls.setdefault(key, []).append(i)
    return [group for group in calls.values() if group]


def keep_hidden(rows, hidden: list[torch.Tensor]) -> None:
    """Give each row's sequence that keeps them (`Sequence.hidden`) the final hidden states (n, H)
    of the n positions it now has computed from the row's start."""
    for row, h in zip(rows, hidden):
        if row.seq.hidden is not None:
            row.seq.hidden.append((row.start, h.clone()))


@dataclass
class DraftRow:
    """Tokens of a drafted chunk run as a row from `start`: one guessed token at its own position,
    or (hybrid models) the chunk's last token and all its guesses."""
    seq: Sequence
    start: int
    tokens: list[int]
    num_tokens: int = 1

    @property
    def block_table(self) -> list[int]:
        return self.seq.block_table


def rows_of(chunk: Chunk) -> list:
    """The rows a chunk runs as: itself, then one row per guess of its draft."""
    after = chunk.start + chunk.num_tokens
    return [chunk, *(DraftRow(chunk.seq, after + i, [t]) for i, t in enumerate(chunk.draft))]


def _pad(rows: list[list[int]], width: int, device, left: bool = False) -> torch.Tensor:
    """Rows of ints cut to `width` and zero-padded on the right (or left) into a (len(rows), width) tensor."""
    out = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        row = row[:width]
        if not row:
            continue
        if left:
            out[i, width - len(row):] = torch.tensor(row)
        else:
            out[i, :len(row)] = torch.tensor(row)
    return out.to(device)
