"""`qwenkit chat`: talk to a model with its chat template; `--message` answers one turn and exits.

Message content is encoded injection-safely: special-token strings typed by the user stay text.
"""

from __future__ import annotations

import argparse
import sys

from .common import add_model_args, add_sampling_args, check_sampling_args, load, stream_reply


def main(argv: list[str], prog: str = "qwenkit chat") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    add_model_args(parser)
    add_sampling_args(parser, max_new_tokens=512)
    parser.add_argument("--message", help="answer this one message and exit")
    parser.add_argument("--system", help="system prompt (default: the template's own)")
    parser.add_argument("--think", choices=["on", "off"], help="Qwen3 thinking mode (default: template's)")
    args = parser.parse_args(argv)
    check_sampling_args(args)
    model, tok = load(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    thinking = None if args.think is None else args.think == "on"
    if args.message is not None:
        _turn(model, tok, history, args.message, args, thinking)
        return 0
    print("qwenkit chat: /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            del history[1 if args.system else 0:]
            continue
        if line.strip():
            _turn(model, tok, history, line, args, thinking)


def _turn(model, tok, history: list[dict], text: str, args, thinking) -> None:
    history.append({"role": "user", "content": text})
    ids = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True, enable_thinking=thinking)
    reply = stream_reply(model, tok, ids, args)
    print()
    history.append({"role": "assistant", "content": tok.decode(reply, skip_special_tokens=True)})
