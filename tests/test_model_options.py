"""One set of model options: every command that loads a model offers the same --model, --dtype,
--device (and --quantize), and dtype and device names resolve in one place, qwenkit.dtypes."""

from __future__ import annotations

import pytest
import torch

from qwenkit.dtypes import DTYPE_NAMES, auto_dtype, resolve_device, resolve_dtype
from qwenkit.errors import ConfigError

MODEL_COMMANDS = ["generate", "chat", "serve", "eval", "bench serve", "bench scaling", "train score"]


def test_resolve_dtype_takes_names_and_dtypes():
    assert resolve_dtype("bf16") is resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("fp32") is torch.float32 and resolve_dtype("float16") is torch.float16
    assert resolve_dtype(torch.float16) is torch.float16
    assert resolve_dtype("auto", "cpu") is auto_dtype("cpu")
    with pytest.raises(ValueError, match="fp8"):
        resolve_dtype("fp8")


def test_auto_device_and_bad_devices():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="gpu"):
        resolve_device("gpu")


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_every_model_command_has_the_same_model_options(command, capsys, monkeypatch):
    if command == "serve":
        pytest.importorskip("fastapi")
    from qwenkit.cli import main

    monkeypatch.setenv("COLUMNS", "250")  # argparse wraps help at the terminal width
    with pytest.raises(SystemExit) as done:
        main([*command.split(), "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--model MODEL" in out and "--device DEVICE" in out
    assert f"--dtype {{{','.join(['auto', *DTYPE_NAMES])}}}" in out
    assert "auto (default: cuda when available, else cpu)" in out
    assert ("--quantize" in out) == (command != "bench scaling")
