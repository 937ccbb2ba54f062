"""Export: a trained model written as an HF directory loads in transformers with identical logits,
and its tokenizer files load in both tokenizers."""

import pytest
import torch

import qwenkit
from qwenkit.train.export import export_hf
from qwenkit.model.lora import apply_lora, lora_modules
from tiny import load_reference, make_checkpoint, rel_diff

TOL = 1e-4  # as the parity tests: qwenkit's CPU kernels (RMSNorm, RoPE, SwiGLU) round differently


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "qwen2_moe"])
def test_export_loads_in_transformers_with_identical_logits(arch, tmp_path):
    model = qwenkit.load_model(make_checkpoint(tmp_path / "src", arch, seed=3), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move away from the source weights, as training would
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    out = export_hf(model, tmp_path / "export")
    reference = load_reference(out)
    ids = torch.randint(0, model.config.vocab_size, (2, 13), generator=gen)
    with torch.no_grad():
        assert rel_diff(reference(input_ids=ids).logits, model(ids)) < TOL


def test_export_merges_lora_and_copies_tokenizer(tmp_path):
    from train_tiny import TINY_MODEL, make_tokenizer

    tok_dir = make_tokenizer(tmp_path / "tok")
    cfg = qwenkit.QwenConfig.from_dict({**TINY_MODEL, "vocab_size": 300})
    model = qwenkit.build_model(cfg).init_weights(0.05, seed=0)
    apply_lora(model, r=2)
    with torch.no_grad():
        for _, m in lora_modules(model):
            for b in m.lora.B.values():
                b.normal_(0, 0.1)
    ids = torch.randint(0, 300, (1, 10))
    out = export_hf(model, tmp_path / "export", tok_dir)
    assert lora_modules(model)  # still live after export
    with torch.no_grad():
        assert rel_diff(load_reference(out)(input_ids=ids).logits, model(ids)) < TOL
    import transformers

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "the cat sat on a mat"
    assert hf_tok(text).input_ids == qwenkit.load_tokenizer(out).encode(text)
