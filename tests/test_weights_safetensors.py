"""Reading Hugging Face safetensors checkpoints: round trip, shards, and every corruption case."""

import json
import shutil
import struct

import pytest
import torch

from qwenkit.errors import CheckpointError, ConfigError
from qwenkit.weights import open_checkpoint

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def tiny_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY))


@pytest.fixture(scope="module")
def single_dir(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    tiny_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sharded_dir(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    tiny_model.save_pretrained(out, max_shard_size="20KB")
    return out


@pytest.fixture
def copy_of(tmp_path):
    def make(src):
        dst = tmp_path / "ckpt"
        shutil.copytree(src, dst)
        return dst

    return make


def _read_all(ckpt):
    return {name: tensor for name, tensor, _ in ckpt.tensors()}


def test_single_file_round_trips_names_shapes_values(tiny_model, single_dir):
    ckpt = open_checkpoint(single_dir)
    tensors = _read_all(ckpt)
    expected = tiny_model.state_dict()
    assert set(tensors) == set(expected)
    for name, tensor in tensors.items():
        assert torch.equal(tensor, expected[name]), name
    assert ckpt.config["hidden_size"] == 64 and ckpt.config["model_type"] == "qwen2"
    assert ckpt.source == str(single_dir)


def test_sharded_checkpoint_reads_every_shard(tiny_model, sharded_dir):
    shards = sorted(p.name for p in sharded_dir.glob("*.safetensors"))
    assert len(shards) > 1 and (sharded_dir / "model.safetensors.index.json").is_file()
    seen = list(open_checkpoint(sharded_dir).tensors())
    names = [name for name, _, _ in seen]
    assert len(names) == len(set(names))
    assert set(names) == set(tiny_model.state_dict())
    assert {f.rsplit("/", 1)[-1] for _, _, f in seen} == set(shards)


def test_tensors_are_yielded_lazily(single_dir):
    stream = open_checkpoint(single_dir).tensors()
    name, tensor, source = next(stream)
    assert isinstance(tensor, torch.Tensor) and source.endswith("model.safetensors")
    stream.close()


def test_eos_ids_come_from_generation_config_list(copy_of, single_dir):
    d = copy_of(single_dir)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    assert open_checkpoint(d).eos_token_ids == [5, 7]


def test_eos_ids_fall_back_to_config(copy_of, single_dir):
    d = copy_of(single_dir)
    (d / "generation_config.json").unlink(missing_ok=True)
    config = json.loads((d / "config.json").read_text())
    config["eos_token_id"] = 9
    (d / "config.json").write_text(json.dumps(config))
    assert open_checkpoint(d).eos_token_ids == [9]


def test_missing_config_names_the_file(copy_of, single_dir):
    d = copy_of(single_dir)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        open_checkpoint(d)


def test_non_json_config_is_a_config_error(copy_of, single_dir):
    d = copy_of(single_dir)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        open_checkpoint(d)


def test_missing_shard_names_it(copy_of, sharded_dir):
    d = copy_of(sharded_dir)
    victim = sorted(d.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        open_checkpoint(d)


def test_directory_without_weights(copy_of, single_dir):
    d = copy_of(single_dir)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        open_checkpoint(d)


def test_truncated_file_is_caught_before_reading(copy_of, single_dir):
    d = copy_of(single_dir)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        open_checkpoint(d)


@pytest.mark.parametrize(
    "head, why",
    [
        (b"\x01\x02", "truncated"),
        (struct.pack("<Q", 10**12) + b"{}", "header length"),
        (struct.pack("<Q", 8) + b"notjson!", "not JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    ],
)
def test_corrupt_header_names_the_file(copy_of, single_dir, head, why):
    d = copy_of(single_dir)
    (d / "model.safetensors").write_bytes(head)
    with pytest.raises(CheckpointError, match=f"model.safetensors.*{why}"):
        open_checkpoint(d)


def test_missing_path():
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint("/nonexistent/checkpoint")
