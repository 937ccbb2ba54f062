"""The life of `qwenkit serve`: listen, load, serve, drain, stop.

The port opens before the model loads, so a load balancer or orchestrator can ask at once:
`GET /health` is 200 while the process is alive; `GET /ready` is 200 only while the model is
loaded and the server is not draining (503 otherwise). Other routes answer 503 while loading.

On SIGTERM or SIGINT the server drains: new requests get 503 (`/metrics` still answers),
requests in flight go on until they finish or `--shutdown-timeout` passes; those still running
then are ended with an error (an SSE `data: {"error": ...}` then `[DONE]`, or a 503), and the
process exits 0 with the engine thread stopped and every KV block back in the pool (its last
line says so). A second signal ends every request that way at once and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time

import uvicorn

# Bound on uvicorn's own wait for connections once every request has ended (idle keep-alives close at once)
_CLOSE_TIMEOUT_S = 3.0
_ALWAYS_OPEN = ("/metrics",)  # answered while draining: a dashboard watches the drain


class Lifecycle:
    """The outermost ASGI app: /health and /ready, 503s while loading or draining, and the count of
    requests in flight (a streamed one until its last byte is sent)."""

    def __init__(self):
        self.app = None  # the API, once the model is loaded
        self.draining = False
        self.in_flight = 0

    @property
    def state(self) -> str:
        return "draining" if self.draining else "loading" if self.app is None else "ready"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            if self.app is not None:
                await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path == "/health":
            return await _json(send, 200, {"status": "ok", "state": self.state})
        if path == "/ready":
            return await _json(send, 200 if self.state == "ready" else 503, {"status": self.state})
        if self.app is None or (self.draining and path not in _ALWAYS_OPEN):
            message = "the model is still loading" if self.app is None else "the server is shutting down"
            return await _json(send, 503, {"error": {"message": message, "type": "server_error", "param": None,
                                                     "code": f"server_{self.state}"}},
                               [(b"retry-after", b"1")] + ([(b"connection", b"close")] if self.draining else []))
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


async def _json(send, status: int, body: dict, headers=()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class _Server(uvicorn.Server):
    """uvicorn, with the model loaded in a thread after the port opens and our own signal handling
    (uvicorn's closes the port at the first signal, so a draining server could not answer 503)."""

    def __init__(self, config, front: Lifecycle, start, shutdown_timeout: float, prog: str, ready_line: str):
        super().__init__(config)
        self.front, self.start, self.shutdown_timeout, self.prog = front, start, shutdown_timeout, prog
        self.ready_line = ready_line
        self.engine = None  # the AsyncEngine, once loaded
        self.failure: BaseException | None = None
        self._tasks: set[asyncio.Task] = set()

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        loop = asyncio.get_running_loop()
        handle = lambda sig, _frame: loop.call_soon_threadsafe(self._on_signal, sig)  # noqa: E731
        previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        loop = asyncio.get_running_loop()
        # a daemon thread, not the loop's executor: a signal during a long load must not wait for it
        threading.Thread(target=self._load, args=(loop,), name="qwenkit-load", daemon=True).start()

    def _load(self, loop) -> None:
        try:
            app, engine = self.start()
        except BaseException as e:  # noqa: BLE001  (reported by main after the server stops)
            loop.call_soon_threadsafe(self._failed, e)
            return
        loop.call_soon_threadsafe(self._loaded, app, engine)

    def _failed(self, error: BaseException) -> None:
        self.failure, self.should_exit = error, True

    def _loaded(self, app, engine) -> None:
        self.engine = engine
        if self.should_exit or self.front.draining:  # stopped while loading
            self.should_exit = True
            return
        self.front.app = app
        print(f"{self.prog}: {self.ready_line}", flush=True)

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self.front.draining or self.front.app is None:
            again = "while loading: stopping" if self.front.app is None else "again: ending every request now"
            print(f"{self.prog}: {name} {again}", flush=True)
            self.front.draining = True
            self._spawn(self._stop(f"the server was stopped ({name}) before this request finished"))
            return
        self.front.draining = True
        print(f"{self.prog}: {name}: draining {self.front.in_flight} requests (up to {self.shutdown_timeout:g} s; "
              "a second signal ends them now)", flush=True)
        self._spawn(self._drain())

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.shutdown_timeout
        while self.front.in_flight and time.monotonic() < deadline and not self.should_exit:
            await asyncio.sleep(0.05)
        await self._stop(f"the server stopped: this request was still running after --shutdown-timeout "
                         f"{self.shutdown_timeout:g} s")

    async def _stop(self, message: str) -> None:
        """End what is left with `message`, let those answers go out, then let uvicorn stop."""
        if self.engine is not None and self.front.in_flight:
            self.engine.end_all(message)
            deadline = time.monotonic() + _CLOSE_TIMEOUT_S
            while self.front.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        self.should_exit = True


def serve(start, host: str, port: int, log_level: str, shutdown_timeout: float, prog: str,
          ready_line: str) -> None:
    """Listen on host:port, run `start()` -> (ASGI app, AsyncEngine) in a thread, print `ready_line`
    once it is loaded, serve until a signal, drain, stop the engine. Raises what `start` raised,
    after the port is closed."""
    config = uvicorn.Config(Lifecycle(), host=host, port=port, log_level=log_level, lifespan="off",
                            timeout_graceful_shutdown=_CLOSE_TIMEOUT_S)
    server = _Server(config, config.app, start, shutdown_timeout, prog, ready_line)
    print(f"{prog}: listening on http://{host}:{port} (loading; /ready answers 503 until loaded)", flush=True)
    server.run()
    if server.failure is not None:
        raise server.failure
    if server.engine is not None:
        server.engine.shutdown()
        m = server.engine.metrics()
        print(f"{prog}: stopped; {int(m['finished'])} requests finished ({int(m['aborted'])} aborted); "
              f"KV blocks in use {int(m['kv_blocks_used'])} of {int(m['kv_blocks_total'])}; "
              f"engine thread {'running' if server.engine.running() else 'stopped'}", flush=True)
