"""The OpenAI-compatible HTTP server (`qwenkit serve`); needs the `server` extra (fastapi, uvicorn)."""
