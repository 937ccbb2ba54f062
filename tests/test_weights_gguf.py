"""Reading GGUF files: names, shapes, dequantized values, config, eos ids, and corruption cases."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

from qwenkit.config import QwenConfig
from qwenkit.errors import CheckpointError
from qwenkit.weights import open_checkpoint
from qwenkit.weights.gguf import gguf_metadata, read_header

H, I, V, HEADS, KV, LAYERS = 64, 256, 96, 4, 2, 2
E, EI, SI = 4, 32, 64  # experts, expert width, shared-expert width
D = H // HEADS
TOKENS = [f"t{i}" for i in range(V - 3)] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS = V - 1


def q4_k_rows(rows: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Hand-built Q4_K bytes (one 256-wide block per row) and the values they stand for.

    Every sub-block scale is 1 and every min 0, so each value is d * nibble: a reference that
    does not depend on the gguf package's own dequantizer.
    """
    nibbles = rng.integers(0, 16, size=(rows, 256), dtype=np.uint8)
    d = np.float16(0.125)
    scales = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1], dtype=np.uint8)
    blocks = []
    for row in nibbles:
        chunks = row.reshape(4, 2, 32)  # 64-value chunks: low nibbles first 32, high the next 32
        qs = (chunks[:, 0] | (chunks[:, 1] << 4)).reshape(128)
        blocks.append(np.concatenate([np.array([d, 0], np.float16).view(np.uint8), scales, qs]))
    return np.stack(blocks), nibbles.astype(np.float32) * np.float32(d)


def dense_arrays(rng, qk_norm=False, tied=False, bias=True) -> dict:
    """GGUF name -> float32 array in numpy (= Hugging Face) order."""
    a = {"token_embd.weight": rng.standard_normal((V, H)), "output_norm.weight": rng.standard_normal(H)}
    if not tied:
        a["output.weight"] = rng.standard_normal((V, H))
    for n in range(LAYERS):
        b = f"blk.{n}."
        a |= {b + "attn_norm.weight": rng.standard_normal(H), b + "ffn_norm.weight": rng.standard_normal(H)}
        a |= {b + "attn_q.weight": rng.standard_normal((HEADS * D, H)), b + "attn_output.weight": rng.standard_normal((H, H))}
        a |= {b + "attn_k.weight": rng.standard_normal((KV * D, H)), b + "attn_v.weight": rng.standard_normal((KV * D, H))}
        if bias:
            a |= {b + f"attn_{x}.bias": rng.standard_normal(HEADS * D if x == "q" else KV * D) for x in "qkv"}
        if qk_norm:
            a |= {b + "attn_q_norm.weight": rng.standard_normal(D), b + "attn_k_norm.weight": rng.standard_normal(D)}
    return {k: v.astype(np.float32) for k, v in a.items()}


def dense_ffn(rng) -> dict:
    return {
        f"blk.{n}.{w}.weight": rng.standard_normal((H, I) if w == "ffn_down" else (I, H)).astype(np.float32)
        for n in range(LAYERS)
        for w in ("ffn_gate", "ffn_up", "ffn_down")
    }


def moe_ffn(rng, shared: bool) -> dict:
    a = {}
    for n in range(LAYERS):
        b = f"blk.{n}."
        a[b + "ffn_gate_inp.weight"] = rng.standard_normal((E, H))
        a[b + "ffn_gate_exps.weight"] = rng.standard_normal((E, EI, H))
        a[b + "ffn_up_exps.weight"] = rng.standard_normal((E, EI, H))
        a[b + "ffn_down_exps.weight"] = rng.standard_normal((E, H, EI))
        if shared:
            a[b + "ffn_gate_shexp.weight"] = rng.standard_normal((SI, H))
            a[b + "ffn_up_shexp.weight"] = rng.standard_normal((SI, H))
            a[b + "ffn_down_shexp.weight"] = rng.standard_normal((H, SI))
            a[b + "ffn_gate_inp_shexp.weight"] = rng.standard_normal(H)
    return {k: v.astype(np.float32) for k, v in a.items()}


