"""The OpenAI-compatible HTTP app (FastAPI) over the AsyncEngine that `qwenkit serve` runs.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus), and the chat page at / (server/ui/; --no-ui leaves it out); LoRA
adapters' routes and `model` routing in adapters.py. With --api-key, /v1 routes and the page's
/ui/render need `Authorization: Bearer KEY`.
Every error is an OpenAI-shaped JSON body: 4xx for anything a request body can do (a body over
--max-request-bytes is 413), 429 beyond --max-queued-requests, 503 / 504 for a request the server
ended (stopping, --request-timeout), 500 only for our own failures. Prompts are tokenized off
the event loop. The command line (flags, loading, start-up) is `command.py`.
Chat messages are encoded with the
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
