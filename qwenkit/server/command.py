"""`qwenkit serve`: its flags, each checked before the model loads, then the model and tokenizer
loaded and the app (app.py) handed to `lifecycle.serve` (/ready, signals, draining). Binds to
127.0.0.1 unless --host says otherwise."""

from __future__ import annotations

import math

from ..engine.async_engine import AsyncEngine
from . import adapters
from .app import build_app
from .limits import DEFAULT_MAX_REQUEST_BYTES


def parser(prog: str):
    import argparse

    from ..commands.common import add_model_args

    p = argparse.ArgumentParser(prog=prog, description="OpenAI-compatible server for a Qwen model.")
    add_model_args(p)
    p.add_argument("--tokenizer", default=None, help="tokenizer source (default: the model's)")
    p.add_argument("--served-model-name", default=None, help="the name clients pass as `model`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (also $QWENKIT_API_KEY)")
    p.add_argument("--max-request-bytes", default=str(DEFAULT_MAX_REQUEST_BYTES),
                   help="largest request body accepted, e.g. 16MiB (default 4 MiB); larger ones get 413")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-memory", default=None, help="bytes for the KV cache, e.g. 2GiB (default: a share of free memory)")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="exact KV block count (overrides --kv-cache-memory)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-prefill-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--state-snapshot-interval", type=int, default=256,
                   help="hybrid models: keep the recurrent state every N tokens for prefix hits (default 256)")
    p.add_argument("--max-state-snapshots", type=int, default=None,
                   help="hybrid models: state snapshots kept for the prefix cache (default: --max-num-seqs)")
    p.add_argument("--deterministic", action="store_true",
                   help="each request's tokens independent of what it is batched with (see docs/serving.md)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    adapters.add_flags(p)
    p.add_argument("--no-ui", action="store_true", help="no chat page at / (the API only)")
    p.add_argument("--reasoning-budget", type=int, default=None,
                   help="thinking_budget (reasoning tokens) of requests that set none (default: no limit)")
    p.add_argument("--speculative", choices=["ngram", "mtp"], default=None,
                   help="speculative decoding (prompt lookup, or the model's MTP head) for requests that ask for "
                        "none (default: off)")
    p.add_argument("--num-speculative-tokens", type=int, default=4, help="guesses a step with --speculative (default 4)")
    p.add_argument("--max-queued-requests", type=int, default=None,
                   help="requests that may wait for a place in the batch; more get 429 (default: no bound)")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="seconds from arrival after which a request is ended with an error (default: none)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds a SIGTERM/SIGINT lets requests in flight finish before ending them (default 30)")
    p.add_argument("--log-level", default="warning")
    return p


def checked_flags(args):
    """(EngineSettings, body limit in bytes) from the flags, every flag checked before the model
    loads (which can take minutes): ConfigError names the bad one."""
    from ..engine.sampling_params import MAX_SPECULATIVE_TOKENS
    from ..engine.settings import parse_size
    from ..errors import ConfigError

    if args.tensor_parallel_size < 1 or (args.threads is not None and args.threads < 1):
        raise ConfigError("--tensor-parallel-size and --threads must be >= 1")
    if args.reasoning_budget is not None and args.reasoning_budget < 0:
        raise ConfigError(f"--reasoning-budget {args.reasoning_budget}: must be >= 0")
    max_request_bytes = parse_size(args.max_request_bytes)
    if max_request_bytes < 1:
        raise ConfigError(f"--max-request-bytes {args.max_request_bytes}: must be at least 1 byte")
    if args.speculative and not 1 <= args.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
        raise ConfigError(f"--num-speculative-tokens {args.num_speculative_tokens}: must be in [1, {MAX_SPECULATIVE_TOKENS}]")
    if args.max_queued_requests is not None and args.max_queued_requests < 0:
        raise ConfigError(f"--max-queued-requests {args.max_queued_requests}: must be >= 0")
    for flag, seconds, least in (("--request-timeout", args.request_timeout, 1e-9),
                                 ("--shutdown-timeout", args.shutdown_timeout, 0)):
        if seconds is not None and not (least <= seconds < math.inf):
            raise ConfigError(f"{flag} {seconds}: must be a {'positive' if least else 'non-negative'} "
                              "number of seconds")
    check_listen(args.host, args.port)
    settings = engine_settings(args)
    if settings.kv_cache_memory is not None:  # again once the model is loaded; this one fails before the load
        from ..commands.common import model_options
        from ..engine.memory import check_fits

        check_fits(settings.kv_cache_memory, model_options(args)[0], f"--kv-cache-memory {args.kv_cache_memory}")
    return settings, max_request_bytes


