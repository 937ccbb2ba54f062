"""Objectives through the one loop on a tiny model: SFT with LoRA, DPO from the reference point,
GRPO's group-normalised advantages and KL to the adapter-free reference."""

import json
import math

import pytest
import torch

from qwenkit.train.cli import main
from qwenkit.train.metrics import read_metrics
from train_tiny import TINY_MODEL, make_tokenizer, text_lines, write_config, write_sft


def _sections(tmp, train, **run):
    return {
        "model": {"init": "scratch"}, "model.config": dict(TINY_MODEL),
        "data": {"train": str(train), "tokenizer": str(make_tokenizer(tmp / "tok")), "seq_len": 48,
                 "eval_fraction": 0.1},
        "optim": {"lr": 1e-2, "warmup_steps": 1},
        "run": {"out": str(tmp / "run"), "max_steps": 4, "batch_size": 4, "micro_batch_size": 2,
                "eval_every": 0, "checkpoint_every": 0, "device": "cpu", **run},
    }


def _rows(tmp):
    return [r for r in read_metrics(tmp / "run" / "metrics.jsonl") if "eval_loss" not in r and "eval_reward" not in r]


def test_sft_with_lora_trains_only_adapters_and_saves_peft_adapter(tmp_path):
    sections = _sections(tmp_path, write_sft(tmp_path / "sft.jsonl"))
    sections["lora"] = {"enabled": True, "r": 4, "alpha": 8.0, "dropout": 0.05}
    assert main(["sft", "--config", str(write_config(tmp_path / "c.toml", sections))]) == 0
    rows = _rows(tmp_path)
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) for r in rows)
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_dpo_starts_at_log2_and_learns_the_preference(tmp_path):
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as f:
        for line in text_lines(24):
            f.write(json.dumps({"prompt": line, "chosen": "the cat sat", "rejected": "a dog ran"}) + "\n")
    sections = _sections(tmp_path, path, max_steps=6)
    sections["dpo"] = {"beta": 0.5}
    assert main(["dpo", "--config", str(write_config(tmp_path / "c.toml", sections))]) == 0
    rows = _rows(tmp_path)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["accuracy"] > 0.5


def test_grpo_advantages_are_group_normalised_and_reference_is_adapter_free(tmp_path):
    from qwenkit import build_model, load_tokenizer
    from qwenkit.config import QwenConfig
    from qwenkit.train.config import GRPOSection
    from qwenkit.train.grpo import GRPO
    from qwenkit.model.lora import apply_lora, lora_modules

    tok = load_tokenizer(make_tokenizer(tmp_path / "tok"))
    model = build_model(QwenConfig.from_dict({**TINY_MODEL, "vocab_size": tok.vocab_size})).init_weights(0.1, seed=0)
    apply_lora(model, r=2)
    with torch.no_grad():
        for _, m in lora_modules(model):
            for b in m.lora.B.values():
                b.normal_(0, 0.2)
    reward = lambda text, row: float(len(text) % 3 == 0)  # noqa: E731  (any spread of rewards)
    grpo = GRPO(GRPOSection(group_size=4, max_new_tokens=6, kl_coef=0.1), tok, reward)
    prompt = tok.apply_chat_template([{"role": "user", "content": "the cat"}], tokenize=True)
    batch = {"prompt_ids": [prompt, prompt], "rows": [{}, {}]}
    torch.manual_seed(0)
    completions, rewards, adv = grpo.rollouts(model, batch)
    assert len(completions) == 8 and adv.shape == (8,)
    assert torch.allclose(adv.view(2, 4).sum(-1), torch.zeros(2), atol=1e-4)
    torch.manual_seed(0)
    loss, metrics = grpo.loss(model, batch)
    loss.backward()
    assert metrics["kl"] > 0  # the live adapters moved the policy away from the base reference
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert math.isfinite(float(loss.detach()))


def test_grpo_run_through_the_loop(tmp_path, monkeypatch):
    from qwenkit.train import tasks

    monkeypatch.setitem(tasks.REWARDS, "toy", lambda text, row: float("the" in text))
    path = tmp_path / "prompts.jsonl"
    with open(path, "w") as f:
        for line in text_lines(10):
            f.write(json.dumps({"prompt": line, "answer": 0}) + "\n")
    sections = _sections(tmp_path, path, max_steps=2, batch_size=2, micro_batch_size=1, eval_batches=1)
    sections["grpo"] = {"group_size": 2, "max_new_tokens": 4, "reward": "toy"}
    sections["lora"] = {"enabled": True, "r": 2}
    assert main(["grpo", "--config", str(write_config(tmp_path / "c.toml", sections))]) == 0
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert {"reward", "kl", "length", "loss"} <= set(rows[0]) and "eval_reward" in rows[-1]