def write_gguf(path, arch, arrays, qtypes=None, raw=None, meta=None):
    """Write a GGUF file; returns {gguf name: the float32 values a reader must give back}."""
    qtypes, raw = qtypes or {}, raw or {}
    w = GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_embedding_length(H)
    w.add_feed_forward_length(I)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_context_length(512)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_token_list(TOKENS)
    w.add_eos_token_id(EOS)
    for key, value in (meta or {}).items():
        getattr(w, f"add_{key}")(value)
    expected = {}
    for name, arr in arrays.items():
        qtype = qtypes.get(name, Q.F32)
        if qtype == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
            expected[name] = arr.astype(np.float16).astype(np.float32)
        elif qtype == Q.F32:
            w.add_tensor(name, arr)
            expected[name] = arr
        else:
            data = quantize(arr, qtype)
            w.add_tensor(name, data, raw_dtype=qtype)
            expected[name] = dequantize(data, qtype)
    for name, (data, values, qtype) in raw.items():
        w.add_tensor(name, data, raw_dtype=qtype)
        expected[name] = values
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def read(path):
    ckpt = open_checkpoint(path)
    return ckpt, {name: t for name, t, _ in ckpt.tensors()}


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def qwen2_file(tmp_path, rng):
    arrays = dense_arrays(rng) | dense_ffn(rng)
    k_rows = {f"blk.{n}.ffn_down.weight": arrays.pop(f"blk.{n}.ffn_down.weight") for n in range(LAYERS)}
    raw = {name: (*q4_k_rows(H, rng), Q.Q4_K) for name in k_rows}  # ffn_down rows are 256 wide
    qtypes = {"token_embd.weight": Q.F16, "output.weight": Q.Q8_0}
    qtypes |= {f"blk.{n}.attn_{x}.weight": Q.Q8_0 for n in range(LAYERS) for x in ("q", "k", "v", "output")}
    path = tmp_path / "tiny-qwen2.gguf"
    expected = write_gguf(path, "qwen2", arrays, qtypes, raw)
    return path, arrays, expected


def test_q4_k_reference_matches_gguf_kernel(rng):
    data, values = q4_k_rows(3, rng)
    np.testing.assert_array_equal(dequantize(data, Q.Q4_K), values)


def test_qwen2_names_shapes_and_values(qwen2_file):
    path, originals, expected = qwen2_file
    ckpt, tensors = read(path)
    assert tensors["lm_head.weight"].shape == (V, H)
    assert tensors["model.embed_tokens.weight"].shape == (V, H)
    assert tensors["model.layers.1.self_attn.k_proj.weight"].shape == (KV * D, H)
    assert tensors["model.layers.0.self_attn.q_proj.bias"].shape == (HEADS * D,)
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (H, I)
    assert tensors["model.layers.0.mlp.gate_proj.weight"].shape == (I, H)
    assert len(tensors) == len(expected)
    for gguf_name, values in expected.items():
        got = tensors[_hf(gguf_name)]
        assert got.dtype == torch.float32
        np.testing.assert_array_equal(got.numpy(), values.reshape(got.shape), err_msg=gguf_name)
    q8 = tensors["model.layers.0.self_attn.q_proj.weight"].numpy()
    np.testing.assert_allclose(q8, originals["blk.0.attn_q.weight"], atol=0.05)


def _hf(gguf_name):
    from qwenkit.weights.gguf import hf_name

    return hf_name(gguf_name)


def test_qwen2_config(qwen2_file):
    ckpt, _ = read(qwen2_file[0])
    c = ckpt.config
    assert c["model_type"] == "qwen2" and c["num_hidden_layers"] == LAYERS and c["hidden_size"] == H
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"]) == (HEADS, KV, I)
    assert (c["rope_theta"], c["rms_norm_eps"], c["max_position_embeddings"]) == (1e6, 1e-6, 512)
    assert c["vocab_size"] == V and c["tie_word_embeddings"] is False
    assert "rope_scaling" not in c
    assert ckpt.eos_token_ids == [EOS, V - 3]
    QwenConfig.from_dict(c)


def test_tied_file_has_no_lm_head(tmp_path, rng):
    path = tmp_path / "tied.gguf"
    write_gguf(path, "qwen2", dense_arrays(rng, tied=True) | dense_ffn(rng))
    ckpt, tensors = read(path)
    assert ckpt.config["tie_word_embeddings"] is True and "lm_head.weight" not in tensors


