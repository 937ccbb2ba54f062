"""`qwenkit train ...`: run an objective from a TOML config, or the helpers around training.

    qwenkit train pretrain|sft|dpo|grpo --config FILE.toml [--set optim.lr=1e-3 ...] [--max-steps N]
                                        [--out DIR] [--resume auto|FILE] [--strict] [--export]
    qwenkit train export --checkpoint FILE --out DIR       a training checkpoint -> HF directory
    qwenkit train tokenizer --corpus corpus:gutenberg,poetry --vocab-size 8192 --out DIR
    qwenkit train make-data json_extract|arithmetic|arithmetic_small --n 2000 --out FILE.jsonl [--seed S]
    qwenkit train score --model ID --data FILE.jsonl --reward NAME [--adapter DIR] [--limit N] [--show N]
                        [--samples N --temperature T --seed S]

Launch any objective under `torchrun --nproc-per-node N -m qwenkit.train.cli <objective> ...`
for DDP (or `--set run.distributed=fsdp` for FSDP2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import OBJECTIVES, load_config, parse_override


def _train_parser(prog: str, objective: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{prog} {objective}", description=f"train with the {objective} objective")
    p.add_argument("--config", help="TOML training config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--max-steps", type=int, help="= --set run.max_steps=N")
    p.add_argument("--out", help="= --set run.out=DIR")
    p.add_argument("--resume", help="'auto' (latest checkpoint in out) or a checkpoint file")
    p.add_argument("--strict", action="store_true", help="fail on the first malformed data row")
    p.add_argument("--export", action="store_true", help="write an HF-format directory to out/export at the end")
    return p


def overrides_from(args) -> dict:
    o = dict(parse_override(s) for s in args.set)
    for key, value in (("run.max_steps", args.max_steps), ("run.out", args.out), ("run.resume", args.resume)):
        if value is not None:
            o[key] = value
    if args.strict:
        o["data.strict"] = True
    if args.export:
        o["run.export"] = True
    return o


def train(objective: str, argv: list[str], prog: str) -> int:
    from ..errors import ConfigError
    from .distributed import init_distributed, shutdown, unwrap, wrap_model
    from .loop import Trainer
    from .setup import build_setup

    args = _train_parser(prog, objective).parse_args(argv)
    cfg = load_config(args.config, objective, overrides_from(args))
    if cfg.objective == "grpo" and cfg.run.distributed == "fsdp":
        raise ConfigError("run.distributed: GRPO samples a different length on each rank; use ddp")
    d = init_distributed(cfg.run.device)
    log = print if d.is_main else (lambda *a, **k: None)
    try:
        setup = build_setup(cfg, d.device, log)
        model = wrap_model(setup.model, d, cfg.run.distributed)
        out = Path(cfg.run.out)
        if d.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        n_params = sum(p.numel() for p in setup.model.parameters())
        n_train = sum(p.numel() for p in setup.model.parameters() if p.requires_grad)
        log(f"{objective}: {n_params / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M trained), "
            f"{len(setup.train)} train / {len(setup.eval)} eval examples, {d.world} process(es) on {d.device}")
        last = Trainer(cfg, setup, model, d, log).fit()
        _finish(cfg, setup, unwrap(model), d, log)
        log(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in last.items()}))
    finally:
        shutdown(d)
    return 0


def _finish(cfg, setup, model, d, log) -> None:
    from .export import export_hf
    from ..model.lora import save_adapter

    out = Path(cfg.run.out)
    if cfg.lora.enabled:
        save_adapter(model, out / "adapter", base_model=cfg.model.init, rank=d.rank)
        log(f"adapter: {out / 'adapter'}")
    if cfg.run.export:
        export_hf(model, out / "export", setup.tokenizer_dir, rank=d.rank)
        log(f"exported: {out / 'export'}")


def export_cmd(argv: list[str], prog: str) -> int:
    import torch

    from ..config import QwenConfig
    from ..loader import build_model
    from .config import TrainConfig
    from .export import export_hf

    p = argparse.ArgumentParser(prog=f"{prog} export", description="write a full-model checkpoint as an HF directory")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", help="tokenizer directory to copy (default: the run's data.tokenizer)")
    args = p.parse_args(argv)
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    cfg = TrainConfig.from_dict(state["train_config"], args.checkpoint)
    if cfg.lora.enabled:
        from ..errors import ConfigError

        raise ConfigError(f"{args.checkpoint}: a LoRA run; its adapter is in the run's adapter/ directory")
    model = build_model(QwenConfig.from_dict(state["model_config"]), next(iter(state["model"].values())).dtype)
    model.load_state_dict(state["model"], strict=True)
    print(export_hf(model, args.out, args.tokenizer or cfg.data.tokenizer or None))
    return 0


def tokenizer_cmd(argv: list[str], prog: str) -> int:
    from .corpora import corpus_docs
    from .tokenizer_train import train_tokenizer

    p = argparse.ArgumentParser(prog=f"{prog} tokenizer", description="train a Qwen-style byte-level BPE")
    p.add_argument("--corpus", default="corpus:gutenberg,poetry")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--max-chars", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    print(train_tokenizer(iter(corpus_docs(args.corpus, args.max_chars)), args.vocab_size, args.out))
    return 0


def make_data_cmd(argv: list[str], prog: str) -> int:
    from .tasks import TASKS, make_rows

    p = argparse.ArgumentParser(prog=f"{prog} make-data", description="write a task's rows as JSONL")
    p.add_argument("task", choices=sorted(TASKS))
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for row in make_rows(args.task, args.n, args.seed):
            f.write(json.dumps(row) + "\n")
    print(f"{args.n} {args.task} rows -> {args.out}")
    return 0


def score_cmd(argv: list[str], prog: str) -> int:
    import time

    from ..commands.common import add_model_args, check_sampling_args, load
    from ..errors import ConfigError
    from .data import read_rows
    from .grpo import greedy_answers
    from .tasks import REWARDS, prompt_messages

    p = argparse.ArgumentParser(prog=f"{prog} score", description="mean reward of greedy (and sampled) answers on held-out rows")
    add_model_args(p)
    p.add_argument("--adapter", help="a LoRA adapter directory (PEFT layout), merged into the weights")
    p.add_argument("--data", required=True, help="a .jsonl file or task:NAME:N[:SEED]")
    p.add_argument("--reward", required=True, choices=sorted(REWARDS))
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--show", type=int, default=0, help="print the first N prompts' replies and rewards")
    p.add_argument("--samples", type=int, default=0,
                   help="also sample N replies per prompt at --temperature (the reward GRPO's rollouts see)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    check_sampling_args(args)
    for flag in ("limit", "samples", "show"):
        if getattr(args, flag) < (1 if flag == "limit" else 0):
            raise ConfigError(f"--{flag} {getattr(args, flag)}: must be at least {1 if flag == 'limit' else 0}")
    model, tok = load(args, adapter=args.adapter)
    rows, report = read_rows(args.data, lambda r: None, max_rows=args.limit)
    prompts = [tok.apply_chat_template(prompt_messages(r), add_generation_prompt=True, tokenize=True) for r in rows]
    t0 = time.perf_counter()
    answers = greedy_answers(model, tok, prompts, args.max_new_tokens)
    rewards = [REWARDS[args.reward](a, row) for a, row in zip(answers, rows)]
    for row, answer, reward in list(zip(rows, answers, rewards))[:args.show]:
        print(json.dumps({"prompt": prompt_messages(row)[-1]["content"], "reply": answer, "reward": reward},
                         ensure_ascii=False))
    summary = {"mean_reward": round(sum(rewards) / max(1, len(rows)), 4), "rows": len(rows)}
    if args.samples > 0:
        many = [p for p in prompts for _ in range(args.samples)]
        sampled = greedy_answers(model, tok, many, args.max_new_tokens, args.temperature, args.seed)
        scores = [REWARDS[args.reward](a, rows[i // args.samples]) for i, a in enumerate(sampled)]
        summary.update(sampled_mean_reward=round(sum(scores) / len(scores), 4), samples=len(scores),
                       temperature=args.temperature)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(summary))
    return 0


HELPERS = {"export": export_cmd, "tokenizer": tokenizer_cmd, "make-data": make_data_cmd, "score": score_cmd}


def main(argv: list[str], prog: str = "qwenkit train") -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    name, rest = argv[0], argv[1:]
    if name in OBJECTIVES:
        return train(name, rest, prog)
    if name in HELPERS:
        return HELPERS[name](rest, prog)
    print(f"{prog}: unknown command {name!r}; choose from {', '.join((*OBJECTIVES, *HELPERS))}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # torchrun -m qwenkit.train.cli <objective> ...
    from ..cli import main as top_main

    sys.exit(top_main(["train", *sys.argv[1:]]))