def test_grpo_engine_rollouts_match_generate_when_greedy(tmp_path):
    from qwenkit import build_model, load_tokenizer
    from qwenkit.config import QwenConfig
    from qwenkit.train.config import GRPOSection
    from qwenkit.train.grpo import GRPO
    from qwenkit.model.lora import apply_lora, lora_modules

    tok = load_tokenizer(make_tokenizer(tmp_path / "tok"))
    model = build_model(QwenConfig.from_dict({**TINY_MODEL, "vocab_size": tok.vocab_size})).init_weights(0.2, seed=1)
    apply_lora(model, r=2)
    with torch.no_grad():
        for _, m in lora_modules(model):
            for b in m.lora.B.values():
                b.normal_(0, 0.5)  # the engine must see the adapters too
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=True) for t in text_lines(3)]
    outs = {}
    for mode in ("engine", "generate"):
        grpo = GRPO(GRPOSection(max_new_tokens=8, temperature=0.0, rollout=mode), tok, lambda t, r: 0.0)
        outs[mode] = grpo.sample(model.eval(), prompts)
    assert outs["engine"] == outs["generate"] and all(outs["engine"])


def test_score_prints_replies_and_the_mean_reward(tmp_path, capsys):
    """`qwenkit train score --show N`: the greedy replies it prints are those of generate, each with
    its reward; the last line is the mean over all rows."""
    from qwenkit import build_model, generate, load_tokenizer
    from qwenkit.config import QwenConfig
    from qwenkit.train.export import export_hf
    from qwenkit.train.tasks import REWARDS, make_rows, prompt_messages

    tok_dir = make_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(tok_dir)
    model = build_model(QwenConfig.from_dict({**TINY_MODEL, "vocab_size": tok.vocab_size})).init_weights(0.2, seed=3)
    export_hf(model, tmp_path / "m", tok_dir)
    assert main(["score", "--model", str(tmp_path / "m"), "--data", "task:arithmetic:5:1", "--reward",
                 "arithmetic", "--max-new-tokens", "6", "--show", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and lines[-1]["rows"] == 5 and 0.0 <= lines[-1]["mean_reward"] <= 1.0
    rows = make_rows("arithmetic", 5, 1)
    for row, shown in zip(rows, lines[:2]):
        ids = tok.apply_chat_template(prompt_messages(row), add_generation_prompt=True, tokenize=True)
        reply = tok.decode(generate(model.eval(), ids, 6), skip_special_tokens=True)
        assert shown["prompt"] == prompt_messages(row)[-1]["content"] and shown["reply"] == reply
        assert shown["reward"] == REWARDS["arithmetic"](reply, row)
    # --samples: N sampled replies per prompt, seeded, so the same call gives the same mean
    runs = []
    for _ in range(2):
        assert main(["score", "--model", str(tmp_path / "m"), "--data", "task:arithmetic:5:1", "--reward", "arithmetic",
                     "--max-new-tokens", "6", "--samples", "3", "--temperature", "1.0", "--seed", "7"]) == 0
        runs.append(json.loads(capsys.readouterr().out.splitlines()[-1]))
    assert runs[0]["samples"] == 15 and 0.0 <= runs[0]["sampled_mean_reward"] <= 1.0
    assert runs[0]["sampled_mean_reward"] == runs[1]["sampled_mean_reward"] and runs[0]["mean_reward"] == lines[-1]["mean_reward"]


@pytest.mark.parametrize("task,a_max", [("arithmetic", 99), ("arithmetic_small", 9)])
def test_arithmetic_rows_carry_the_right_answer(task, a_max):
    import re

    from qwenkit.train.tasks import REWARDS, make_rows

    for row in make_rows(task, 50, 0):
        a, b, c = re.match(r"What is (\d+) \* (\d+)(?: \+ (\d+))?\?", row["prompt"]).groups()
        a, b, c = int(a), int(b), int(c or 0)
        assert a <= a_max and (c > 0) == (task == "arithmetic") and row["answer"] == a * b + c
        assert REWARDS["arithmetic"](f"so <answer>{a * b + c}</answer>", row) == 1.0
        assert REWARDS["arithmetic"](f"<answer>{a * b + c + 1}</answer>", row) == 0.2