def test_qwen3_head_dim_qk_norm_and_rope_scaling(tmp_path, rng):
    path = tmp_path / "q3.gguf"
    meta = {"key_length": D, "value_length": D, "rope_scaling_type": _yarn(), "rope_scaling_factor": 4.0, "rope_scaling_orig_ctx_len": 128}
    write_gguf(path, "qwen3", dense_arrays(rng, qk_norm=True, bias=False) | dense_ffn(rng), meta=meta)
    ckpt, tensors = read(path)
    assert tensors["model.layers.1.self_attn.q_norm.weight"].shape == (D,)
    assert tensors["model.layers.1.self_attn.k_norm.weight"].shape == (D,)
    c = ckpt.config
    assert c["head_dim"] == D and c["attention_bias"] is False
    assert c["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    cfg = QwenConfig.from_dict(c)
    assert cfg.rope["rope_type"] == "yarn" and cfg.qk_norm


def test_qwen3_head_dim_without_key_length_comes_from_q_proj(tmp_path, rng):
    path = tmp_path / "q3-nokey.gguf"
    write_gguf(path, "qwen3", dense_arrays(rng, qk_norm=True, bias=False) | dense_ffn(rng))
    ckpt, _ = read(path)
    assert ckpt.config["head_dim"] == D
    assert QwenConfig.from_dict(ckpt.config).head_dim == D  # not transformers' qwen3 default of 128


def _yarn():
    from gguf import RopeScalingType

    return RopeScalingType.YARN


@pytest.mark.parametrize("arch, shared, norm", [("qwen2moe", True, False), ("qwen3moe", False, True)])
def test_moe_experts_are_stacked_in_hf_layout(tmp_path, rng, arch, shared, norm):
    path = tmp_path / f"{arch}.gguf"
    meta = {"expert_count": E, "expert_used_count": 2, "expert_feed_forward_length": EI}
    if shared:
        meta["expert_shared_feed_forward_length"] = SI
    arrays = dense_arrays(rng, qk_norm=arch == "qwen3moe", bias=arch == "qwen2moe") | moe_ffn(rng, shared)
    expected = write_gguf(path, arch, arrays, {"blk.0.ffn_gate_exps.weight": Q.Q8_0}, meta=meta)
    ckpt, t = read(path)
    m = "model.layers.1.mlp."
    assert t[m + "gate.weight"].shape == (E, H)
    assert t[m + "experts.gate_proj"].shape == t[m + "experts.up_proj"].shape == (E, EI, H)
    assert t[m + "experts.down_proj"].shape == (E, H, EI)
    np.testing.assert_array_equal(t["model.layers.0.mlp.experts.gate_proj"].numpy(), expected["blk.0.ffn_gate_exps.weight"])
    np.testing.assert_array_equal(t[m + "experts.down_proj"][2].numpy(), arrays["blk.1.ffn_down_exps.weight"][2])
    c = ckpt.config
    assert (c["num_experts"], c["num_experts_per_tok"], c["moe_intermediate_size"]) == (E, 2, EI)
    assert c["norm_topk_prob"] is norm
    if shared:
        assert t[m + "shared_expert.gate_proj.weight"].shape == (SI, H)
        assert t[m + "shared_expert.down_proj.weight"].shape == (H, SI)
        assert t[m + "shared_expert_gate.weight"].shape == (1, H)
        assert c["shared_expert_intermediate_size"] == SI
    assert QwenConfig.from_dict(c).is_moe


def test_header_parser_agrees_with_gguf_reader(qwen2_file):
    path = qwen2_file[0]
    ours, theirs = read_header(path), GGUFReader(path)
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]
    assert list(ours.metadata) == keys
    for k in keys:
        assert ours.metadata[k] == pytest.approx(theirs.fields[k].contents()), k
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.name, a.dims, a.qtype, a.offset, a.nbytes) == (b.name, tuple(b.shape.tolist()), b.tensor_type, b.data_offset, b.n_bytes)


def test_metadata_is_plain_python(qwen2_file):
    meta = gguf_metadata(qwen2_file[0])
    assert meta["general.architecture"] == "qwen2"
    assert meta["tokenizer.ggml.tokens"][-1] == "<|im_end|>"
    assert type(meta["qwen2.block_count"]) is int and type(meta["qwen2.rope.freq_base"]) is float


@pytest.mark.parametrize("arch", ["qwen2", "qwen2moe"])
def test_transformers_gguf_loader_agrees(tmp_path, rng, arch):
    """Names, shapes, values and config against transformers' own GGUF loader."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = tmp_path / f"{arch}.gguf"
    if arch == "qwen2":
        write_gguf(path, arch, dense_arrays(rng) | dense_ffn(rng), {"output.weight": Q.Q8_0})
    else:
        meta = {"expert_count": E, "expert_used_count": 2, "expert_feed_forward_length": EI}
        write_gguf(path, arch, dense_arrays(rng) | moe_ffn(rng, shared=True), meta=meta | {"expert_shared_feed_forward_length": SI})
    ref_config = load_gguf_checkpoint(str(path))["config"]
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**ref_config))
    ref = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    ckpt, ours = read(path)
    for name, tensor in _fuse_gate_up(ours).items():
        torch.testing.assert_close(tensor, torch.as_tensor(ref.pop(name)).float(), msg=name)
    assert not ref, f"transformers has tensors qwenkit lacks: {sorted(ref)}"
    for key, value in ref_config.items():
        assert ckpt.config[key] == pytest.approx(value), key


def _fuse_gate_up(tensors: dict) -> dict:
    """transformers >= 5 stores stacked experts as one gate_up_proj [E, 2I, H]."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("experts.gate_proj"):
            out[name.replace("gate_proj", "gate_up_proj")] = torch.cat([t, tensors[name.replace("gate_", "up_")]], dim=1)
        elif not name.endswith("experts.up_proj"):
            out[name] = t
    return out


