"""`qwenkit <command>`: each command is a module's `main(argv)`, imported only when used.

Errors that qwenkit raises on purpose (QwenkitError) print as one line and exit with status 1;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "generate": ("qwenkit.commands.generate", "raw completion of a prompt (no chat template)"),
    "chat": ("qwenkit.commands.chat", "chat with a model (interactive, or one turn with --message)"),
    "info": ("qwenkit.commands.info", "architecture table: layers, heads, parameters, KV bytes per token"),
    "plan": ("qwenkit.commands.plan", "memory plan: does model M fit at dtype/context/batch on N devices"),
    "pull": ("qwenkit.commands.pull", "download and verify a known model into the local cache"),
    "serve": ("qwenkit.server.command", "OpenAI-compatible HTTP server"),
    "train": ("qwenkit.train.cli", "train or fine-tune: pretrain, sft, dpo, grpo"),
    "eval": ("qwenkit.eval.cli", "benchmarks: humaneval, mbpp, gsm8k, perplexity, needle"),
    "bench": ("qwenkit.bench", "speed and memory against peers"),
}


def usage() -> str:
    lines = ["usage: qwenkit <command> [options]", "", "commands:"]
    lines += [f"  {name:10s} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`qwenkit <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .errors import QwenkitError

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"qwenkit: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as e:
        print(f"qwenkit {name}: not available ({e})", file=sys.stderr)
        return 2
    try:
        return int(module.main(rest, prog=f"qwenkit {name}") or 0)
    except QwenkitError as e:
        print(f"qwenkit {name}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
