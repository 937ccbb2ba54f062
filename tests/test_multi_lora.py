"""Several LoRA adapters served at once, per batch row: each row's logits equal the base model
with that row's adapter merged (adapters from `qwenkit train sft` with LoRA, from qwenkit's own
save, and written by `peft`), base and adapter rows share one engine step, the prefix cache
keeps each adapter's K/V apart, and the adapter slots come out of the memory budget."""

from __future__ import annotations

import pytest
import torch

import qwenkit
from qwenkit import backends
from qwenkit.engine import Engine, EngineSettings, SamplingParams
from qwenkit.engine.memory import adapter_bytes, plan_num_blocks
from qwenkit.errors import CheckpointError, ConfigError, RequestError
from qwenkit.model.lora import apply_lora, lora_modules, save_adapter
from qwenkit.model.multi_lora import AdapterSet, nbytes_for
from tiny import make_checkpoint


def save_random_adapter(base, out, r, targets, seed):
    """An adapter of rank r on `targets` with random A and B (a fresh one changes nothing)."""
    model = apply_lora(qwenkit.load_model(base, dtype=torch.float32), r=r, alpha=2 * r, targets=targets, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            for b in m.lora.B.values():
                b.copy_(torch.randn(b.shape, generator=gen) * 0.2)
    return save_adapter(model, out, base_model=str(base))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("base"), "qwen2")


@pytest.fixture(scope="module")
def adapters(ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"attn": save_random_adapter(ckpt, root / "attn", 4, ("q", "k", "v", "o"), 1),
            "mlp": save_random_adapter(ckpt, root / "mlp", 8, ("v", "gate", "up", "down"), 2)}


def load(ckpt, adapter=None):
    """The checkpoint with the fastest installed backend, optionally with an adapter merged."""
    return qwenkit.load_model(ckpt, dtype=torch.float32, adapter=adapter)


def test_rows_get_their_own_adapter_and_equal_the_merged_model(ckpt, adapters):
    model = load(ckpt)
    aset = AdapterSet(model, max_adapters=2, max_rank=8)
    loaded = {name: aset.load(name, path) for name, path in adapters.items()}
    ids = torch.randint(0, 256, (4, 9), generator=torch.Generator().manual_seed(0))
    per_row = [None, loaded["attn"], loaded["mlp"], loaded["attn"]]
    with torch.inference_mode():
        with aset.rows(per_row):
            got = model(ids)
        for b, adapter in enumerate(per_row):
            merged = load(ckpt, adapter.path if adapter else None)
            torch.testing.assert_close(got[b], merged(ids[b:b + 1])[0], atol=1e-4, rtol=1e-4)
        assert not any(m._forward_hooks for m in model.modules())  # gone after the block
        torch.testing.assert_close(model(ids)[0], got[0])


def test_load_refuses_what_does_not_fit(ckpt, adapters, tmp_path):
    aset = AdapterSet(load(ckpt), max_adapters=1, max_rank=4)
    with pytest.raises(RequestError, match="'mlp' has rank 8; this engine holds ranks up to 4"):
        aset.load("mlp", adapters["mlp"])
    with pytest.raises(CheckpointError, match="not a LoRA adapter"):
        aset.load("nothing", tmp_path)
    aset.load("attn", adapters["attn"])
    with pytest.raises(RequestError, match="'attn' is already loaded"):
        aset.load("attn", adapters["attn"])
    with pytest.raises(RequestError, match="all 1 LoRA adapter slots are taken"):
        aset.load("other", adapters["attn"])
    with pytest.raises(RequestError, match="no LoRA adapter named 'typo' is loaded"):
        aset.get("typo")


def generate_merged(ckpt, adapter, prompt, n):
    return qwenkit.generate(load(ckpt, adapter), prompt, n)


def test_engine_batches_base_and_adapters_in_one_step_with_merged_outputs(ckpt, adapters):
    model = load(ckpt)
    engine = Engine(model, EngineSettings(block_size=4, num_blocks=200, max_loras=2, max_lora_rank=8))
    for name, path in adapters.items():
        engine.adapters.load(name, path)
    prompt = [5, 17, 99, 3, 250, 41, 7, 7, 12]
    choice = {"0": None, "1": "attn", "2": "mlp", "3": "attn", "4": None}
    rows_per_call = []
    hook = model.register_forward_pre_hook(lambda _m, args: rows_per_call.append(args[0].shape[0]))
    out = {rid: [] for rid in choice}

    def step():
        for o in engine.step():
            out[o.request_id] += o.token_ids

    params = SamplingParams(max_tokens=6, temperature=0)
    for rid in "012":
        engine.add_request(prompt, params, rid, adapter=choice[rid])
    step()  # 0-2 prefill together and cache the prompt, each under its own adapter
    for rid in "34":
        engine.add_request(prompt, params, rid, adapter=choice[rid])
    while engine.has_unfinished():
        step()
    hook.remove()
    assert max(rows_per_call) == 5  # every request, base and adapters, in the same model call
    for rid, name in choice.items():
        assert out[rid] == generate_merged(ckpt, adapters[name] if name else None, prompt, 6), (rid, name)
    # 3 and 4 found their own adapter's K/V of the prompt's two full blocks in the prefix cache
    assert engine.blocks.prefix_hit_tokens == 2 * 8


