"""The chat page of `qwenkit serve`: GET / (one HTML, one JS, one CSS file beside this module)
and POST /ui/render, which turns markdown into HTML with code highlighted (markdown.py).

The page talks to the same OpenAI routes as any client. Its static files are served without
the API key (they hold no data); /ui/render and the /v1 routes need it when the server has one.
A Content-Security-Policy of 'self' keeps the page from reaching any other host.
"""

from __future__ import annotations

import asyncio
from functools import cache
from importlib import resources
from typing import Annotated, Callable

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from pydantic import Field, StrictStr

from ..protocol import Strict

# Nothing but this server: scripts, styles, fetches and images all stay on the page's origin.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
STATIC = {"app.js": "text/javascript", "app.css": "text/css"}
MAX_TEXTS = 256


class RenderRequest(Strict):
    texts: Annotated[list[StrictStr], Field(max_length=MAX_TEXTS)]


@cache
def _static(name: str) -> bytes:
    return resources.files(__package__).joinpath(name).read_bytes()


def chat_page(check_key: Callable) -> APIRouter:
    """The page's routes; check_key is the API's own key check (a FastAPI dependency)."""
    from .markdown import highlight_css, render

    css = highlight_css()  # fails here, at startup, if the server extra is missing
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def index():
        return Response(_static("index.html"), media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})

    @router.get("/ui/highlight.css", include_in_schema=False)
    async def highlight():
        return Response(css, media_type="text/css", headers={"Cache-Control": "no-cache"})

    for name, media in STATIC.items():
        router.add_api_route(f"/ui/{name}", _static_route(name, media), methods=["GET"], include_in_schema=False)

    @router.post("/ui/render", dependencies=[Depends(check_key)])
    async def render_markdown(req: RenderRequest):
        return {"html": await asyncio.to_thread(lambda: [render(t) for t in req.texts])}

    return router


def _static_route(name: str, media: str):
    async def serve_file():
        return Response(_static(name), media_type=media, headers={"Cache-Control": "no-cache"})
    return serve_file
