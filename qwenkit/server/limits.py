"""The cap on a request's body (`qwenkit serve --max-request-bytes`), as ASGI middleware.

A body over the cap is refused with 413 while it is being read: at the first read when its
Content-Length says so, else as soon as the bytes received pass the cap. So no client can make
the server hold, parse or tokenize megabytes it is going to refuse anyway.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException

DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20  # ~1M tokens of English text; raise it for longer contexts


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than this server's limit of {limit} bytes "
                              "(qwenkit serve --max-request-bytes)")


class BodyLimit:
    """Wraps an ASGI app: reading a request body past `max_bytes` raises BodyTooLarge, which the
    app's HTTPException handler answers (FastAPI lets HTTPExceptions from body reading through)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        received = 0

        async def limited_receive():
            nonlocal received
            if declared is not None and declared > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server rejects a malformed length itself
    return None
