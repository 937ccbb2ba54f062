"""The from-scratch recipe: configs/tiny.toml describes a 10-30M Qwen3-style model, and its
few-step version (configs/tiny-smoke.toml) trains a tokenizer and a model and exports them."""

import shutil
from pathlib import Path

import pytest
import torch

from qwenkit.train.config import load_config
from qwenkit.train.setup import model_config

ROOT = Path(__file__).resolve().parents[1]


class _Vocab:
    vocab_size = 8192
    eos_token_ids = [8191]


def test_tiny_recipe_is_a_small_qwen3_with_gqa_and_qk_norm():
    from qwenkit import QwenForCausalLM

    cfg = load_config(ROOT / "configs" / "tiny.toml", "pretrain")
    mcfg = model_config(cfg, _Vocab())
    assert mcfg.qk_norm and mcfg.num_key_value_heads < mcfg.num_attention_heads and mcfg.hidden_act == "silu"
    with torch.device("meta"):
        n = sum(p.numel() for p in QwenForCausalLM(mcfg).parameters())
    assert 10e6 <= n <= 30e6
    assert cfg.data.tokenizer_vocab_size == 8192


def test_tiny_smoke_recipe_trains_and_exports(tmp_path):
    if shutil.which("npm") is None:
        pytest.skip("npm is needed to fetch the corpora")
    from qwenkit import load_model, load_tokenizer
    from qwenkit.train.cli import main

    out = tmp_path / "run"
    code = main(["pretrain", "--config", str(ROOT / "configs" / "tiny-smoke.toml"), "--out", str(out),
                 "--set", f"data.tokenizer={tmp_path / 'tok'}", "--set", "data.max_corpus_chars=60000",
                 "--set", "data.seq_len=64", "--max-steps", "2"])
    assert code == 0
    tok = load_tokenizer(out / "export")
    assert tok.vocab_size == 1024 and tok.token_to_id("<|im_end|>") is not None
    assert len(tok.encode("床前明月光 and a cat")) < len("床前明月光 and a cat".encode())
    model = load_model(out / "export", dtype=torch.float32)
    assert model.config.num_hidden_layers == 6 and (out / "loss.png").is_file()