def check_listen(host: str, port: int) -> None:
    """ConfigError unless a server could listen on host:port now (bound and released at once)."""
    import socket

    from ..errors import ConfigError

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: ports are 0..65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind(address)
    except OSError as e:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None


def engine_settings(args):
    from ..engine.sampling_params import SpeculativeParams
    from ..engine.settings import EngineSettings, parse_size

    memory = parse_size(args.kv_cache_memory) if args.kv_cache_memory else None
    speculative = SpeculativeParams(args.speculative, args.num_speculative_tokens) if args.speculative else None
    return EngineSettings(block_size=args.block_size, kv_cache_memory=memory, num_blocks=args.num_kv_blocks,
                          max_num_seqs=args.max_num_seqs, max_prefill_tokens=args.max_prefill_tokens,
                          max_model_len=args.max_model_len, enable_prefix_caching=not args.no_prefix_caching,
                          max_queued_requests=args.max_queued_requests, request_timeout=args.request_timeout,
                          deterministic=args.deterministic, speculative=speculative,
                          state_snapshot_interval=args.state_snapshot_interval,
                          max_state_snapshots=args.max_state_snapshots, **adapters.settings_from(args))


def load(args):
    """(model, tokenizer) as the flags ask, tensor-parallel when --tensor-parallel-size > 1."""
    import torch

    from ..commands.common import model_options
    from ..loader import load_model
    from ..tokenizer import load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = model_options(args)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    if args.tensor_parallel_size > 1:
        from ..engine.tensor_parallel import load_sharded_model

        return load_sharded_model(args.model, dtype, device, args.tensor_parallel_size), tokenizer
    return load_model(args.model, dtype, device, quantize=args.quantize), tokenizer


def main(argv: list[str], prog: str = "qwenkit serve") -> int:
    from .lifecycle import serve

    cli = parser(prog)
    args = cli.parse_args(argv)
    if args.quantize and args.tensor_parallel_size > 1:
        cli.error("--quantize does not combine with --tensor-parallel-size > 1")
    settings, max_request_bytes = checked_flags(args)

    def start():
        return started(args, settings, max_request_bytes, prog)
    if args.tensor_parallel_size > 1:  # under torchrun, ranks > 0 never return from loading: load here, not in a thread
        ready = start()
        start = lambda: ready  # noqa: E731
    page = "" if args.no_ui else f"; chat page at http://{args.host}:{args.port}/"
    serve(start, args.host, args.port, args.log_level, args.shutdown_timeout, prog,
          f"serving on http://{args.host}:{args.port}/v1{page}")
    return 0


def started(args, settings, max_request_bytes: int, prog: str):
    """(the app, its started AsyncEngine): the model loaded as the flags ask; prints the banner."""
    import os
    from pathlib import Path

    from ..engine.engine import Engine

    model, tokenizer = load(args)
    engine = Engine(model, settings, tokenizer)
    name = Path(args.served_model_name or args.model).name
    lora = adapters.load_startup(engine, args, name)
    if args.tensor_parallel_size > 1:
        from ..engine.tensor_parallel import attach

        attach(engine)
    blocks = engine.blocks
    mib = engine.runner.cache.nbytes / 2**20  # a hybrid's recurrent-state slots included
    print(f"{prog}: {name} on {model.device} ({model.dtype}); KV cache {blocks.num_blocks} blocks x "
          f"{blocks.block_size} = {engine.num_context_tokens} tokens of context ({mib:.0f} MiB); "
          f"max {engine.max_model_len} tokens per request", flush=True)
    if lora:
        print(f"{prog}: {lora}", flush=True)
    async_engine = AsyncEngine(engine).start()
    app = build_app(async_engine, tokenizer, name, args.api_key or os.environ.get("QWENKIT_API_KEY"),
                    max_request_bytes, args.allow_runtime_lora, ui=not args.no_ui,
                    reasoning_budget=args.reasoning_budget)
    return app, async_engine
