"""The CPU kernels of a decode step besides the GEMVs: attention (`cpu_kernels.attend_one`) against
torch's SDPA, RMSNorm, RoPE and SwiGLU against their torch definitions, the model's decode through
them against the model's decode through torch's ops, and the fused decode step (all layers in one
C call) against the modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qwenkit
from qwenkit import backends
from qwenkit.backends import cpu_kernels
from qwenkit.backends.fused_decode import FusedDecode
from qwenkit.backends.quant import quantize
from tiny import make_checkpoint

pytestmark = pytest.mark.skipif(cpu_kernels.kernels() is None, reason=f"{cpu_kernels.why_unavailable()}")


def _cache(B, Hkv, S, D, layout, gen):
    """k or v (B, Hkv, S, D) laid out as a static cache slice or a paged cache's gathered rows."""
    if layout == "static":  # (B, Hkv, max_len, D) sliced to S
        return torch.randn(B, Hkv, S + 37, D, generator=gen)[:, :, :S]
    if layout == "paged":  # (B, S, Hkv, D) transposed
        return torch.randn(B, S, Hkv, D, generator=gen).transpose(1, 2)
    return torch.randn(B, Hkv, S, D, generator=gen)


@pytest.mark.parametrize("B,H,Hkv,D", [(1, 14, 2, 64), (3, 4, 4, 128), (2, 8, 1, 24)])
@pytest.mark.parametrize("S", [1, 7, 64, 65, 300])
@pytest.mark.parametrize("layout", ["contiguous", "static", "paged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_sdpa(B, H, Hkv, D, S, layout, dtype):
    """fp32 caches to fp32 rounding; bf16 caches (a bf16 model's) summed in fp32, to the rounding
    of the bf16 result."""
    gen = torch.Generator().manual_seed(S * 7 + D)
    q = (torch.randn(B, H, 1, D, generator=gen) * 2).to(dtype)
    k, v = _cache(B, Hkv, S, D, layout, gen).to(dtype), _cache(B, Hkv, S, D, layout, gen).to(dtype)
    mask = torch.rand(B, 1, 1, S, generator=gen) > 0.3
    mask[..., 0] = True  # every row sees something (SDPA gives NaN otherwise)
    tol = {"atol": 2e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    with torch.no_grad():
        for m in (None, mask, mask[:1]):  # mask[:1]: one row of the mask for every row
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m, enable_gqa=True)
            out = cpu_kernels.attend_one(q, k, v, m)
            assert out.shape == ref.shape and out.dtype == dtype
            torch.testing.assert_close(out.float(), ref, **tol)


@pytest.mark.parametrize("block_size,S", [(4, 1), (4, 13), (16, 64), (16, 150)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_attention_reads_the_pool_through_block_tables(block_size, S, dtype):
    """attend_paged over a pool whose rows' blocks lie scattered (and one block shared by two rows)
    equals SDPA over each row's gathered positions, with a causal-like mask, a sliding-window mask
    and one mask row for all rows; tables that point outside the pool or fall short of S decline."""
    gen = torch.Generator().manual_seed(S + block_size)
    B, H, Hkv, D, n_blocks = 3, 14, 2, 64, 40
    per_row = -(-S // block_size)
    q = torch.randn(B, H, 1, D, generator=gen).to(dtype)
    k_pool, v_pool = (torch.randn(n_blocks * block_size, Hkv, D, generator=gen).to(dtype) for _ in range(2))
    tables = torch.randperm(n_blocks, generator=gen)[: B * per_row].reshape(B, per_row)
    tables[1, 0] = tables[0, 0]  # a prefix block two rows share
    slots = (tables[:, :, None] * block_size + torch.arange(block_size)).reshape(B, -1)[:, :S]  # (B, S)
    k, v = k_pool[slots].transpose(1, 2), v_pool[slots].transpose(1, 2)  # (B, Hkv, S, D)
    lengths = torch.tensor([S, max(1, S - 5), max(1, S // 2)])
    causal = (torch.arange(S) < lengths[:, None])[:, None, None]  # (B, 1, 1, S)
    window = causal & (torch.arange(S) >= lengths[:, None] - 8)[:, None, None]
    layout = cpu_kernels.paged_layout(tables, block_size, k_pool, S)
    with torch.no_grad():
        for mask in (causal, window, causal[:1]):
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
            out = cpu_kernels.attend_paged(q, k_pool, v_pool, layout, mask)
            tol = {"atol": 2e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
            torch.testing.assert_close(out.float(), ref, **tol)
        outside = tables.clone()
        outside[2, -1] = n_blocks
        assert cpu_kernels.paged_layout(outside, block_size, k_pool, S) is None
        assert cpu_kernels.paged_layout(tables, block_size, k_pool, per_row * block_size + 1) is None


def test_decode_attention_row_that_sees_nothing_is_zero_and_others_unaffected():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 64, generator=gen)
    k, v = torch.randn(2, 2, 9, 64, generator=gen), torch.randn(2, 2, 9, 64, generator=gen)
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1] = False
    with torch.no_grad():
        out = cpu_kernels.attend_one(q, k, v, mask)
        ref = F.scaled_dot_product_attention(q[:1], k[:1], v[:1], enable_gqa=True)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[:1], ref, atol=2e-6, rtol=1e-5)


def test_decode_attention_declines_what_it_does_not_take():
    q, k = torch.randn(1, 4, 1, 64), torch.randn(1, 2, 5, 64)
    with torch.no_grad():
        assert cpu_kernels.attend_one(q.half(), k.half(), k.half(), None) is None  # neither fp32 nor bf16
        assert cpu_kernels.attend_one(q, k, k.clone().transpose(2, 3).contiguous().transpose(2, 3), None) is None
        assert cpu_kernels.attend_one(q, k, k, torch.ones(1, 1, 2, 5, dtype=torch.bool)) is None  # not one query
    assert cpu_kernels.attend_one(q.requires_grad_(), k, k, None) is None  # autograd: SDPA's backward


@pytest.mark.parametrize("shape", [(1, 1, 896), (3, 5, 24), (2, 7)])
def test_rms_norm_and_swiglu_equal_torch(shape):
    from qwenkit.model.layers import RMSNorm

    gen = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=gen) * 3
    norm = RMSNorm(shape[-1], 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=gen))
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        torch.testing.assert_close(cpu_kernels.rms_norm(x, norm.weight, 1e-6), norm.weight * h, atol=1e-6, rtol=1e-5)
        gate_up = torch.cat([x * 10, x], dim=-1)  # gates far into both tails of the sigmoid
        gate, up = gate_up.chunk(2, dim=-1)
        torch.testing.assert_close(cpu_kernels.silu_mul(gate_up), F.silu(gate) * up, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("B,cos_rows", [(1, 1), (3, 1), (3, 3)])
def test_rope_equals_the_torch_rotation(B, cos_rows):
    from qwenkit.model import rope

    gen = torch.Generator().manual_seed(B)
    T, n, D = 5, 3, 24
    qkv = torch.randn(B, T, n * D + 40, generator=gen)
    x = qkv[..., : n * D].view(B, T, n, D)  # a view of a wider row, as q and k are of qkv
    cos, sin = torch.randn(2, cos_rows, T, 1, D, generator=gen)
    half = D // 2
    expected = x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
    with torch.no_grad():
        torch.testing.assert_close(cpu_kernels.rope(x, cos, sin), expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(rope.apply_rope(x, cos, sin), expected, atol=1e-6, rtol=1e-5)
        assert cpu_kernels.rope(x.transpose(1, 2), cos, sin) is None  # heads not laid out in rows


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_model_decode_through_the_kernels_equals_decode_through_torch(tmp_path, arch, monkeypatch):
    """Logits of 20 cached decode steps (batch 2, left padding: a mask) through the CPU backend's
    modules and through the plain torch model."""
    model = qwenkit.load_model(make_checkpoint(tmp_path / "ckpt", arch), dtype=torch.float32)
    assert backends.installed(model) == "cpu-kernels"
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones(2, 32, dtype=torch.long)
    attention_mask[1, :4] = 0
    calls = []
    kernel = cpu_kernels.attend_one
    monkeypatch.setattr(cpu_kernels, "attend_one", lambda *args: calls.append(1) or kernel(*args))

    def decode():
        cache, x, out = model.new_cache(2, 32), ids, []
        with torch.no_grad():
            for t in range(20):
                logits = model(x, attention_mask[:, : 12 + t], cache=cache)[:, -1]  # the modules, not the step
                out.append(logits)
                x = logits.argmax(-1, keepdim=True)
        return torch.stack(out)

    fast = decode()
    assert len(calls) == 19 * model.config.num_hidden_layers  # every step after the prefill
    backends.install(model, "torch")
    slow = decode()
    assert len(calls) == 19 * model.config.num_hidden_layers
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


def _decode_logits(model, steps=12, B=2, max_len=32, fused=True):
    """Logits (steps, B, V) of greedy cached decoding after a 6-token prompt, row 1 left-padded by
    3; one-token steps through the installed decode step (`fused`) or the model's modules."""
    ids = torch.randint(0, 256, (B, 6), generator=torch.Generator().manual_seed(5))
    attention_mask = torch.ones(B, max_len, dtype=torch.long)
    attention_mask[1:, :3] = 0
    cache, x, out = model.new_cache(B, max_len), ids, []
    step = backends.decode_step(model) if fused else model
    with torch.no_grad():
        for t in range(steps):
            logits = (model if t == 0 else step)(x, attention_mask[:, : 6 + t], cache=cache)[:, -1]
            out.append(logits)
            x = logits.argmax(-1, keepdim=True)
    return torch.stack(out)


def _spy_fused(monkeypatch) -> list:
    """Record whether each call of the fused step ran the C loop."""
    taken, run = [], FusedDecode._run_fused
    monkeypatch.setattr(FusedDecode, "_run_fused", lambda *args: taken.append(run(*args)) or taken[-1])
    return taken


@pytest.mark.parametrize("arch", ["qwen2", "qwen2-tied", "qwen3"])
@pytest.mark.parametrize("scheme", [None, "int8", "int4", "bf16"])
def test_fused_decode_step_equals_the_modules(tmp_path, arch, scheme, monkeypatch):
    model = qwenkit.load_model(make_checkpoint(tmp_path / "ckpt", arch), dtype=torch.float32, quantize=scheme)
    taken = _spy_fused(monkeypatch)
    fused = _decode_logits(model)
    assert taken == [True] * 11  # every step after the prompt
    torch.testing.assert_close(fused, _decode_logits(model, fused=False), atol=1e-4, rtol=1e-4)


def test_fused_decode_plan_follows_quantization_and_refuses_a_full_cache(tmp_path):
    model = qwenkit.load_model(make_checkpoint(tmp_path / "ckpt", "qwen2"), dtype=torch.float32)
    step = backends.decode_step(model)
    fp32 = _decode_logits(model, steps=4)
    first_plan = step.plan
    quantize(model, "int8")  # replaces every linear: the plan must be rebuilt, not read the old weights
    int8 = _decode_logits(model, steps=4)
    assert step.plan is not first_plan
    assert not torch.equal(fp32, int8)
    torch.testing.assert_close(int8, _decode_logits(model, steps=4, fused=False), atol=1e-4, rtol=1e-4)
    cache = model.new_cache(1, 3)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        with pytest.raises(ValueError, match="KV cache holds 3 tokens"):
            step(torch.tensor([[4]]), cache=cache)
        x = model.model.embed_tokens(torch.tensor([[4]]))
        cos, sin = model.rope.cos_sin(torch.tensor([[0]]), torch.float32)
        masks = [None] * model.config.num_hidden_layers
        assert step._run_fused(x.clone(), cos, sin, masks, model.new_cache(1, 8))
        for wrong in (model.new_cache(2, 8), model.new_cache(1, 8)):  # another batch; another head layout
            if wrong.k.shape[1] == 1:
                wrong.k = wrong.k.transpose(2, 3).contiguous()
            assert not step._run_fused(x.clone(), cos, sin, masks, wrong)


def test_fused_decode_steps_aside_for_forward_hooks(tmp_path, monkeypatch):
    """LoRA adds its adapters through forward hooks, which the C loop cannot run: once they are
    attached (after a plan was built) decoding goes through the modules and sees the adapters."""
    from qwenkit.model.lora import apply_lora, lora_modules

    model = qwenkit.load_model(make_checkpoint(tmp_path / "ckpt", "qwen2"), dtype=torch.float32)
    plain = _decode_logits(model, steps=4)
    assert backends.decode_step(model).plan.ok
    apply_lora(model, r=2)
    with torch.no_grad():
        for _, m in lora_modules(model):
            for b in m.lora.B.values():
                b.normal_(0, 0.5)
    taken = _spy_fused(monkeypatch)
    adapted = _decode_logits(model, steps=4)
    assert taken == [False] * 3
    assert not torch.allclose(adapted, plain, atol=1e-3)


@pytest.mark.parametrize("arch,scheme", [("qwen2", None), ("qwen3", None), ("qwen2-tied", "int8"), ("qwen2", "bf16")])
def test_fused_decode_reads_the_engines_paged_cache(tmp_path, arch, scheme, monkeypatch):
    """The engine's decode steps (rows at different positions, blocks of 4 spread over the pool,
    blocks shared through the prefix cache) run fused and give the logits the modules give, both
    with their attention reading the pool in place (`CpuSDPA.paged`) and with each row's K/V
    gathered for SDPA (the plain op's `paged`). (Not int4 here: the paged readers sum each block of 4 on
    its own, the gathered rows 64 positions at a time, and int4's activation rounding blows that
    last-bit difference up in a tiny random model.)"""
    from qwenkit.engine import Engine, EngineSettings, SamplingParams
    from qwenkit.engine.runner import ModelRunner

    model = qwenkit.load_model(make_checkpoint(tmp_path / "ckpt", arch), dtype=torch.float32, quantize=scheme)
    gen = torch.Generator().manual_seed(11)
    shared = torch.randint(0, 256, (9,), generator=gen).tolist()
    prompts = [shared + torch.randint(0, 256, (n,), generator=gen).tolist() for n in (1, 6, 13)]
    prompts.append(torch.randint(0, 256, (3,), generator=gen).tolist())
    forward, run, attend = ModelRunner.forward, FusedDecode._run_fused, cpu_kernels.attend_paged

    def serve(mode: str):
        logits, taken, in_place = [], [], []
        monkeypatch.setattr(ModelRunner, "forward", lambda self, chunks: logits.append(forward(self, chunks)) or logits[-1])
        monkeypatch.setattr(FusedDecode, "_run_fused",
                            lambda *args: taken.append(run(*args) if mode == "fused" else False) or taken[-1])
        monkeypatch.setattr(cpu_kernels, "attend_paged",  # declined: SDPA over the gathered rows
                            lambda *args: in_place.append(attend(*args) if mode == "paged" else None) or in_place[-1])
        engine = Engine(model, EngineSettings(block_size=4, num_blocks=48, max_num_seqs=4, max_prefill_tokens=16))
        for i, prompt in enumerate(prompts):
            engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), request_id=str(i))
        while engine.has_unfinished():
            engine.step()
        return logits, taken, in_place

    fused, taken, _ = serve("fused")
    paged, _, in_place = serve("paged")
    gathered, _, declined = serve("gathered")
    assert len(taken) >= 9 and all(taken)  # every decode step of the engine went through the C loop
    assert len(in_place) >= 9 * model.config.num_hidden_layers and all(o is not None for o in in_place)
    assert declined and all(o is None for o in declined)
    assert len(fused) == len(paged) == len(gathered)
    for a, b, c in zip(fused, paged, gathered):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(b, c, atol=1e-4, rtol=1e-4)


def test_a_bf16_model_attends_over_the_paged_pool_in_place(tmp_path, monkeypatch):
    """A bf16 model keeps torch's matmuls (oneDNN's bf16 GEMM) but its decode attention reads the
    engine's bf16 pool in place through the block tables; greedy tokens equal the plain model's,
    which gathers each row's K/V."""
    from qwenkit.engine import LLM, SamplingParams

    model = qwenkit.load_model(make_checkpoint(tmp_path / "ckpt", "qwen3"), dtype=torch.bfloat16)
    assert backends.installed(model) == "cpu-attention" and backends.decode_step(model) is model
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 9, 17)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    in_place, attend = [], cpu_kernels.attend_paged
    monkeypatch.setattr(cpu_kernels, "attend_paged", lambda *args: in_place.append(attend(*args)) or in_place[-1])
    fast = [c.token_ids for c in LLM(model, block_size=4).generate(prompts, params)]
    assert len(in_place) >= 11 * model.config.num_hidden_layers and all(o is not None for o in in_place)
    backends.install(model, "torch")
    in_place.clear()
    plain = [c.token_ids for c in LLM(model, block_size=4).generate(prompts, params)]
    assert in_place == [] and fast == plain