# ---- corruption ---------------------------------------------------------------------------------
def test_bad_magic(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(CheckpointError, match="x.gguf.*not a GGUF"):
        open_checkpoint(path)


@pytest.mark.parametrize("keep", [30, 400, -10])
def test_truncated_file(qwen2_file, tmp_path, keep):
    data = qwen2_file[0].read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match="cut.gguf.*truncated"):
        open_checkpoint(path)


def test_unsupported_architecture(tmp_path, rng):
    path = tmp_path / "llama.gguf"
    write_gguf(path, "llama", dense_arrays(rng))
    with pytest.raises(CheckpointError, match="llama.gguf.*'llama'"):
        open_checkpoint(path)


def test_unsupported_quant_type_names_the_tensor(tmp_path, rng):
    path = tmp_path / "q81.gguf"
    arrays = dense_arrays(rng)
    block, type_size = GGML_QUANT_SIZES[Q.Q8_1]
    data = np.zeros((KV * D, H // block * type_size), np.uint8)
    raw = {"blk.0.attn_k.weight": (data, None, Q.Q8_1)}
    del arrays["blk.0.attn_k.weight"]
    write_gguf(path, "qwen2", arrays, raw=raw)
    with pytest.raises(CheckpointError, match="'blk.0.attn_k.weight'.*Q8_1"):
        open_checkpoint(path)


def test_unknown_tensor_name(tmp_path, rng):
    path = tmp_path / "odd.gguf"
    write_gguf(path, "qwen2", dense_arrays(rng) | {"blk.0.mystery.weight": np.zeros(4, np.float32)})
    with pytest.raises(CheckpointError, match="blk.0.mystery.weight"):
        open_checkpoint(path)


# ---- the real default model ---------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_file():
    from qwenkit.weights.hub import pull

    ckpt = open_checkpoint(pull("qwen2.5-coder-0.5b-instruct", progress=False))
    c = ckpt.config
    assert (c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]) == (24, 896, 14, 2)
    assert (c["intermediate_size"], c["vocab_size"], c["rope_theta"]) == (4864, 151936, 1e6)
    assert c["tie_word_embeddings"] is False
    assert 151645 in ckpt.eos_token_ids and 151643 in ckpt.eos_token_ids
    from qwenkit.weights.gguf import hf_name

    names = [hf_name(t.name) for t in read_header(pull("qwen2.5-coder-0.5b-instruct", progress=False)).tensors]
    assert len(names) == 291 == len(set(names))
    first = next(ckpt.tensors())
    assert first[0] == "lm_head.weight" and first[1].shape == (151936, 896)


def test_bench_bf16_copy_has_the_files_weights_rounded_to_bf16(qwen2_file, tmp_path, monkeypatch):
    """The bf16 GGUF llama.cpp runs in `qwenkit bench`: every matrix is the source's, dequantized and
    rounded to bf16 as torch rounds it; vectors stay fp32; the config reads back the same."""
    import torch

    from qwenkit.bench.exports import bf16_gguf_for

    monkeypatch.setenv("QWENKIT_HOME", str(tmp_path / "home"))
    path, _, _ = qwen2_file
    copy = bf16_gguf_for(str(path))
    assert copy.name == "tiny-qwen2-bf16.gguf" and bf16_gguf_for(str(path)) == copy  # cached
    types = {t.name: t.tensor_type for t in GGUFReader(copy).tensors}
    assert types["output.weight"] == Q.BF16 and types["blk.0.ffn_down.weight"] == Q.BF16
    assert types["output_norm.weight"] == Q.F32 and types["blk.0.attn_q.bias"] == Q.F32
    (src, want), (dst, got) = read(path), read(copy)
    assert dst.config == src.config and want.keys() == got.keys()
    for name, t in want.items():
        expect = t.float().to(torch.bfloat16).float() if t.dim() >= 2 else t.float()
        assert torch.equal(got[name].float(), expect), name
