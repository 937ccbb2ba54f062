"""Turning a request's engine outputs into an HTTP answer: one JSON body, or server-sent events.

A request with `n` choices has one engine stream and one `Reply` per choice; the body lists the
choices by index and its usage counts the prompt once and every choice's tokens. Events of the
choices are sent as they come, each chunk naming its choice's index.
Chat replies go through the tokenizer's output parser, so reasoning (`<think>`) becomes
`reasoning_content` and tool calls (in the template's format, JSON or XML) become `tool_calls` —
in a whole reply and in a stream alike (a JSON call is sent as one delta once its block is
complete; an XML call's id and name as soon as its header is, then its arguments piece by piece).
Whatever way the stream ends (finished, client gone, error), the request is aborted if still
running, so its KV blocks go back to the pool.
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

from ..engine.async_engine import RequestStream
from ..tokenizer.output import OutputDelta, OutputStream, parse_output
from .choices import merged
from .responses import Reply, total_usage


def sse(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def collect(stream: RequestStream, reply: Reply) -> tuple[str, list]:
    """The whole text and logprob entries of a request."""
    text, logprobs = [], []
    try:
        async for out in stream:
            text.append(out.text)
            logprobs += out.logprobs
            reply.record(out)
    finally:
        stream.abort()
    return "".join(text), logprobs


async def chat_body(streams: list[RequestStream], replies: list[Reply], parser: dict) -> dict:
    choices = await asyncio.gather(*(_chat_choice(s, r, parser) for s, r in zip(streams, replies)))
    return replies[0].body(list(choices), total_usage(replies))


def _choice_parser(parser: dict, reply: Reply) -> dict:
    """The parser options of one choice: tool-call ids unique across the choices."""
    if not parser or not reply.index:
        return parser
    return {**parser, "id_prefix": f"{parser['id_prefix']}{reply.index}_"}


async def _chat_choice(stream: RequestStream, reply: Reply, parser: dict) -> dict:
    text, logprobs = await collect(stream, reply)
    parser = _choice_parser(parser, reply)
    parsed = parse_output(text, **parser) if parser else None
    message = parsed.to_message() if parsed else {"role": "assistant", "content": text}
    message.setdefault("content", None)
    reply.num_tool_calls = len(message.get("tool_calls", []))
    return {"index": reply.index, "message": message, "logprobs": reply.chat_logprobs(logprobs),
            "finish_reason": reply.final_reason()}


async def text_body(streams: list[RequestStream], replies: list[Reply]) -> dict:
    choices = await asyncio.gather(*(_text_choice(s, r) for s, r in zip(streams, replies)))
    return replies[0].body(list(choices), total_usage(replies))


async def _text_choice(stream: RequestStream, reply: Reply) -> dict:
    text, logprobs = await collect(stream, reply)
    return {"index": reply.index, "text": text, "logprobs": reply.text_logprobs(logprobs),
            "finish_reason": reply.final_reason()}


async def chat_events(streams: list[RequestStream], replies: list[Reply], parser: dict,
                      include_usage: bool) -> AsyncIterator[str]:
    async for event in merged([_chat_choice_events(s, r, parser) for s, r in zip(streams, replies)]):
        yield event
    if include_usage:
        yield sse({**replies[0].chunk(None), "usage": total_usage(replies)})
    yield sse("[DONE]")


async def _chat_choice_events(stream: RequestStream, reply: Reply, parser: dict) -> AsyncIterator[str]:
    parser = _choice_parser(parser, reply)
    parse = OutputStream(**parser) if parser else None
    yield sse(reply.chunk({"index": reply.index, "delta": {"role": "assistant", "content": ""},
                           "logprobs": None, "finish_reason": None}))
    try:
        async for out in stream:
            reply.record(out)
            delta = _parse(parse, out.text, out.finished)
            payload = _chat_delta(delta, reply)
            if payload or out.logprobs:
                yield sse(reply.chunk({"index": reply.index, "delta": payload,
                                       "logprobs": reply.chat_logprobs(out.logprobs), "finish_reason": None}))
    except Exception as e:
        yield sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
    finally:
        stream.abort()
    yield sse(reply.chunk({"index": reply.index, "delta": {}, "logprobs": None, "finish_reason": reply.final_reason()}))


def _parse(parse: OutputStream | None, text: str, finished: bool) -> OutputDelta:
    if parse is None:
        return OutputDelta(content=text)
    delta = parse.feed(text)
    if finished:
        end = parse.finish()
        delta = OutputDelta(delta.content + end.content, delta.reasoning_content + end.reasoning_content,
                            delta.tool_calls + end.tool_calls, delta.errors + end.errors)
    return delta


def _chat_delta(delta: OutputDelta, reply: Reply) -> dict:
    payload = {}
    if delta.reasoning_content:
        payload["reasoning_content"] = delta.reasoning_content
    if delta.content:
        payload["content"] = delta.content
    if delta.tool_calls:
        payload["tool_calls"] = delta.tool_calls  # each with its call's index
        reply.num_tool_calls = max(reply.num_tool_calls, *(d["index"] + 1 for d in delta.tool_calls))
    return payload


async def text_events(streams: list[RequestStream], replies: list[Reply], include_usage: bool) -> AsyncIterator[str]:
    async for event in merged([_text_choice_events(s, r) for s, r in zip(streams, replies)]):
        yield event
    if include_usage:
        yield sse({**replies[0].chunk(None), "usage": total_usage(replies)})
    yield sse("[DONE]")


async def _text_choice_events(stream: RequestStream, reply: Reply) -> AsyncIterator[str]:
    offset = 0
    try:
        async for out in stream:
            reply.record(out)
            if out.text or out.logprobs or out.finished:
                choice = {"index": reply.index, "text": out.text, "logprobs": reply.text_logprobs(out.logprobs, offset),
                          "finish_reason": reply.final_reason() if out.finished else None}
                yield sse(reply.chunk(choice))
            offset += len(out.text)
    except Exception as e:
        yield sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
    finally:
        stream.abort()
