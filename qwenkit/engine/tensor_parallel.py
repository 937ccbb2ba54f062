"""Tensor parallelism as a model transform (gpt-fast style), and the worker ranks of the engine.

`shard_model(model, rank, world)` keeps this rank's share of every layer: attention heads
(rows of the fused q/k/v projection, columns of o_proj) and MLP columns (rows of gate/up,
columns of down; each expert's too). Each block's partial output is summed across ranks with
one all-reduce, so every rank ends a layer with the full hidden state; embeddings and the LM
head stay replicated, so all ranks compute the same logits.

The engine runs on rank 0. Each step it broadcasts the chunks it runs (token ids, positions,
block tables) on a gloo group; the other ranks (`worker_loop`) run the same model calls on
their shards, with their own KV cache holding their heads. `qwenkit serve
--tensor-parallel-size N` spawns the N-1 workers itself, or runs under torchrun.
"""

from __future__ import annotations

import atexit
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..dtypes import resolve_dtype
from ..errors import ConfigError


# -- the transform ------------------------------------------------------------------------------

def _slice(t: torch.Tensor, sizes: list[int], dim: int, rank: int, world: int) -> torch.Tensor:
    """Split t along dim into segments of `sizes`; keep this rank's share of each, concatenated."""
    parts = [seg.chunk(world, dim=dim)[rank] for seg in t.split(sizes, dim=dim)]
    return torch.cat(parts, dim=dim).contiguous()


def _shard_linear(linear: nn.Linear, sizes: list[int], dim: int, rank: int, world: int) -> None:
    """Rows (dim 0: output features) or columns (dim 1: input features) of a linear."""
    linear.weight = nn.Parameter(_slice(linear.weight.data, sizes, dim, rank, world), requires_grad=False)
    if linear.bias is not None and dim == 0:
        linear.bias = nn.Parameter(_slice(linear.bias.data, sizes, 0, rank, world), requires_grad=False)
    elif linear.bias is not None and rank != 0:  # a row-parallel bias is added once, on rank 0
        linear.bias.data.zero_()
    linear.out_features, linear.in_features = linear.weight.shape


def _all_reduce_output(module, inputs, output):
    if dist.get_backend() == "gloo" and output.dtype != torch.float32:  # gloo sums float32 reliably
        total = output.float()
        dist.all_reduce(total)
        return total.to(output.dtype)
    dist.all_reduce(output)
    return output


def _shard_attention(attn, rank: int, world: int) -> None:
    if attn.n_heads % world or attn.n_kv % world:
        raise ConfigError(f"{attn.n_heads} query / {attn.n_kv} K/V heads do not split over {world} ranks")
    _shard_linear(attn.qkv_proj, list(attn.split), 0, rank, world)
    _shard_linear(attn.o_proj, [attn.o_proj.in_features], 1, rank, world)
    attn.n_heads, attn.n_kv = attn.n_heads // world, attn.n_kv // world
    attn.split = tuple(s // world for s in attn.split)


def _shard_mlp(mlp, rank: int, world: int) -> None:
    if hasattr(mlp, "experts"):  # SparseMoE: experts and shared expert split, router replicated
        ex = mlp.experts
        ex.gate_up_proj = nn.Parameter(_slice(ex.gate_up_proj.data, [ex.intermediate] * 2, 1, rank, world),
                                       requires_grad=False)
        ex.down_proj = nn.Parameter(_slice(ex.down_proj.data, [ex.intermediate], 2, rank, world), requires_grad=False)
        ex.intermediate //= world
        if mlp.shared_expert is not None:
            _shard_mlp(mlp.shared_expert, rank, world)
        return
    if mlp.intermediate % world:
        raise ConfigError(f"MLP width {mlp.intermediate} does not split over {world} ranks")
    _shard_linear(mlp.gate_up_proj, [mlp.intermediate] * 2, 0, rank, world)
    _shard_linear(mlp.down_proj, [mlp.intermediate], 1, rank, world)
    mlp.intermediate //= world


def shard_model(model, rank: int, world: int):
    """Keep this rank's shard of every decoder layer, in place; returns the model."""
    if world == 1:
        return model
    if model.config.is_hybrid:
        raise ConfigError(f"tensor parallelism does not split hybrid models ({model.config.model_type}: "
                          "Gated DeltaNet layers) yet")
    for layer in model.model.layers:
        _shard_attention(layer.self_attn, rank, world)
        _shard_mlp(layer.mlp, rank, world)
        layer.self_attn.register_forward_hook(_all_reduce_output)
        layer.mlp.register_forward_hook(_all_reduce_output)
    model.tp_rank, model.tp_world = rank, world
    return model


# -- processes ----------------------------------------------------------------------------------

_control = None  # the gloo group for step descriptions (works beside an NCCL group)


def init(rank: int, world: int, init_method: str | None = None, device: str = "cpu") -> None:
    global _control
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=world)
    _control = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD


