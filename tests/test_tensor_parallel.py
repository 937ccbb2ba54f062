"""Tensor parallelism on 2 CPU processes (gloo): greedy output identical to one process, for a
dense and an MoE model, through the engine with its step broadcast to the worker rank."""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

from qwenkit.engine import Engine, EngineSettings, SamplingParams
from test_engine import random_prompts, run_staggered, tiny_model

MODELS = {
    "dense": dict(),
    "moe": dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                shared_expert_intermediate_size=48),
}
SETTINGS = EngineSettings(block_size=4, num_blocks=48, max_prefill_tokens=16, max_num_seqs=4)
PARAMS = SamplingParams(temperature=0, max_tokens=10)


def outputs(model) -> list[list[int]]:
    model.eos_token_ids = []
    prompts = random_prompts(8, 1, 30, 256, seed=12)
    got = run_staggered(Engine(model, SETTINGS), prompts, PARAMS, arrive_every=2)
    return [got[str(i)] for i in range(len(prompts))]


def rank_main(rank: int, world: int, init_method: str, out_path: str) -> None:
    import torch
    import torch.distributed as dist

    from qwenkit.engine import tensor_parallel as tp

    torch.set_num_threads(1)
    tp.init(rank, world, init_method)
    results = {}
    for name, overrides in MODELS.items():
        model = tp.shard_model(tiny_model(seed=5, **overrides), rank, world)
        assert model.model.layers[0].self_attn.n_heads == 2  # of 4
        if rank == 0:
            model.eos_token_ids = []
            prompts = random_prompts(8, 1, 30, 256, seed=12)
            engine = Engine(model, SETTINGS)
            tp.attach(engine)
            got = run_staggered(engine, prompts, PARAMS, arrive_every=2)
            results[name] = [got[str(i)] for i in range(len(prompts))]
            tp.release_workers()
        else:
            tp.worker_loop(model)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    tp.shutdown()
    assert not dist.is_initialized()


def test_two_process_greedy_matches_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "tp.json"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(r, 2, f"tcp://127.0.0.1:{port}", str(out))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive and all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    got = json.loads(out.read_text())
    for name, overrides in MODELS.items():
        assert got[name] == outputs(tiny_model(seed=5, **overrides)), name


def test_shard_rejects_uneven_heads():
    from qwenkit.engine.tensor_parallel import shard_model
    from qwenkit.errors import ConfigError

    with pytest.raises(ConfigError, match="heads"):
        shard_model(tiny_model(), 0, 3)


def test_serve_with_two_ranks_matches_offline(tmp_path):
    """`qwenkit serve --tensor-parallel-size 2` spawns its worker and answers as one process does."""
    import httpx

    import qwenkit
    from qwenkit.engine import LLM
    from test_server import VOCAB, write_tokenizer
    from test_server_cli import free_port, served_process
    from tiny import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "tiny-qwen", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, eos_token_id=258)
    write_tokenizer(ckpt)
    llm = LLM(qwenkit.load_model(ckpt, dtype=torch.float32), qwenkit.load_tokenizer(ckpt), num_blocks=64)
    expected = llm.generate("hello world", SamplingParams(temperature=0, max_tokens=20))[0].text
    port = free_port()
    with served_process(ckpt, port, "--tensor-parallel-size", "2", "--num-kv-blocks", "64"):
        body = {"model": "tiny-qwen", "prompt": "hello world", "max_tokens": 20, "temperature": 0}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
    assert r.json()["choices"][0]["text"] == expected
