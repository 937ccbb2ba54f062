"""TrainConfig: the training config, one frozen object read from TOML plus command-line overrides.

It is separate from the model config (QwenConfig): `[model]` only says where the weights come
from (a checkpoint, or `init = "scratch"` with a `[model.config]` table of HF config.json
fields). Every key is checked before anything is built: an unknown key or a value of the wrong
type raises ConfigError naming the key, so a typo never silently trains with a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

OBJECTIVES = ("pretrain", "sft", "dpo", "grpo")


@dataclass(frozen=True)
class ModelSection:
    init: str = "scratch"  # "scratch", a checkpoint directory, a .gguf file or a model id
    config: dict = field(default_factory=dict)  # config.json fields for init = "scratch"
    dtype: str = "float32"  # parameter dtype; autocast (run.precision) is separate
    init_std: float = 0.02


@dataclass(frozen=True)
class DataSection:
    train: str = ""  # a .jsonl/.txt file, or "corpus:<name>[,<name>...]" (see corpora.py)
    eval: str = ""  # held-out file; empty: hold out eval_fraction of train
    eval_fraction: float = 0.02
    tokenizer: str = ""  # tokenizer directory or model id; empty: the model's own
    tokenizer_vocab_size: int = 0  # > 0: train a byte-level BPE of this size if `tokenizer` is absent
    seq_len: int = 256
    max_rows: int = 0  # 0: all rows
    max_corpus_chars: int = 0  # 0: the whole corpus
    strict: bool = False  # fail on the first malformed row instead of skipping it


@dataclass(frozen=True)
class OptimSection:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping


@dataclass(frozen=True)
class LoraSection:
    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class RunSection:
    out: str = "runs/train"
    max_steps: int = 100
    batch_size: int = 8  # sequences (or pairs, or prompts) per optimizer step, all ranks together
    micro_batch_size: int = 8  # per forward pass on one rank; the rest is gradient accumulation
    seed: int = 0
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32", "bf16"
    device: str = "auto"  # "auto", "cpu", "cuda"
    distributed: str = "ddp"  # under torchrun: "ddp" or "fsdp"
    eval_every: int = 50  # 0: only at the end
    eval_batches: int = 8
    checkpoint_every: int = 50  # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    resume: str = ""  # "", "auto" (latest in out/checkpoints) or a checkpoint file
    export: bool = False  # write an HF-format directory to out/export at the end


@dataclass(frozen=True)
class DPOSection:
    beta: float = 0.1


@dataclass(frozen=True)
class GRPOSection:
    group_size: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    kl_coef: float = 0.04
    reward: str = "arithmetic"  # a name in tasks.REWARDS
    rollout: str = "engine"  # "engine" (qwenkit.engine, all completions batched) or "generate" (one by one)


@dataclass(frozen=True)
class TrainConfig:
    objective: str = "pretrain"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    lora: LoraSection = field(default_factory=LoraSection)
    run: RunSection = field(default_factory=RunSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective: unknown {self.objective!r}; choose from {', '.join(OBJECTIVES)}")
        if self.run.batch_size % self.run.micro_batch_size:
            raise ConfigError(f"run.batch_size ({self.run.batch_size}) is not a multiple of "
                              f"run.micro_batch_size ({self.run.micro_batch_size})")
        if self.run.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"run.precision: {self.run.precision!r} is not auto, fp32 or bf16")
        if self.grpo.rollout not in ("engine", "generate"):
            raise ConfigError(f"grpo.rollout: {self.grpo.rollout!r} is not engine or generate")
        if self.run.distributed not in ("ddp", "fsdp"):
            raise ConfigError(f"run.distributed: {self.run.distributed!r} is not ddp or fsdp")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        return _build(cls, d, "", source)


def load_config(path: str | Path | None, objective: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a TOML file (optional), apply dotted overrides ("optim.lr": 1e-3), check every key."""
    d: dict = {}
    source = "overrides"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            d = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
    if d.get("objective", objective) != objective:
        raise ConfigError(f"{source}: config is for objective {d['objective']!r}, not {objective!r}")
    d["objective"] = objective
    for key, value in (overrides or {}).items():
        _set_dotted(d, key, value)
    return TrainConfig.from_dict(d, source)


def parse_override(text: str) -> tuple[str, Any]:
    """"optim.lr=1e-3" -> ("optim.lr", 0.001); values are TOML literals, else plain strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def _set_dotted(d: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for p in parents:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {key}: {p} is not a table")
    d[last] = value


def _build(cls, d: dict, prefix: str, source: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in d:
        if key not in names:
            raise ConfigError(f"{source}: unknown key {prefix + key!r}; known: {', '.join(sorted(names))}")
    kw = {}
    for name, value in d.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kw[name] = _build(hint, value, f"{prefix}{name}.", source)
        else:
            kw[name] = _check_type(value, hint, f"{prefix}{name}", source)
    try:
        return cls(**kw)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _check_type(value, hint, key: str, source: str):
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {type(value).__name__} ({value!r})")
        inner = typing.get_args(hint)[0]
        return tuple(_check_type(v, inner, key, source) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{source}: {key} must be {hint.__name__}, got {type(value).__name__} ({value!r})")
    return value
