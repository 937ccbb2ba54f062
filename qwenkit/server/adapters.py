"""LoRA adapters served beside the base model, under vLLM's names.

`qwenkit serve --lora NAME=DIR ...` loads adapters at start; with `--allow-runtime-lora`,
POST /v1/load_lora_adapter {"lora_name", "lora_path"} and POST /v1/unload_lora_adapter
{"lora_name"} change them while serving (paths are read on the server's host: the routes need the
API key when there is one). A request picks an adapter with `model: NAME` (`model_route`);
/v1/models lists each with `parent` = the base model. The engine runs every adapter and the base
model in the same batches (`qwenkit/model/multi_lora.py`). Unloading an adapter that requests
still use is deferred: its name goes at once, its requests finish with it, then its slot frees.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse
from pydantic import ConfigDict, Field
from starlette.exceptions import HTTPException

from ..engine.async_engine import AsyncEngine
from ..errors import CheckpointError, ConfigError, RequestError
from .protocol import Strict


class LoadLoRAAdapterRequest(Strict):
    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(Strict):
    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1)


def model_route(engine: AsyncEngine, model_name: str, requested: str) -> str | None:
    """None when a request names the base model, the adapter's name when it names a loaded
    adapter; a 404 naming it and what is served otherwise."""
    if requested == model_name:
        return None
    adapters = engine.engine.adapters
    if adapters is not None and requested in adapters.loaded:
        return requested
    loras = sorted(adapters.loaded) if adapters is not None else []
    served = ", ".join(repr(n) for n in [model_name, *loras])
    raise HTTPException(404, f"model {requested!r} does not exist; this server has {served}")


def model_cards(engine: AsyncEngine, model_name: str) -> list[dict]:
    """/v1/models entries of the loaded adapters (vLLM's shape: root = its path, parent = the base)."""
    adapters = engine.engine.adapters
    loaded = list(adapters.loaded.values()) if adapters is not None else []
    return [{"id": a.name, "object": "model", "created": 0, "owned_by": "qwenkit", "root": a.path,
             "parent": model_name, "max_model_len": engine.engine.max_model_len} for a in loaded]


def router(engine: AsyncEngine, model_name: str, check_key, allow_runtime: bool) -> APIRouter:
    """The load/unload routes (403 naming --allow-runtime-lora when it is off)."""
    routes = APIRouter(dependencies=[Depends(check_key)])

    def adapter_set():
        if not allow_runtime:
            raise HTTPException(403, "loading and unloading LoRA adapters is off: start the server "
                                     "with --allow-runtime-lora")
        if engine.engine.adapters is None:
            raise RequestError("this server holds no LoRA adapters: start it with --max-loras N")
        return engine.engine.adapters

    @routes.post("/v1/load_lora_adapter")
    async def load(req: LoadLoRAAdapterRequest):
        adapters = adapter_set()
        if req.lora_name == model_name:
            raise RequestError(f"lora_name {req.lora_name!r} is the base model's name")
        try:  # reading the files takes a while: in a thread, so the loop serves others meanwhile
            await asyncio.to_thread(adapters.load, req.lora_name, req.lora_path)
        except CheckpointError as e:
            raise RequestError(f"lora_path: {e}") from None
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @routes.post("/v1/unload_lora_adapter")
    async def unload(req: UnloadLoRAAdapterRequest):
        adapters = adapter_set()
        if req.lora_name not in adapters.loaded:
            raise HTTPException(404, f"no LoRA adapter named {req.lora_name!r} is loaded")
        adapters.unload(req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    return routes


# -- command line -----------------------------------------------------------------------------

def add_flags(p) -> None:
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                   help="serve a LoRA adapter (PEFT layout) as model NAME beside the base model (repeatable)")
    p.add_argument("--max-loras", type=int, default=None,
                   help="adapters loaded at once, each reserving memory from the KV budget (default: the --lora count)")
    p.add_argument("--max-lora-rank", type=int, default=16, help="the largest adapter rank (default 16)")
    p.add_argument("--allow-runtime-lora", action="store_true",
                   help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter")


def settings_from(args) -> dict:
    """EngineSettings fields from the LoRA flags, each checked before the model loads."""
    pairs = startup_adapters(args)
    max_loras = len(pairs) if args.max_loras is None else args.max_loras
    if max_loras < len(pairs):
        raise ConfigError(f"--max-loras {max_loras}: fewer than the {len(pairs)} --lora adapters")
    if args.max_lora_rank < 1:
        raise ConfigError(f"--max-lora-rank {args.max_lora_rank}: must be >= 1")
    if max_loras and getattr(args, "tensor_parallel_size", 1) > 1:
        raise ConfigError("--lora / --max-loras do not combine with --tensor-parallel-size > 1 yet")
    return {"max_loras": max_loras, "max_lora_rank": args.max_lora_rank}


def startup_adapters(args) -> dict[str, str]:
    """{name: directory} from --lora NAME=DIR flags (ConfigError naming a malformed one)."""
    out = {}
    for flag in args.lora:
        name, sep, path = flag.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--lora {flag}: want NAME=DIR")
        if name in out:
            raise ConfigError(f"--lora {flag}: the name {name!r} is given twice")
        if not (Path(path) / "adapter_config.json").is_file():
            raise ConfigError(f"--lora {flag}: {path} holds no adapter_config.json")
        out[name] = path
    return out


def load_startup(engine, args, model_name: str) -> str:
    """Load the --lora adapters into a built Engine (errors name the flag); a line saying what
    is served and reserved ("" without LoRA)."""
    from ..engine.memory import adapter_bytes

    for name, path in startup_adapters(args).items():
        if name == model_name:
            raise ConfigError(f"--lora {name}={path}: {name!r} is the base model's name")
        try:
            engine.adapters.load(name, path)
        except (CheckpointError, RequestError) as e:
            raise ConfigError(f"--lora {name}={path}: {e}") from None
    s = engine.settings
    if not s.max_loras:
        return ""
    names = ", ".join(engine.adapters.loaded) or "none loaded yet"
    return (f"LoRA: {names}; {s.max_loras} slot{'s' * (s.max_loras > 1)} of rank <= {s.max_lora_rank} "
            f"({adapter_bytes(engine.model, s) / 2**20:.1f} MiB of the budget)")