def test_base_only_steps_keep_the_fused_decode(ckpt, adapters):
    model = load(ckpt)
    if backends.installed(model) != "cpu-kernels":
        pytest.skip("no fused decode step on this host")
    engine = Engine(model, EngineSettings(block_size=4, num_blocks=100, max_loras=1, max_lora_rank=8))
    engine.adapters.load("attn", adapters["attn"])
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=3, temperature=0), "base")
    while engine.has_unfinished():
        engine.step()
    assert engine.runner.decode.plan is not None and engine.runner.decode.plan.ok


def test_unloaded_adapter_serves_its_running_requests_then_frees_its_slot(ckpt, adapters):
    engine = Engine(load(ckpt), EngineSettings(block_size=4, num_blocks=100, max_loras=1, max_lora_rank=8))
    engine.adapters.load("mlp", adapters["mlp"])
    prompt = [9, 8, 7, 6, 5]
    engine.add_request(prompt, SamplingParams(max_tokens=5, temperature=0), "r", adapter="mlp")
    tokens = engine.step()[0].token_ids
    engine.adapters.unload("mlp")
    with pytest.raises(RequestError, match="no LoRA adapter named 'mlp'"):
        engine.add_request(prompt, SamplingParams(max_tokens=5), "late", adapter="mlp")
    with pytest.raises(RequestError, match="slots are taken"):
        engine.adapters.load("attn", adapters["attn"])
    while engine.has_unfinished():
        tokens += [t for o in engine.step() for t in o.token_ids]
    assert tokens == generate_merged(ckpt, adapters["mlp"], prompt, 5)
    engine.adapters.load("attn", adapters["attn"])  # the slot came back with the last request


def test_adapter_slots_come_out_of_the_kv_budget(ckpt):
    model = load(ckpt)
    cfg = model.config
    per_adapter = sum(4 * 8 * (cfg.hidden_size + size) for size in (
        cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size, cfg.intermediate_size))
    per_adapter += 4 * 8 * (cfg.num_attention_heads * cfg.head_dim + cfg.hidden_size)  # o
    per_adapter += 4 * 8 * (cfg.intermediate_size + cfg.hidden_size)  # down
    assert nbytes_for(model, 8) == per_adapter * cfg.num_hidden_layers
    budget = 2**22
    plain = EngineSettings(block_size=16, kv_cache_memory=budget, max_num_seqs=1000)
    lora = EngineSettings(block_size=16, kv_cache_memory=budget, max_num_seqs=1000, max_loras=3, max_lora_rank=8)
    assert adapter_bytes(model, lora) == 3 * nbytes_for(model, 8)
    per_block = budget // plan_num_blocks(model, plain, 2048)
    assert plan_num_blocks(model, lora, 2048) == (budget - adapter_bytes(model, lora)) // per_block
    with pytest.raises(ConfigError, match="100 LoRA adapter slots of rank 64"):
        plan_num_blocks(model, EngineSettings(kv_cache_memory=budget, max_loras=100, max_lora_rank=64), 2048)


def per_row_logits(ckpt, adapter_dirs, ids):
    """Logits of rows [base, adapter 0, adapter 1, ...] of `ids` in one call, and the model."""
    model = load(ckpt)
    aset = AdapterSet(model, max_adapters=len(adapter_dirs), max_rank=16)
    per_row = [None] + [aset.load(f"a{i}", d) for i, d in enumerate(adapter_dirs)]
    with torch.inference_mode(), aset.rows(per_row):
        return model(ids.expand(len(per_row), -1))


def test_adapter_written_by_peft_matches_peft(ckpt, adapters, tmp_path):
    peft = pytest.importorskip("peft")
    from tiny import load_reference

    config = peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, init_lora_weights=False,
                             target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    torch.manual_seed(3)
    reference = peft.get_peft_model(load_reference(ckpt), config).eval()
    reference.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, 256, (1, 11), generator=torch.Generator().manual_seed(4))
    got = per_row_logits(ckpt, [adapters["mlp"], tmp_path / "peft"], ids)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits[0]
        torch.testing.assert_close(got[2], expected, atol=1e-4, rtol=1e-4)
        with reference.disable_adapter():
            torch.testing.assert_close(got[0], reference(input_ids=ids).logits[0], atol=1e-4, rtol=1e-4)


def test_adapter_trained_by_train_sft_equals_its_merged_model(tmp_path):
    from qwenkit.train.cli import main
    from train_tiny import make_tokenizer, write_config, write_sft

    base = make_checkpoint(tmp_path / "base", "qwen3", vocab_size=320)
    sections = {"model": {"init": str(base)},
                "data": {"train": str(write_sft(tmp_path / "sft.jsonl")), "seq_len": 48, "eval_fraction": 0.1,
                         "tokenizer": str(make_tokenizer(tmp_path / "tok"))},
                "optim": {"lr": 3e-2, "warmup_steps": 1}, "lora": {"enabled": True, "r": 4, "alpha": 8.0},
                "run": {"out": str(tmp_path / "run"), "max_steps": 3, "batch_size": 4, "micro_batch_size": 4,
                        "eval_every": 0, "checkpoint_every": 0, "device": "cpu"}}
    assert main(["sft", "--config", str(write_config(tmp_path / "c.toml", sections))]) == 0
    trained = tmp_path / "run" / "adapter"
    ids = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(5))
    got = per_row_logits(base, [trained], ids)
    with torch.inference_mode():
        merged = load(base, trained)(ids)[0]
        assert (merged - load(base)(ids)[0]).abs().max() > 1e-3  # training moved it
        torch.testing.assert_close(got[1], merged, atol=1e-4, rtol=1e-4)
