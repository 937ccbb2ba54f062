"""Parity with transformers (the reference) on tiny random checkpoints: every architecture and rope type."""

from __future__ import annotations

import pytest
import torch

import qwenkit
from tiny import ARCHS, ROPES, left_padded, load_reference, make_checkpoint, rel_diff

TOL = 1e-4
CASES = [(arch, None) for arch in ARCHS] + [("qwen2", rope) for rope in ROPES]


def _ids(n: int, seed: int = 1, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _pair(tmp_path, arch="qwen2", rope=None, **kw):
    path = make_checkpoint(tmp_path / "ckpt", arch, config_json=ROPES[rope] if rope else None, **kw)
    return qwenkit.load_model(path, dtype=torch.float32), load_reference(path)


@pytest.mark.parametrize("arch,rope", CASES, ids=[f"{a}-{r}" if r else a for a, r in CASES])
def test_logits_and_greedy_match_reference(tmp_path, arch, rope):
    ours, ref = _pair(tmp_path, arch, rope)
    ids = _ids(48)  # longer than the dynamic-NTK case's trained context (24), so its scaling acts
    with torch.no_grad():
        assert rel_diff(ours(ids), ref(ids).logits) < TOL
    prompt = ids[:, :12]
    expected = ref.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0)[0, 12:].tolist()
    assert qwenkit.generate(ours, prompt[0].tolist(), 24) == expected


def test_sharded_checkpoint_matches_reference(tmp_path):
    ours, ref = _pair(tmp_path, "qwen2_moe", max_shard_size="40KB")
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    ids = _ids(20)
    with torch.no_grad():
        assert rel_diff(ours(ids), ref(ids).logits) < TOL


def test_1024_token_input_matches_reference(tmp_path):
    ours, ref = _pair(tmp_path, "qwen3")
    ids = _ids(1024, seed=3)
    with torch.no_grad():
        assert rel_diff(ours(ids), ref(ids).logits) < TOL


def test_left_padded_batch_equals_each_sequence_alone(tmp_path):
    ours, ref = _pair(tmp_path, "qwen2")
    lengths = [5, 17, 30]
    seqs = [_ids(n, seed=10 + n)[0] for n in lengths]
    T = max(lengths)
    batch, mask = left_padded(seqs, T)
    with torch.no_grad():
        padded = ours(batch, attention_mask=mask)
        assert torch.isfinite(padded).all()
        for i, s in enumerate(seqs):
            alone_ref = ref(s[None]).logits[0]
            assert rel_diff(padded[i, T - len(s):], alone_ref) < TOL
            assert rel_diff(padded[i, T - len(s):], ours(s[None])[0]) < TOL


def test_sliding_window_changes_logits_beyond_the_window(tmp_path):
    """Guards the sliding-window parity case against passing vacuously."""
    path = make_checkpoint(tmp_path / "ckpt", "qwen2-sliding")
    windowed = qwenkit.load_model(path, dtype=torch.float32)
    assert windowed.config.window_of(2) == 8 and windowed.config.window_of(0) is None
    full_cfg = windowed.config.replace(layer_types=("full_attention",) * 3)
    full = qwenkit.build_model(full_cfg)
    full.load_state_dict(windowed.state_dict())
    ids = _ids(20)
    with torch.no_grad():
        a, b = windowed(ids), full(ids)
    assert rel_diff(a[:, :8], b[:, :8]) < 1e-6
    assert rel_diff(a[:, 12:], b[:, 12:]) > 1e-3


def test_generate_stops_at_eos_and_sampling_is_seeded(tmp_path):
    ours, _ = _pair(tmp_path, "qwen2")
    prompt = _ids(8)[0].tolist()
    greedy = qwenkit.generate(ours, prompt, 16)
    stop = greedy[5]
    cut = qwenkit.generate(ours, prompt, 16, stop_token_ids=[stop])
    assert cut == greedy[: greedy.index(stop) + 1]
    a = qwenkit.generate(ours, prompt, 16, temperature=1.0, top_p=0.9, seed=7)
    b = qwenkit.generate(ours, prompt, 16, temperature=1.0, top_p=0.9, seed=7)
    assert a == b
    assert qwenkit.generate(ours, prompt, 16, temperature=0.8, top_k=1, seed=3) == greedy
    unseeded = []
    for _ in range(2):
        torch.manual_seed(11)
        unseeded.append(qwenkit.generate(ours, prompt, 16, temperature=1.0))
    assert unseeded[0] == unseeded[1]


def test_prompt_beyond_context_is_refused(tmp_path):
    ours, _ = _pair(tmp_path, "qwen2", max_position_embeddings=32)
    with pytest.raises(qwenkit.RequestError, match="context of 32"):
        qwenkit.generate(ours, list(range(30)), 8)
