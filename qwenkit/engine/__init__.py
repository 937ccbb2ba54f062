"""The serving engine: paged KV cache, continuous batching, prefix caching, sampling.

`LLM` is the offline API; `AsyncEngine` drives the same engine from an asyncio program
(the HTTP server, benchmarks).
"""

from .engine import Engine
from .llm import LLM, Completion
from .output import RequestOutput
from .sampling_params import SamplingParams
from .settings import EngineSettings

__all__ = ["LLM", "Completion", "Engine", "EngineSettings", "RequestOutput", "SamplingParams"]
