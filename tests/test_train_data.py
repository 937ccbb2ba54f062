"""Training data: the SFT mask covers exactly the assistant replies, malformed rows are counted and
skipped (or fail under strict), and the data order is seeded and resumable."""

import json

import pytest
import torch

from qwenkit.errors import TrainingError
from qwenkit.tokenizer import load_tokenizer
from qwenkit.train import data as D
from train_tiny import make_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_tokenizer(tmp_path_factory.mktemp("tok")))


def test_sft_mask_is_exactly_the_assistant_replies(tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat sat"},
            {"role": "assistant", "content": "a dog ran"}, {"role": "user", "content": "and then"},
            {"role": "assistant", "content": "the big red house"}]
    ids, mask = D.encode_chat(tok, msgs)
    assert ids == tok.apply_chat_template(msgs, add_generation_prompt=False, tokenize=True)
    spans, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    assert [tok.decode(s) for s in spans] == ["a dog ran<|im_end|>", "the big red house<|im_end|>"]
    ex = D.masked_example(ids, mask, seq_len=len(ids))
    supervised = ex["labels"][ex["labels"] != D.IGNORE].tolist()
    assert supervised == [t for t, m in zip(ids, mask) if m]


def test_sft_example_without_reply_in_window_is_dropped(tok):
    msgs = [{"role": "user", "content": "the cat sat on a mat " * 5}, {"role": "assistant", "content": "ok"}]
    assert D.masked_example(*D.encode_chat(tok, msgs), seq_len=8) is None


def test_malformed_rows_counted_and_skipped_or_strict(tmp_path):
    path = tmp_path / "rows.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    lines = [json.dumps(good), "{not json", json.dumps([1, 2]), json.dumps({"messages": [{"role": "user", "content": "x"}]}),
             json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "", json.dumps(good)]
    path.write_text("\n".join(lines))
    rows, report = D.read_rows(path, D.check_messages)
    assert len(rows) == 2 and report.kept == 2 and sum(report.skipped.values()) == 4
    assert "4 malformed rows skipped" in report.summary() and "not valid JSON: 1" in report.summary()
    with pytest.raises(TrainingError, match=r"rows.jsonl:2: malformed row \(not valid JSON\)"):
        D.read_rows(path, D.check_messages, strict=True)


def test_order_is_seeded_and_resumable():
    a, b = D.Order(10, seed=3), D.Order(10, seed=3)
    full = a.indices(0, 25)
    assert full[:10] != list(range(10)) and sorted(full[:10]) == list(range(10))
    assert b.indices(7, 18) == full[7:]  # starting mid-stream gives the same continuation
    assert D.Order(10, seed=4).indices(0, 10) != full[:10]


def test_packed_windows_shift_by_one():
    windows = D.pack_windows(torch.arange(50).numpy(), seq_len=8)
    batch = D.collate_windows([windows[0], windows[1]])
    assert windows.shape == (6, 9)
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    assert batch["input_ids"][1, 0] == 8
