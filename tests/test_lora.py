"""LoRA as a model transform: a fused qkv/gate_up adapter equals separate adapters per part,
merge/unmerge round-trip, and adapters saved in PEFT's layout load in PEFT with equal logits."""

import pytest
import torch
import torch.nn.functional as F

import qwenkit
from qwenkit.errors import CheckpointError
from qwenkit.model.lora import (apply_adapter, apply_lora, lora_disabled, lora_modules, merge_lora,
                                remove_lora, save_adapter, unmerge_lora)
from tiny import make_checkpoint


def _randomize_lora(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            for b in m.lora.B.values():
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2")


def _model(ckpt):
    return qwenkit.load_model(ckpt, dtype=torch.float32)


def test_fused_qkv_adapter_equals_separate_q_k_v_adapters(ckpt):
    model = apply_lora(_model(ckpt), r=4, alpha=8, targets=("q", "k", "v", "gate", "up"))
    _randomize_lora(model)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 5, model.config.hidden_size)
    lora = attn.qkv_proj.lora
    base = F.linear(x, attn.qkv_proj.weight, attn.qkv_proj.bias)
    parts = []
    for name, (start, size) in lora.parts.items():  # one independent LoRA per HF projection
        w, b = attn.qkv_proj.weight[start : start + size], attn.qkv_proj.bias[start : start + size]
        parts.append(F.linear(x, w, b) + lora.scale * (x @ lora.A[name].T @ lora.B[name].T))
    assert list(lora.parts) == ["q_proj", "k_proj", "v_proj"]
    torch.testing.assert_close(attn.qkv_proj(x), torch.cat(parts, -1))
    assert not torch.allclose(attn.qkv_proj(x), base)


def test_subset_targets_leave_other_rows_alone(ckpt):
    model = apply_lora(_model(ckpt), r=2, targets=("v",))
    _randomize_lora(model)
    qkv = model.model.layers[1].self_attn.qkv_proj
    x = torch.randn(3, model.config.hidden_size)
    with lora_disabled(model):
        plain = qkv(x)
    start, size = qkv.lora.parts["v_proj"]
    torch.testing.assert_close(qkv(x)[:, :start], plain[:, :start])
    assert not torch.allclose(qkv(x)[:, start:], plain[:, start:])
    assert model.model.layers[0].self_attn.o_proj.__dict__.get("_lora_hook") is None


def test_only_adapters_train_and_merge_unmerge_round_trip(ckpt):
    model = apply_lora(_model(ckpt), r=4, alpha=16)
    assert all(("lora" in n) == p.requires_grad for n, p in model.named_parameters())
    _randomize_lora(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    before = _model(ckpt)(ids)
    live = model(ids)
    w0 = model.model.layers[0].mlp.gate_up_proj.weight.clone()
    merge_lora(model)
    torch.testing.assert_close(model(ids), live, atol=1e-5, rtol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model.model.layers[0].mlp.gate_up_proj.weight, w0, atol=1e-6, rtol=0)
    with lora_disabled(model):
        torch.testing.assert_close(model(ids), before)
    remove_lora(model, merge=True)
    assert not lora_modules(model) and not any("lora" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(ids), live, atol=1e-5, rtol=1e-5)


def test_save_and_apply_adapter_round_trip(ckpt, tmp_path):
    model = apply_lora(_model(ckpt), r=4, alpha=8, targets=("q", "v", "down"))
    _randomize_lora(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    expected = model(ids)
    save_adapter(model, tmp_path / "adapter", base_model=str(ckpt))
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight" in keys
    assert not any("k_proj" in k or "qkv" in k for k in keys)
    merged = apply_adapter(_model(ckpt), tmp_path / "adapter")
    torch.testing.assert_close(merged(ids), expected, atol=1e-5, rtol=1e-5)
    loaded = qwenkit.load_model(ckpt, dtype=torch.float32, adapter=tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(CheckpointError, match="not a LoRA adapter"):
        apply_adapter(_model(ckpt), tmp_path)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_peft_loads_our_adapter_with_equal_logits(arch, tmp_path):
    peft = pytest.importorskip("peft")
    from tiny import load_reference

    path = make_checkpoint(tmp_path / arch, arch)
    model = apply_lora(_model(path), r=4, alpha=8, dropout=0.1)
    _randomize_lora(model, seed=1)
    model.eval()
    save_adapter(model, tmp_path / "adapter", base_model=str(path))
    reference = peft.PeftModel.from_pretrained(load_reference(path), tmp_path / "adapter").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
