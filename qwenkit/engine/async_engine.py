"""AsyncEngine: the engine in one background thread, driven from asyncio (servers, benchmarks).

Model calls are not thread-safe, so one thread owns the `Engine`. Callers hand it requests
and aborts through a thread-safe inbox; each request's outputs come back on its own
`asyncio.Queue`, filled from the engine thread with `loop.call_soon_threadsafe`.

    stream = async_engine.submit(prompt_ids, SamplingParams(max_tokens=32))  # RequestError if invalid
    async for out in stream:       # RequestOutput deltas; the last has finished=True
        print(out.text, end="")
    # leaving the loop early (or being cancelled) aborts the request and frees its blocks

Admission and endings the server needs: with `settings.max_queued_requests`, `submit` raises
QueueFull when that many requests already wait; with `settings.request_timeout`, a request still
unfinished that long after its arrival is aborted and its stream raises RequestEnded; `end_all`
does the same to every request (a server that stops). Either way its blocks go back to the pool.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid

from .engine import Engine
from .output import RequestOutput
from .sampling_params import SamplingParams

log = logging.getLogger("qwenkit.engine")


class QueueFull(RuntimeError):
    """`max_queued_requests` requests are already waiting: come back later."""


class RequestEnded(RuntimeError):
    """The engine ended a request before it finished; `reason` is "timeout" or "shutdown"."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class RequestStream:
    """Async iterator over one request's outputs; `abort()` (idempotent) cancels the request."""

    def __init__(self, owner: "AsyncEngine", request_id: str, num_prompt_tokens: int):
        self.owner, self.request_id, self.num_prompt_tokens = owner, request_id, num_prompt_tokens
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            item = await self.queue.get()
        except BaseException:  # cancelled (client gone): stop the work too
            self.abort()
            raise
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self.owner.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, RequestStream]] = {}
        self._stop = threading.Event()
        # `submit`s so far (event loop) and requests the engine thread has taken in: their difference is the inbox
        self._submitted = self._taken = 0
        self._deadlines: dict[str, float] = {}  # request id -> time.monotonic() it is ended at (engine thread)
        self._thread = threading.Thread(target=self._run, name="qwenkit-engine", daemon=True)

    def start(self) -> "AsyncEngine":
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(("wake",))
        self._thread.join(timeout=30)

    def running(self) -> bool:
        """Whether the engine thread is alive (False once `shutdown` has returned)."""
        return self._thread.is_alive()

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
               after: str | None = None, adapter: str | None = None) -> RequestStream:
        """Queue a request (call from the event loop); raises RequestError at once if it is invalid,
        QueueFull if `max_queued_requests` already wait.
        `after`: the id of a request with the same prompt, whose prompt K/V this one shares (the
        choices of one HTTP request: admitted with the first, never refused half-way).
        `adapter`: the name of a loaded LoRA adapter, taken now (an unload meanwhile cannot lose it)."""
        self.engine.validate(prompt_ids, params)
        limit = self.engine.settings.max_queued_requests
        if limit is not None and after is None and self.num_waiting() >= limit:
            raise QueueFull(f"{self.num_waiting()} requests are already waiting, the most this server queues "
                            "(qwenkit serve --max-queued-requests); retry later")
        lora = self.engine.adapter(adapter) if adapter is not None else None
        self._submitted += 1
        request_id = request_id or uuid.uuid4().hex
        stream = RequestStream(self, request_id, len(prompt_ids))
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._inbox.put(("add", request_id, list(prompt_ids), params, time.monotonic(), after, lora))
        return stream

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def end_all(self, message: str) -> None:
        """End every request now (any thread): each stream raises RequestEnded(message, "shutdown")."""
        self._inbox.put(("end_all", message))

    def num_waiting(self) -> int:
        """Requests not yet running: in the inbox or the scheduler's waiting queue (preempted ones too)."""
        return self._submitted - self._taken + len(self.engine.scheduler.waiting)

    def metrics(self) -> dict[str, float]:
        return {**self.engine.metrics(), "inbox": self._inbox.qsize()}

    def histograms(self) -> dict[str, tuple[tuple, list[int], float]]:
        return self.engine.histograms()

    # -- the engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not self.engine.has_unfinished())
            self._expire(time.monotonic())
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug outside the model calls (whose failures fail only their own requests)
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            for out in outputs:
                self._deliver(out.request_id, out if out.error is None else self._failed(out), out.finished)

    def _drain(self, block: bool) -> None:
        try:
            command = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                self._handle(command)
                command = self._inbox.get_nowait()
        except queue.Empty:
            return

    def _handle(self, command: tuple) -> None:
        if command[0] == "add":
            _, request_id, prompt_ids, params, arrival_time, after, lora = command
            self._taken += 1
            try:
                self.engine.add_request(prompt_ids, params, request_id, arrival_time, after, lora)
            except Exception as e:
                self._deliver(request_id, e, True)
                return
            if self.engine.settings.request_timeout is not None:
                self._deadlines[request_id] = arrival_time + self.engine.settings.request_timeout
        elif command[0] == "abort":
            self.engine.abort(command[1])
            self._streams.pop(command[1], None)
            self._deadlines.pop(command[1], None)
        elif command[0] == "end_all":
            for request_id in list(self.engine.requests):
                self._end(request_id, RequestEnded(command[1], "shutdown"))

    def _expire(self, now: float) -> None:
        timeout = self.engine.settings.request_timeout
        for request_id in [r for r, deadline in self._deadlines.items() if now >= deadline]:
            self._end(request_id, RequestEnded(
                f"the request ran past this server's limit of {timeout:g} s and was ended "
                "(qwenkit serve --request-timeout)", "timeout"))

    def _end(self, request_id: str, error: RequestEnded) -> None:
        """Abort a request (its blocks back in the pool) and make its stream raise `error`."""
        self.engine.abort(request_id)
        self._deliver(request_id, error, True)

    def _deliver(self, request_id: str, item, last: bool) -> None:
        if last:
            self._deadlines.pop(request_id, None)
        entry = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if entry is None:
            return
        loop, stream = entry
        try:
            loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop has closed
            self.engine.abort(request_id)

    @staticmethod
    def _failed(out: RequestOutput) -> Exception:
        """What the stream of a request whose step failed raises (the other requests go on)."""
        log.error("request %s failed in an engine step", out.request_id, exc_info=out.error)
        return RuntimeError(f"engine step failed for this request: {out.error}")

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
            self._deliver(request_id, RuntimeError(f"engine step failed: {error}"), True)
