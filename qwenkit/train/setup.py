"""From a TrainConfig to the pieces the loop runs: tokenizer, model (with LoRA when asked),
objective, and the tokenised train/eval examples with their collate function.

Everything that can fail on bad input (files, keys, shapes, malformed rows) fails here, before
the first step.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import QwenConfig
from ..dtypes import DTYPE_NAMES, resolve_dtype
from ..errors import ConfigError, TrainingError
from . import data as D
from .config import TrainConfig

# Keys a [model.config] table may hold: QwenConfig's fields and the config.json spellings it reads.
_MODEL_KEYS = {f.name for f in dataclasses.fields(QwenConfig)} | {
    "rope_theta", "rope_scaling", "rope_parameters", "attention_bias", "use_sliding_window", "max_window_layers"}


@dataclass
class Setup:
    model: torch.nn.Module
    tokenizer: Any
    tokenizer_dir: Path | None
    objective: Any
    train: Any  # indexable examples
    eval: Any
    collate: Callable
    reports: list = field(default_factory=list)


def build_setup(cfg: TrainConfig, device: torch.device, log=print) -> Setup:
    # Data first: a malformed file fails before a model is loaded.
    if cfg.objective == "pretrain":
        docs, source = _pretrain_docs(cfg, log), None
    else:
        _check_reward(cfg)
        docs, source = None, _rows_split(cfg, _CHECKS[cfg.objective])
    tokenizer, tok_dir = _tokenizer(cfg, docs, log)
    model = _model(cfg, tokenizer).to(device)
    if cfg.lora.enabled:
        from ..model.lora import apply_lora

        lo = cfg.lora
        apply_lora(model, lo.r, lo.alpha, lo.dropout, lo.targets, seed=cfg.run.seed)
    build = {"pretrain": _pretrain, "sft": _sft, "dpo": _dpo, "grpo": _grpo}[cfg.objective]
    setup = build(cfg, tokenizer, model, docs if source is None else source)
    setup.tokenizer_dir = tok_dir
    for r in setup.reports:
        log(r.summary())
    return setup


def model_config(cfg: TrainConfig, tokenizer) -> QwenConfig:
    unknown = sorted(set(cfg.model.config) - _MODEL_KEYS)
    if unknown:
        raise ConfigError(f"model.config: unknown key {unknown[0]!r}")
    d = {"model_type": "qwen3", "vocab_size": tokenizer.vocab_size, **cfg.model.config}
    if tokenizer.eos_token_ids and "eos_token_id" not in d:
        d["eos_token_id"] = list(tokenizer.eos_token_ids)
    try:
        return QwenConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.config: {e}") from None


def _dtype(name: str) -> torch.dtype:
    """The parameter dtype: a name, never "auto" (training picks its precision in run.precision)."""
    if name not in DTYPE_NAMES:
        raise ConfigError(f"model.dtype: {name!r} is not one of {', '.join(DTYPE_NAMES)}")
    return resolve_dtype(name)


def _model(cfg: TrainConfig, tokenizer) -> torch.nn.Module:
    from ..loader import build_model, load_model

    if cfg.model.init == "scratch":
        mcfg = model_config(cfg, tokenizer)
        model = build_model(mcfg, _dtype(cfg.model.dtype)).init_weights(cfg.model.init_std, cfg.run.seed)
    else:
        model = load_model(cfg.model.init, dtype=_dtype(cfg.model.dtype))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model's vocab_size is "
                          f"{model.config.vocab_size}")
    return model.train()


def _tokenizer(cfg: TrainConfig, docs, log):
    from ..tokenizer import load_tokenizer

    path = cfg.data.tokenizer or ("" if cfg.model.init == "scratch" else cfg.model.init)
    if not path:
        raise ConfigError("data.tokenizer: a model trained from scratch needs a tokenizer (or tokenizer_vocab_size)")
    if not Path(path).exists() and cfg.data.tokenizer_vocab_size > 0:
        if docs is None:
            raise ConfigError("data.tokenizer_vocab_size: tokenizers are trained only for pretrain")
        from .tokenizer_train import train_tokenizer

        log(f"training a {cfg.data.tokenizer_vocab_size}-token BPE tokenizer into {path}")
        train_tokenizer(iter(docs), cfg.data.tokenizer_vocab_size, path)
    tok = load_tokenizer(path)
    tok_dir = Path(path) if Path(path).is_dir() else _checkpoint_dir(path)
    return tok, tok_dir


def _checkpoint_dir(path_or_id: str) -> Path | None:
    from ..loader import resolve_path

    try:
        p = resolve_path(path_or_id)
    except Exception:
        return None
    return p if p.is_dir() else None


# ---- per objective ----------------------------------------------------------------------------

def _pretrain_docs(cfg: TrainConfig, log) -> list[str]:
    src = cfg.data.train
    if src.startswith("corpus:"):
        from .corpora import corpus_docs

        return corpus_docs(src, cfg.data.max_corpus_chars)
    if src.endswith(".txt"):
        if not Path(src).is_file():
            raise TrainingError(f"{src}: data file not found")
        return [Path(src).read_text(encoding="utf-8", errors="replace")]
    rows, report = D.read_rows(src, _check_text, cfg.data.strict, cfg.data.max_rows)
    log(report.summary())
    return [r["text"] for r in rows]


def _check_text(row: dict) -> str | None:
    return None if isinstance(row.get("text"), str) and row["text"] else "no non-empty 'text' string"


def _pretrain(cfg, tokenizer, model, docs) -> Setup:
    from .corpora import data_home
    from .objectives import LanguageModel

    tokens = D.tokenize_corpus(docs, tokenizer, data_home() / "tokens")
    windows = D.pack_windows(tokens, cfg.data.seq_len)  # (N, T + 1)
    train_idx, eval_idx = D.split_holdout(list(range(len(windows))), cfg.data.eval_fraction, cfg.run.seed)
    return Setup(model, tokenizer, None, LanguageModel(), windows[train_idx], windows[eval_idx] if eval_idx else [],
                 D.collate_windows)


def _rows_split(cfg, check) -> tuple[list, list, list]:
    rows, report = D.read_rows(cfg.data.train, check, cfg.data.strict, cfg.data.max_rows)
    reports = [report]
    if cfg.data.eval:
        held, eval_report = D.read_rows(cfg.data.eval, check, cfg.data.strict)
        reports.append(eval_report)
        return rows, held, reports
    train, held = D.split_holdout(rows, cfg.data.eval_fraction, cfg.run.seed)
    return train, held, reports


def _sft_examples(rows, tokenizer, seq_len, report) -> list[dict]:
    out = []
    for row in rows:
        ex = D.masked_example(*D.encode_chat(tokenizer, row["messages"]), seq_len)
        if ex is None:
            report.skip(f"no assistant token within seq_len {seq_len}")
            report.kept -= 1
            continue
        out.append(ex)
    return out


def _sft(cfg, tokenizer, model, source) -> Setup:
    from .objectives import LanguageModel

    train, held, reports = source
    train = _sft_examples(train, tokenizer, cfg.data.seq_len, reports[0])
    held = _sft_examples(held, tokenizer, cfg.data.seq_len, reports[-1])
    return Setup(model, tokenizer, None, LanguageModel(), train, held, D.collate_masked, reports)


def _check_pair(row: dict) -> str | None:
    if not isinstance(row.get("prompt"), (str, list)):
        return "no 'prompt' (string or messages)"
    if not isinstance(row.get("chosen"), str) or not isinstance(row.get("rejected"), str):
        return "'chosen' and 'rejected' must be strings"
    return None


def _pair_example(row, tokenizer, seq_len) -> dict:
    from .tasks import prompt_messages

    prompt = tokenizer.apply_chat_template(prompt_messages(row), add_generation_prompt=True, tokenize=True)
    end = [tokenizer.token_to_id("<|im_end|>")]
    sides = {}
    for side in ("chosen", "rejected"):
        reply = tokenizer.encode(row[side], allow_special=False) + end
        sides[side] = D.masked_example(prompt + reply, [0] * len(prompt) + [1] * len(reply), seq_len)
    return sides


def collate_pairs(examples: list[dict]) -> dict:
    rows = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
    batch = D.collate_masked(rows)
    batch["ref"] = torch.cat([e["ref"][:1] for e in examples] + [e["ref"][1:] for e in examples])
    return batch


def _dpo(cfg, tokenizer, model, source) -> Setup:
    from .objectives import DPO, sequence_logps

    train, held, reports = source
    sets = []
    for rows, report in ((train, reports[0]), (held, reports[-1])):
        examples = []
        for row in rows:
            ex = _pair_example(row, tokenizer, cfg.data.seq_len)
            if ex["chosen"] is None or ex["rejected"] is None:
                report.skip(f"prompt longer than seq_len {cfg.data.seq_len}")
                continue
            examples.append(ex)
        sets.append(examples)
    for examples in sets:  # reference log-probs, once, with the untrained model
        for i in range(0, len(examples), cfg.run.micro_batch_size):
            chunk = examples[i : i + cfg.run.micro_batch_size]
            b = D.collate_masked([e["chosen"] for e in chunk] + [e["rejected"] for e in chunk])
            logps = sequence_logps(model, [{k: v.to(model.device) for k, v in b.items()}]).cpu()
            for j, e in enumerate(chunk):
                e["ref"] = torch.stack([logps[j], logps[len(chunk) + j]])
    return Setup(model, tokenizer, None, DPO(cfg.dpo.beta), sets[0], sets[1], collate_pairs, reports)


def _check_prompt(row: dict) -> str | None:
    if not isinstance(row.get("prompt"), (str, list)) and not isinstance(row.get("messages"), list):
        return "no 'prompt' (string or messages)"
    return None if "answer" in row else "no 'answer'"


def _check_reward(cfg: TrainConfig) -> None:
    from .tasks import REWARDS

    if cfg.objective == "grpo" and cfg.grpo.reward not in REWARDS:
        raise ConfigError(f"grpo.reward: unknown {cfg.grpo.reward!r}; known: {', '.join(REWARDS)}")


def collate_prompts(examples: list[dict]) -> dict:
    return {"prompt_ids": [e["prompt_ids"] for e in examples], "rows": [e["row"] for e in examples]}


def _grpo(cfg, tokenizer, model, source) -> Setup:
    from .grpo import GRPO
    from .tasks import REWARDS, prompt_messages

    train, held, reports = source

    def encode(rows):
        return [{"prompt_ids": tokenizer.apply_chat_template(prompt_messages(r), add_generation_prompt=True,
                                                             tokenize=True), "row": r} for r in rows]

    reference = None if cfg.lora.enabled else copy.deepcopy(model).eval().requires_grad_(False)
    objective = GRPO(cfg.grpo, tokenizer, REWARDS[cfg.grpo.reward], reference)
    return Setup(model, tokenizer, None, objective, encode(train), encode(held), collate_prompts, reports)


_CHECKS = {"sft": D.check_messages, "dpo": _check_pair, "grpo": _check_prompt}