def _send(obj) -> None:
    dist.broadcast_object_list([obj], src=0, group=_control)


def _receive():
    box = [None]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


@dataclass
class WireChunk:
    """What a worker needs of a chunk to repeat rank 0's model call."""
    start: int
    num_tokens: int
    tokens: list[int]
    block_table: list[int]

    @property
    def seq(self) -> "_BaseRow":
        """The runner asks each chunk's sequence for its LoRA adapter (workers run the base model)
        and whether it keeps hidden states for an MTP proposer (rank 0's concern alone)."""
        return _BASE_ROW


@dataclass(frozen=True)
class _BaseRow:
    adapter: None = None
    hidden: None = None


_BASE_ROW = _BaseRow()


def attach(engine) -> None:
    """On rank 0: tell the workers the cache size, then mirror every step to them."""
    _send((engine.blocks.num_blocks, engine.blocks.block_size))

    def broadcast(groups):
        _send([[WireChunk(c.start, c.num_tokens, c.tokens, c.block_table[:-(-(c.start + c.num_tokens)
                                                                            // engine.blocks.block_size)])
                for c in group] for group in groups])

    engine.runner.broadcast = broadcast
    global _attached
    if _attached is None:
        atexit.register(_at_exit)
    _attached = True


_attached: bool | None = None  # None: no engine attached yet in this process


def release_workers() -> None:
    """On rank 0: end the workers' `worker_loop` (once per `attach`)."""
    global _attached
    if _attached and dist.is_initialized() and dist.get_rank() == 0:
        _send(None)
    _attached = False


def shutdown() -> None:
    """Every rank, once its work is done: meet the others, then tear the process group down.
    Destroying a gloo group while a peer still has an operation in flight aborts the process
    ("terminate called without an active exception"); the barrier makes sure none has."""
    if dist.is_initialized():
        dist.barrier(group=_control)
        dist.destroy_process_group()


def _at_exit() -> None:
    release_workers()
    shutdown()


def worker_loop(model) -> None:
    """On ranks > 0: run rank 0's model calls on this shard until it says stop."""
    from .runner import ModelRunner

    num_blocks, block_size = _receive()
    runner = ModelRunner(model, num_blocks, block_size)
    while (groups := _receive()) is not None:
        for group in groups:
            runner.forward(group)


def load_sharded_model(source, dtype, device: str, world: int):
    """Rank 0's shard of `source`, with the other ranks running `worker_loop` (spawned here, or
    already running under torchrun, in which case ranks > 0 never return). "auto" is a plain dtype
    here: sharding slices full-precision weights, not quantized ones."""
    dtype = resolve_dtype(dtype, device)
    if "RANK" in os.environ:  # torchrun
        rank = int(os.environ["RANK"])
        if rank:
            _ignore_stop_signals()
        model = _load_shard(source, dtype, device, rank, world, None)
        if rank:
            worker_loop(model)
            shutdown()
            raise SystemExit(0)
        return model
    import torch.multiprocessing as mp

    init_method = f"tcp://127.0.0.1:{_free_port()}"
    ctx = mp.get_context("spawn")
    for rank in range(1, world):
        ctx.Process(target=_worker, args=(source, dtype, device, rank, world, init_method), daemon=True).start()
    return _load_shard(source, dtype, device, 0, world, init_method)


def _load_shard(source, dtype, device: str, rank: int, world: int, init_method):
    from ..loader import load_model

    init(rank, world, init_method, device)
    dev = f"cuda:{rank}" if device.startswith("cuda") else device
    return shard_model(load_model(source, dtype, dev), rank, world)


def _ignore_stop_signals() -> None:
    """Ranks > 0 end when rank 0 releases them, not at a signal: torchrun and a terminal's Ctrl-C
    signal every rank, and a worker gone while rank 0 drains would fail the steps still running."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _worker(source, dtype: torch.dtype, device: str, rank: int, world: int, init_method: str) -> None:
    _ignore_stop_signals()
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    worker_loop(_load_shard(source, dtype, device, rank, world, init_method))
    shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
