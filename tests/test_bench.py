"""Benchmark plumbing that can be checked without timing anything."""

from __future__ import annotations

import torch

import qwenkit
from qwenkit.bench.bounds import weight_bytes_per_token
from qwenkit.bench.scaling import as_mha, decode_rate, kv_bytes
from qwenkit.config import QwenConfig


def _tiny(**kw):
    cfg = QwenConfig(model_type="qwen2", vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096, **kw)
    return qwenkit.build_model(cfg).init_weights(std=0.1, seed=0).eval()


def test_mha_twin_computes_the_same_function_with_a_bigger_cache():
    gqa = _tiny()
    mha = as_mha(gqa)
    ids = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(gqa(ids), mha(ids), atol=1e-5, rtol=1e-5)
    assert qwenkit.generate(gqa, ids[0].tolist(), 8) == qwenkit.generate(mha, ids[0].tolist(), 8)
    assert kv_bytes(mha, 100, 2) == 4 * kv_bytes(gqa, 100, 2)
    assert decode_rate(gqa, context=64, batch=2, steps=2) > 0


def test_weight_bytes_count_the_tied_head_once_as_a_matrix_read():
    tied, untied = _tiny(tie_word_embeddings=True), _tiny()
    matrices = sum(p.numel() * 4 for n, p in untied.named_parameters() if "embed_tokens" not in n)
    assert weight_bytes_per_token(untied) == matrices
    assert weight_bytes_per_token(tied) == matrices  # the tied head reads the embedding table


def test_bench_times_qwenkit_beside_transformers_and_names_every_peer_that_cannot_run(tmp_path):
    """`qwenkit bench` end to end in a real subprocess on a tiny checkpoint: both runners time
    every column, decode the same greedy tokens from the same weights, and a peer that cannot run
    here (llama.cpp needs a .gguf) is kept in the report with its reason."""
    import json
    import subprocess
    import sys

    from tiny import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt", "qwen2")
    out = tmp_path / "bench"
    configs = "qwenkit:float32,qwenkit:float32:int8,qwenkit:float32:bf16,transformers:float32,llama.cpp:gguf,llama.cpp:bf16"
    proc = subprocess.run([sys.executable, "-m", "qwenkit.cli", "bench", "--model", str(ckpt), "--configs", configs,
                           "--prompt-len", "24", "--new-tokens", "6", "--batch", "2", "--repeats", "1", "--threads", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "bench.json").read_text())
    ours, ref = res["configs"]["qwenkit:float32"], res["configs"]["transformers:float32"]
    for r in (ours, ref, res["configs"]["qwenkit:float32:int8"], res["configs"]["qwenkit:float32:bf16"]):
        assert r["prefill_tok_s"] > 0 and r["decode_b1_tok_s"] > 0 and r["decode_b2_tok_s"] > 0 and r["peak_rss_bytes"] > 0
    assert ours["greedy_tokens"] == ref["greedy_tokens"] and len(ours["greedy_tokens"]) == 7
    assert ".gguf" in res["configs"]["llama.cpp:gguf"]["error"]
    assert ".gguf" in res["configs"]["llama.cpp:bf16"]["error"]
    # bf16 matrices read half of fp32's bytes (norms and biases stay fp32)
    assert 0.5 < res["configs"]["qwenkit:float32:bf16"]["weight_bytes_per_token"] / ours["weight_bytes_per_token"] < 0.52
    assert "qwenkit:float32" in res["bounds"] and res["bounds"]["qwenkit:float32"]["decode_bound_tok_s"] > 0
    assert "not run" in proc.stdout and "vs transformers:float32" in proc.stdout
    assert "transformers:float32     vs qwenkit:float32: all 7 equal" in proc.stdout


def test_bench_random_weights_of_a_given_shape_are_made_once_and_run(tmp_path, monkeypatch):
    """`--model random:SHAPE` (a preset name, or here a tiny config.json): one bf16 HF directory of
    seeded random weights, cached, that `qwenkit bench` then times like any checkpoint."""
    import json
    import subprocess
    import sys

    from qwenkit.bench.exports import random_checkpoint

    cfg = tmp_path / "tiny" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps(_tiny().config.to_hf_dict()))
    monkeypatch.setenv("QWENKIT_HOME", str(tmp_path / "home"))
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "qwenkit.cli", "bench", "--model", f"random:{cfg}", "--configs",
                           "qwenkit:float32", "--prompt-len", "8", "--new-tokens", "2", "--batch", "2", "--repeats", "1",
                           "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "bench.json").read_text())["configs"]["qwenkit:float32"]["decode_b1_tok_s"] > 0
    made = random_checkpoint(str(cfg))  # the directory the run made, found again
    assert made.name == "random-tiny-bfloat16-seed0-hf"
    model = qwenkit.load_model(made, dtype=torch.float32)
    again = _tiny().to(torch.bfloat16).init_weights(seed=0)
    assert json.loads((made / "config.json").read_text())["dtype"] == "bfloat16"
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, again.model.layers[1].mlp.down_proj.weight.float())


def test_bench_serve_drives_a_quantized_server_and_transformers_on_one_checkpoint(tmp_path):
    """`qwenkit bench serve --quantize int8` end to end: a real `qwenkit serve --quantize int8`
    subprocess answers every streamed request of each concurrency level (twice as many requests
    as clients), transformers answers requests one by one, and the report names the quantization.
    Beside the clients' timings, each level carries what the server's /metrics recorded over it."""
    import json
    import subprocess
    import sys

    from test_server import VOCAB, write_tokenizer
    from tiny import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "tiny-qwen", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    write_tokenizer(ckpt)
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "qwenkit.cli", "bench", "serve", "--model", str(ckpt), "--levels", "1,3",
                           "--max-tokens", "5", "--baseline-requests", "2", "--dtype", "float32", "--quantize", "int8",
                           "--kv-cache-memory", "8MiB", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "bench_serve.json").read_text())
    assert res["quantize"] == "int8" and res["dtype"] == "float32"
    assert [(lv["clients"], lv["requests"]) for lv in res["qwenkit"]] == [(1, 2), (3, 6)]
    assert all(lv["output_tok_s"] > 0 and 0 < lv["ttft_median_s"] <= lv["ttft_p90_s"] for lv in res["qwenkit"])
    for lv in res["qwenkit"]:  # the server's histograms saw exactly this level's requests
        assert lv["server_requests"] == lv["requests"] and 0 < lv["server_ttft_median_s"] <= lv["server_ttft_p90_s"]
        assert 0 < lv["server_ttft_mean_s"] <= lv["server_e2e_mean_s"] and lv["server_queue_mean_s"] >= 0
        assert lv["server_itl_mean_s"] > 0
    assert res["transformers_sequential"]["output_tok_s"] > 0
    assert "float32 + int8" in proc.stdout
