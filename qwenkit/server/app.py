"""`qwenkit serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the AsyncEngine.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus), and the chat page at / (server/ui/; --no-ui leaves it out); LoRA
adapters' routes and `model` routing in adapters.py. With --api-key, /v1 routes and the page's
/ui/render need `Authorization: Bearer KEY`.
Every error is an OpenAI-shaped JSON body: 4xx for anything a request body can do (a body over
--max-request-bytes is 413), 429 beyond --max-queued-requests, 503 / 504 for a request the server
ended (stopping, --request-timeout), 500 only for our own failures. Prompts are tokenized off
the event loop. `main` hands the app to `lifecycle.serve` (/ready, signals, draining).
Binds to 127.0.0.1 unless --host says otherwise. Chat messages are encoded with the
injection-safe chat encoding: special-token strings inside client text stay plain text.
"""

from __future__ import annotations

import asyncio
import hmac
import math

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..engine.async_engine import AsyncEngine, QueueFull, RequestEnded
from ..errors import RequestError, TokenizerError
from ..tokenizer.output import tool_format
from . import adapters, choices, metrics, streaming
from .limits import DEFAULT_MAX_REQUEST_BYTES, BodyLimit
from .protocol import ChatCompletionRequest, CompletionRequest
from .responses import Reply
from .ui import chat_page

_THINK_OPEN = "<think>"


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None, param=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ApiError(HTTPException):
    def __init__(self, status: int, message: str, kind: str, code: str | None = None, headers=None):
        super().__init__(status, message, headers)
        self.body = error_body(message, kind, code)


def build_app(engine: AsyncEngine, tokenizer, model_name: str, api_key: str | None = None,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, allow_runtime_lora: bool = False,
              ui: bool = True, reasoning_budget: int | None = None) -> FastAPI:
    """The app for a started AsyncEngine; routes share the engine and tokenizer.
    `reasoning_budget`: the thinking_budget of requests that set none."""
    app = FastAPI(title="qwenkit", docs_url=None, redoc_url=None)
    _install_error_handlers(app)
    _install_overload_handlers(app, engine)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    reasoning = _THINK_OPEN in (tokenizer.chat_template or "")
    tool_calls = tool_format(tokenizer.chat_template)  # the form the template teaches: JSON or XML

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        # RFC 7235: the scheme is required, and matched without regard to case
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "invalid or missing API key (send `Authorization: Bearer KEY`)",
                           "authentication_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    def check_model(name: str) -> str | None:
        """The LoRA adapter a request's `model` names (None: the base model); 404 if neither."""
        try:
            return adapters.model_route(engine, model_name, name)
        except HTTPException as e:
            raise ApiError(404, e.detail, "invalid_request_error", "model_not_found") from None

    app.include_router(adapters.router(engine, model_name, check_key, allow_runtime_lora))

    if ui:
        app.include_router(chat_page(check_key))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        text = metrics.render(engine.metrics(), engine.histograms(), model_name)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "qwenkit",
                "max_model_len": engine.engine.max_model_len}
        return {"object": "list", "data": [card, *adapters.model_cards(engine, model_name)]}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat(req: ChatCompletionRequest, request: Request):
        adapter = check_model(req.model)
        tools = req.template_tools()
        # Tokenizing a long prompt takes a while: in a thread, so the loop serves others meanwhile.
        prompt_ids = await asyncio.to_thread(tokenizer.apply_chat_template, req.template_messages(),
                                             add_generation_prompt=True, tokenize=True, tools=tools,
                                             **req.template_kwargs())
        max_tokens = req.max_completion_tokens or req.max_tokens or _rest_of_context(engine, prompt_ids)
        params = req.sampling_params(max_tokens, req.num_logprobs(), tokenizer.special_tokens, reasoning_budget,
                                     tool_format=tool_calls)
        await asyncio.to_thread(engine.engine.validate, prompt_ids, params)  # compiles a grammar off the loop
        streams = choices.submit(engine, prompt_ids, params, req.num_choices(), adapter)
        reply = Reply("chat", req.model, tokenizer, len(prompt_ids))
        replies = [reply.for_choice(k) for k in range(len(streams))]
        parser = {}
        if reasoning or tools:
            parser = dict(reasoning=reasoning, tools=tools or False, tool_format=tool_calls,
                          id_prefix=f"call_{reply.id[-12:]}_",
                          started_in_reasoning=reasoning and _opens_thinking(tokenizer, prompt_ids))
        if req.stream:
            return _sse(streaming.chat_events(streams, replies, parser, req.include_usage))
        return await _unless_disconnected(request, streams, streaming.chat_body(streams, replies, parser))

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(req: CompletionRequest, request: Request):
        adapter = check_model(req.model)
        prompt = req.prompt_input()
        prompt_ids = await asyncio.to_thread(tokenizer.encode, prompt) if isinstance(prompt, str) else list(prompt)
        params = req.sampling_params(req.max_tokens, req.logprobs, tokenizer.special_tokens)
        await asyncio.to_thread(engine.engine.validate, prompt_ids, params)  # compiles a grammar off the loop
        streams = choices.submit(engine, prompt_ids, params, req.num_choices(), adapter)
        reply = Reply("text", req.model, tokenizer, len(prompt_ids))
        replies = [reply.for_choice(k) for k in range(len(streams))]
        if req.stream:
            return _sse(streaming.text_events(streams, replies, req.include_usage))
        return await _unless_disconnected(request, streams, streaming.text_body(streams, replies))

    return app


