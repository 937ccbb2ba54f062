"""Loading hybrid checkpoints as published: a Qwen3.5 multimodal directory (text part under
`model.language_model.`, a vision tower, MTP weights, config under `text_config`)."""

from __future__ import annotations

import json
import logging

import torch
from safetensors.torch import load_file, save_file

import qwenkit
from hybrid_tiny import make_hybrid
from tiny import rel_diff


def _as_published(src, dst):
    """The tiny text checkpoint rearranged as Qwen3.5's multimodal release stores it."""
    dst.mkdir()
    text = json.loads((src / "config.json").read_text())
    tied = text.pop("tie_word_embeddings")
    config = {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
              "tie_word_embeddings": tied, "text_config": {**text, "mtp_num_hidden_layers": 1},
              "vision_config": {"depth": 2, "hidden_size": 32, "model_type": "qwen3_5"}}
    (dst / "config.json").write_text(json.dumps(config))
    tensors = {k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k: v
               for k, v in load_file(src / "model.safetensors").items()}
    gen = torch.Generator().manual_seed(3)
    tensors |= {"model.visual.blocks.0.attn.qkv.weight": torch.randn(96, 32, generator=gen),
                "model.visual.merger.linear_fc1.weight": torch.randn(32, 32, generator=gen),
                "mtp.fc.weight": torch.randn(64, 128, generator=gen),
                "mtp.layers.0.input_layernorm.weight": torch.randn(64, generator=gen)}
    save_file(tensors, dst / "model.safetensors")
    return tensors


def test_published_layout_loads_text_part_keeps_mtp_and_skips_vision_with_one_notice(tmp_path, caplog):
    src = make_hybrid(tmp_path / "text", "qwen3_5_text")
    tensors = _as_published(src, tmp_path / "published")
    with caplog.at_level(logging.WARNING, logger="qwenkit.loader"):
        model = qwenkit.load_model(tmp_path / "published", dtype=torch.float32)
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 1 and "skipped the vision tower (2 tensors)" in notices[0]
    assert model.config.model_type == "qwen3_5_text" and model.config.mtp_num_hidden_layers == 1
    assert sorted(model.mtp_weights) == ["mtp.fc.weight", "mtp.layers.0.input_layernorm.weight"]
    assert torch.equal(model.mtp_weights["mtp.fc.weight"], tensors["mtp.fc.weight"])
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_diff(model(ids), qwenkit.load_model(src, dtype=torch.float32)(ids)) == 0.0
