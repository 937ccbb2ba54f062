"""`load_tokenizer(path_or_id)`: find the tokenizer files of a checkpoint and build a `Tokenizer`.

A directory may hold `tokenizer.json`, `vocab.json` + `merges.txt`, or `qwen.tiktoken`, with
`tokenizer_config.json` (template, special-token names) and `generation_config.json` (the
ids that end a turn); a `.gguf` file carries all of it in its metadata. A checkpoint of a known
line that ships no template gets its publisher's (`chat.builtin_template`, by model type).
"""

import json
from pathlib import Path

from ..errors import TokenizerError
from . import chat, sources
from .tokenizer import Tokenizer

_NAMED_SPECIALS = ("bos_token", "eos_token", "pad_token", "unk_token")


def load_tokenizer(path_or_id: str | Path, engine: str = "auto") -> Tokenizer:
    """A tokenizer from a checkpoint directory, a tokenizer file, a .gguf file or a model id.

    engine="auto" encodes with tiktoken when installed and equivalent (see fast.py);
    "tokenizers" always uses the Rust `tokenizers` pipeline.
    """
    tok = _load(path_or_id)
    tok.engine = engine if engine in ("auto", "tokenizers") else _bad_engine(engine)
    return tok


def _bad_engine(engine: str):
    raise TokenizerError(f"engine must be 'auto' or 'tokenizers', got {engine!r}")


def _load(path_or_id: str | Path) -> Tokenizer:
    path = Path(path_or_id).expanduser()
    if not path.exists():
        path = _resolve_model_id(str(path_or_id))
    if path.is_dir():
        return _from_directory(path)
    if path.suffix == ".gguf":
        return _from_gguf(path)
    if path.suffix == ".tiktoken":
        return _from_files(path.parent, sources.from_tiktoken(path), source=str(path))
    if path.name == "tokenizer.json":
        return _from_directory(path.parent)
    raise TokenizerError(f"{path}: not a tokenizer file (want a directory, .gguf, .tiktoken or tokenizer.json)")


def _resolve_model_id(model_id: str) -> Path:
    # Imported here: the weights package owns the model registry and cache (and imports torch).
    from ..weights.hub import resolve

    return Path(resolve(model_id))  # its CheckpointError names the id and the known models


def _from_directory(root: Path) -> Tokenizer:
    if (root / "tokenizer.json").is_file():
        backend = sources.from_tokenizer_json(root / "tokenizer.json")
    elif (root / "vocab.json").is_file() and (root / "merges.txt").is_file():
        added = _added_from_config(_read_json(root / "tokenizer_config.json"))
        backend = sources.from_vocab_merges(root / "vocab.json", root / "merges.txt", added)
    elif (root / "qwen.tiktoken").is_file():
        backend = sources.from_tiktoken(root / "qwen.tiktoken")
    else:
        ggufs = sorted(root.glob("*.gguf"))
        if ggufs:
            return _from_gguf(ggufs[0])
        raise TokenizerError(f"{root}: no tokenizer.json, vocab.json+merges.txt, qwen.tiktoken or .gguf")
    return _from_files(root, backend, source=str(root))


def _from_files(root: Path, backend, source: str) -> Tokenizer:
    config = _read_json(root / "tokenizer_config.json") or {}
    generation = _read_json(root / "generation_config.json") or {}
    names = {k: _token_content(config.get(k)) for k in _NAMED_SPECIALS}
    names = {k: v for k, v in names.items() if v is not None}
    if not config:  # a bare vocabulary: assume Qwen's conventions
        names = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    ids = {k: backend.token_to_id(v) for k, v in names.items()}
    eos = _as_list(generation.get("eos_token_id")) or [i for i in [ids.get("eos_token")] if i is not None]
    own = _chat_template(root, config)
    model_type = (_read_json(root / "config.json") or {}).get("model_type")
    return Tokenizer(
        backend, chat_template=own or chat.builtin_template(model_type), template_is_builtin=own is None,
        eos_token_ids=eos,
        bos_token_id=generation.get("bos_token_id", ids.get("bos_token")),
        pad_token_id=generation.get("pad_token_id", ids.get("pad_token")),
        template_vars=names, source=source)


def _from_gguf(path: Path) -> Tokenizer:
    # Imported here: the weights package pulls in torch, which text-only tokenizer use never needs.
    from ..weights.gguf import eos_token_ids, gguf_metadata

    meta = gguf_metadata(path)
    backend = sources.from_gguf_metadata(meta, path)
    tokens = meta["tokenizer.ggml.tokens"]
    key_ids = {k: meta.get(f"tokenizer.ggml.{key}") for k, key in
               (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "padding_token_id"))}
    names = {k: tokens[i] for k, i in key_ids.items() if i is not None and 0 <= i < len(tokens)}
    own = meta.get("tokenizer.chat_template")
    return Tokenizer(
        backend, chat_template=own or chat.builtin_template(meta.get("general.architecture")),
        template_is_builtin=own is None,
        eos_token_ids=eos_token_ids(meta),
        bos_token_id=key_ids["bos_token"], pad_token_id=key_ids["pad_token"],
        template_vars=names, source=str(path))


def _chat_template(root: Path, config: dict) -> str | None:
    """The checkpoint's template: chat_template.jinja (newer), else tokenizer_config.json."""
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template") or (_read_json(root / "chat_template.json") or {}).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def _added_from_config(config: dict | None) -> list[tuple[str, int, bool]] | None:
    decoder = (config or {}).get("added_tokens_decoder")
    if not decoder:
        return None
    return [(t["content"], int(i), bool(t.get("special", False))) for i, t in decoder.items()]


def _token_content(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from e
