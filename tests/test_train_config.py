"""The training config: unknown keys and wrong types fail before training, naming the key."""

import pytest

from qwenkit.errors import ConfigError
from qwenkit.train.config import load_config, parse_override
from train_tiny import write_config


def test_unknown_key_is_named(tmp_path):
    path = write_config(tmp_path / "c.toml", {"optim": {"lrr": 1e-3}})
    with pytest.raises(ConfigError, match="unknown key 'optim.lrr'"):
        load_config(path, "pretrain")


def test_wrong_type_is_named(tmp_path):
    path = write_config(tmp_path / "c.toml", {"run": {"max_steps": "ten"}})
    with pytest.raises(ConfigError, match="run.max_steps must be int"):
        load_config(path, "pretrain")


def test_overrides_apply_and_are_checked(tmp_path):
    path = write_config(tmp_path / "c.toml", {"optim": {"lr": 1e-3}, "lora": {"targets": ["q", "v"]}})
    cfg = load_config(path, "sft", dict([parse_override("optim.lr=2e-4"), parse_override("run.out=runs/x")]))
    assert cfg.optim.lr == 2e-4 and cfg.run.out == "runs/x" and cfg.lora.targets == ("q", "v")
    with pytest.raises(ConfigError, match="run.seed must be int"):
        load_config(path, "sft", {"run.seed": 1.5})
    with pytest.raises(ConfigError, match="unknown key 'run.sed'"):
        load_config(path, "sft", {"run.sed": 1})


def test_inconsistent_batch_and_bad_toml_fail(tmp_path):
    path = write_config(tmp_path / "c.toml", {"run": {"batch_size": 6, "micro_batch_size": 4}})
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(path, "pretrain")
    (tmp_path / "bad.toml").write_text("[run\nmax_steps = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml", "pretrain")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml", "pretrain")


def test_unknown_model_config_key_fails_before_training(tmp_path):
    from qwenkit.train.cli import main

    path = write_config(tmp_path / "c.toml", {"model.config": {"hiden_size": 32}, "data": {"train": "x.txt"}})
    with pytest.raises(ConfigError, match="model.config: unknown key 'hiden_size'"):
        from qwenkit.train.setup import model_config

        model_config(load_config(path, "pretrain"), type("T", (), {"vocab_size": 10, "eos_token_ids": []})())
    assert main(["--help"]) == 0


def test_cli_reports_bad_config_and_strict_data_in_one_line(tmp_path, capsys):
    from qwenkit.cli import main

    path = write_config(tmp_path / "c.toml", {"run": {"max_steps": "ten"}})
    assert main(["train", "pretrain", "--config", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "run.max_steps must be int" in err
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"messages": []}\n')
    sections = {"data": {"train": str(rows), "tokenizer": str(tmp_path / "none")}}
    assert main(["train", "sft", "--config", str(write_config(tmp_path / "s.toml", sections)), "--strict"]) == 1
    assert "rows.jsonl:1: malformed row (no messages list)" in capsys.readouterr().err
