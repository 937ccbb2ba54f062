"""Bad input reaches the user as one clear line naming the file (and tensor), never a traceback."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from tiny import make_checkpoint


def run_cli(*args, env=None, timeout=120):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "qwenkit.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "%|" not in line]  # minus progress bars
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("good") / "ckpt", "qwen2", max_shard_size="60KB")


def _copy(good, tmp_path):
    import shutil

    return shutil.copytree(good, tmp_path / "ckpt")


def _generate(path, **env):
    return run_cli("generate", "--model", str(path), "--prompt", "hi", "--dtype", "fp32", env=env)


def _shards(path):
    return sorted(path.glob("model-*.safetensors"))


def test_missing_config(good, tmp_path):
    path = _copy(good, tmp_path)
    (path / "config.json").unlink()
    assert_one_line_error(_generate(path), "config.json")


def test_missing_shard(good, tmp_path):
    path = _copy(good, tmp_path)
    shard = _shards(path)[1]
    shard.unlink()
    assert_one_line_error(_generate(path), shard.name)


def test_unknown_model_type(good, tmp_path):
    path = _copy(good, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "llama4"
    (path / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(_generate(path), "llama4", "config.json")


def _edit_shard(path, edit):
    shard = _shards(path)[0]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: v for k, v in data["weight_map"].items() if v != shard.name}
    data["weight_map"].update({k: shard.name for k in tensors})
    index.write_text(json.dumps(data))
    return shard, sorted(tensors)


def test_missing_tensor(good, tmp_path):
    path = _copy(good, tmp_path)
    _edit_shard(path, lambda t: t.pop("model.norm.weight", None) if "model.norm.weight" in t else t.pop(sorted(t)[0]))
    proc = _generate(path)
    assert_one_line_error(proc, "missing")


def test_unexpected_tensor(good, tmp_path):
    import torch

    path = _copy(good, tmp_path)
    shard, _ = _edit_shard(path, lambda t: t.__setitem__("model.layers.0.mlp.extra_proj.weight", torch.ones(2, 2)))
    assert_one_line_error(_generate(path), shard.name, "model.layers.0.mlp.extra_proj.weight", "unexpected")


def test_wrong_shape(good, tmp_path):
    import torch

    path = _copy(good, tmp_path)
    name = "model.layers.0.self_attn.k_proj.weight"

    shard = next(s for s in _shards(path) if name in load_file(s))
    tensors = load_file(shard)
    tensors[name] = torch.ones(3, 64)
    save_file(tensors, shard, metadata={"format": "pt"})
    assert_one_line_error(_generate(path), shard.name, name, "shape [3, 64]")


def test_truncated_safetensors(good, tmp_path):
    path = _copy(good, tmp_path)
    shard = _shards(path)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert_one_line_error(_generate(path), shard.name)


def test_corrupt_safetensors_header(good, tmp_path):
    path = _copy(good, tmp_path)
    shard = _shards(path)[0]
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    shard.write_bytes(bytes(data))
    assert_one_line_error(_generate(path), shard.name)


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\x00" * 7)
    assert_one_line_error(_generate(bad), "model.gguf")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"hello world, not a model" * 10)
    assert_one_line_error(_generate(bad), "model.gguf")


def test_sha256_mismatch_of_cached_default_model(tmp_path):
    """A cached file whose digest is wrong is never trusted (offline: it cannot be refetched)."""
    from qwenkit.weights.hub import DEFAULT_MODEL, REGISTRY

    entry = REGISTRY[DEFAULT_MODEL]
    target = tmp_path / "models" / entry.id / entry.filename
    target.parent.mkdir(parents=True)
    with open(target, "wb") as f:
        f.truncate(entry.size)  # right size, wrong content (sparse: costs no disk)
    proc = run_cli("pull", env={"QWENKIT_HOME": str(tmp_path), "QWENKIT_OFFLINE": "1"})
    assert_one_line_error(proc, entry.filename)
    assert "sha256" in proc.stderr


def test_unknown_model_id():
    assert_one_line_error(_generate("no-such-model-xyz"), "no-such-model-xyz")


def test_unknown_device(good):
    proc = run_cli("generate", "--model", str(good), "--prompt", "hi", "--device", "gpu")
    assert_one_line_error(proc, "'gpu'")


# Flags are checked before the model loads: with a model id that does not exist, the error still
# names the flag, so it came first.

@pytest.mark.parametrize("flag,value", [("--max-new-tokens", "-5"), ("--temperature", "nan"), ("--top-p", "0"),
                                        ("--top-k", "-3"), ("--temperature", "-1")])
def test_bad_sampling_flags_fail_before_the_model_loads(flag, value):
    for command in ("generate", "chat"):
        proc = run_cli(command, "--model", "no-such-model-xyz", "--prompt" if command == "generate" else "--message",
                       "hi", flag, value)
        assert_one_line_error(proc, f"{flag} {value}")


@pytest.mark.parametrize("flags,needle", [(["--port", "99999"], "--port 99999"), (["--port", "-1"], "--port -1"),
                                          (["--max-request-bytes", "lots"], "lots"),
                                          (["--host", "192.0.2.1"], "--host 192.0.2.1"),
                                          (["--threads", "0"], "--threads")])
def test_bad_serve_flags_fail_before_the_model_loads(flags, needle):
    assert_one_line_error(run_cli("serve", "--model", "no-such-model-xyz", *flags), needle)


def test_serve_on_a_port_in_use_fails_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli("serve", "--model", "no-such-model-xyz", "--port", str(port))
    assert_one_line_error(proc, f"--port {port}", "in use")


@pytest.mark.parametrize("args,needle", [
    (["eval", "humaneval", "--temperature", "nan"], "--temperature nan"),
    (["eval", "humaneval", "--max-tokens", "-3"], "--max-tokens -3"),
    (["eval", "gsm8k", "--n", "0"], "--n 0"),
    (["eval", "perplexity", "--context", "0"], "--context 0"),
    (["train", "score", "--data", "task:arithmetic:3", "--reward", "arithmetic", "--temperature", "-1"],
     "--temperature -1"),
    (["train", "score", "--data", "task:arithmetic:3", "--reward", "arithmetic", "--limit", "0"], "--limit 0"),
])
def test_bad_eval_and_train_score_flags_fail_before_the_model_loads(args, needle):
    assert_one_line_error(run_cli(*args, "--model", "no-such-model-xyz"), needle)
