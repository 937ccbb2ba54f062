"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))` over the batching engine.

    llm = LLM("qwen2.5-coder-0.5b-instruct")
    outs = llm.generate([[{"role": "user", "content": "Hi"}], "def fib(n):"], SamplingParams(max_tokens=64))
    print(outs[0].text)

A prompt is a string (encoded as is, no chat template), a list of token ids, or a conversation
(a list of {"role", "content"} dicts, encoded with the chat template, injection-safe).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import RequestError
from .engine import Engine
from .sampling_params import SamplingParams
from .settings import EngineSettings


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    num_cached_tokens: int = 0


class LLM:
    def __init__(self, model, tokenizer=None, settings: EngineSettings | None = None, **setting_changes):
        """`model`: a QwenForCausalLM, or a path / model id to load on the CPU in the `auto` dtype
        (`qwenkit.dtypes`; then its tokenizer comes too)."""
        if isinstance(model, str) or hasattr(model, "__fspath__"):
            from ..loader import load_model
            from ..tokenizer import load_tokenizer

            source = model
            model = load_model(source)
            tokenizer = tokenizer or load_tokenizer(source)
        settings = settings or EngineSettings()
        if setting_changes:
            settings = EngineSettings(**{**settings.__dict__, **setting_changes})
        self.engine = Engine(model, settings, tokenizer)
        self.tokenizer = tokenizer

    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self._tokenizer().encode(prompt)
        if prompt and all(isinstance(m, dict) for m in prompt):
            return self._tokenizer().apply_chat_template(prompt, tokenize=True)
        if all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise RequestError("a prompt is a string, a list of token ids, or a list of message dicts")

    def _tokenizer(self):
        if self.tokenizer is None:
            raise RequestError("text and chat prompts need a tokenizer: pass LLM(model, tokenizer)")
        return self.tokenizer

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Completions for one prompt or a list of prompts, in order (all batched together)."""
        if _is_single(prompts):
            prompts = [prompts]
        params = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise RequestError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        ids = [self.encode(p) for p in prompts]
        for prompt_ids, p in zip(ids, params):
            self.engine.validate(prompt_ids, p)
        done = {rid: Completion(prompt_ids) for prompt_ids, p in zip(ids, params)
                for rid in [self.engine.add_request(prompt_ids, p)]}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.error is not None:
                    raise out.error
                _merge(done[out.request_id], out)
        return list(done.values())


def _merge(c: Completion, out) -> None:
    c.token_ids += out.token_ids
    c.text += out.text
    c.logprobs += out.logprobs
    if out.finished:
        c.finish_reason, c.num_cached_tokens = out.finish_reason, out.num_cached_tokens


def _is_single(prompts) -> bool:
    """A string, a list of ints or a list of message dicts is one prompt; a list of those is many."""
    return isinstance(prompts, str) or (isinstance(prompts, list) and bool(prompts)
                                        and all(isinstance(x, (int, dict)) for x in prompts))