async def _unless_disconnected(request: Request, streams, body):
    """The body, unless the client leaves first: then its requests are aborted (their blocks freed)."""
    task = asyncio.ensure_future(body)
    while not (await asyncio.wait({task}, timeout=0.25))[0]:
        if await request.is_disconnected():
            task.cancel()
            for stream in streams:
                stream.abort()
            return Response(status_code=499)
    return task.result()


def _rest_of_context(engine: AsyncEngine, prompt_ids: list[int]) -> int:
    return max(1, engine.engine.max_model_len - len(prompt_ids))


def _opens_thinking(tokenizer, prompt_ids: list[int]) -> bool:
    """Whether the prompt ends inside an opened <think> (Qwen3 thinking-only templates)."""
    return tokenizer.decode(prompt_ids[-4:]).rstrip().endswith(_THINK_OPEN)


def _sse(events) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        fields = [_field(e) for e in exc.errors()]
        problems = "; ".join(f"{field}: {_problem(e)}" for field, e in zip(fields, exc.errors()))
        return JSONResponse(error_body(problems or "invalid request", param=fields[0] if fields else None),
                            status_code=400)

    @app.exception_handler(Exception)
    async def internal(_request, exc: Exception):
        # Our failure, not the request's; still OpenAI-shaped JSON (the traceback goes to the log).
        return JSONResponse(error_body(f"internal error: {exc}", "server_error"), status_code=500)

    @app.exception_handler(RequestError)
    @app.exception_handler(TokenizerError)
    async def bad_request(_request, exc: Exception):
        return JSONResponse(error_body(str(exc)), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        body = getattr(exc, "body", None) or error_body(str(exc.detail), "invalid_request_error")
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


def _install_overload_handlers(app: FastAPI, engine: AsyncEngine) -> None:
    @app.exception_handler(QueueFull)
    async def queue_full(_request, exc: QueueFull):
        return JSONResponse(error_body(str(exc), "rate_limit_error", "queue_full"), status_code=429,
                            headers={"Retry-After": str(_retry_after(engine))})

    @app.exception_handler(RequestEnded)
    async def ended(_request, exc: RequestEnded):
        status, code = (504, "request_timeout") if exc.reason == "timeout" else (503, "server_shutdown")
        return JSONResponse(error_body(str(exc), "server_error", code), status_code=status)


def _retry_after(engine: AsyncEngine) -> int:
    """Seconds a refused client should wait: the mean queue time so far, at least 1."""
    _, counts, total = engine.histograms()["request_queue_time"]
    return max(1, math.ceil(total / counts[-1])) if counts[-1] else 1


def _problem(error: dict) -> str:
    """What is wrong, in words; for a body that is not JSON, where and why the parser stopped."""
    if error.get("type") == "json_invalid":
        loc, why = error.get("loc", ()), (error.get("ctx") or {}).get("error")
        at = f" at character {loc[1]}" if len(loc) > 1 and isinstance(loc[1], int) else ""
        return f"not valid JSON{at}" + (f" ({why})" if why else "")
    return str(error.get("msg"))


def _field(error: dict) -> str:
    """The request field a validation error is about, dotted (`messages.0.content`); "body" for the whole."""
    if error.get("type") == "json_invalid":  # its loc holds a character offset, not a field
        return "body"
    return ".".join(str(p) for p in error.get("loc", ())[1:]) or "body"


# -- command line -----------------------------------------------------------------------------

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
